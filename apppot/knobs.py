"""The node's configuration: an HTCondor knob when HTCondor's bindings and config are there, else the
environment variable of the same name (a node without HTCondor, the tests)."""

from __future__ import annotations

import os
import warnings


def condor_param(name: str) -> str | None:
    value = None
    try:
        with warnings.catch_warnings():  # the bindings warn when there is no condor_config at all
            warnings.simplefilter("ignore")
            import htcondor2

        value = htcondor2.param.get(name)
    except Exception:  # noqa: BLE001 -- no bindings, or a broken config: the environment decides
        value = None
    return value or os.environ.get(name) or None
