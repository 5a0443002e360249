"""The node's configuration and HTCondor's Python bindings.

A knob is read from HTCondor's configuration when the bindings and a config are there, else from the
environment variable of the same name (a node without HTCondor, the tests). `bindings()` is the one
place that imports them: quietly, and with an error that says how to install them.
"""

from __future__ import annotations

import os
import warnings

if False:  # for type checkers only (typing costs the plugin start-up time)
    from typing import Any


def bindings() -> tuple[Any, Any]:
    """(htcondor2, classad2), or an ApppotError naming the package to install."""
    try:
        with warnings.catch_warnings():  # htcondor2 warns when there is no condor_config at all
            warnings.simplefilter("ignore")
            import classad2
            import htcondor2
    except ImportError:
        from apppot.errors import ApppotError

        raise ApppotError(
            "HTCondor's Python bindings (htcondor2, classad2) are not installed",
            hint="pip install htcondor, or apt-get install python3-htcondor",
        ) from None
    return htcondor2, classad2


def condor_param(name: str, *, env_first: bool = False) -> str | None:
    """The knob NAME. env_first: the environment wins -- for what the startd starts (the plugin):
    condor_config.d/50-apppot.conf puts APPPOT_IMAGE_PATH into STARTD_ENVIRONMENT, which starters and
    plugins inherit, and importing the bindings to read the config would cost ~35 ms per call."""
    if env_first and os.environ.get(name):
        return os.environ[name]
    try:
        value = bindings()[0].param.get(name)
    except Exception:  # noqa: BLE001 -- no bindings, or a broken config: the environment decides
        value = None
    return value or os.environ.get(name) or None
