"""Host-side access to the personal HTCondor pool of scripts/personal-pool: a development helper for
scripts/demo.py and bench/, not part of the apppot package (an installed apppot has no scripts/)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

POOL = Path(__file__).resolve().parent / "personal-pool"


def pool_env() -> dict[str, str]:
    """Our environment with what `personal-pool env` exports (CONDOR_CONFIG for the bindings, the
    pool's shared dir, its test user) applied, and what it unsets removed."""
    out = subprocess.run([os.fspath(POOL), "env"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        words = shlex.split(line)
        if words[:1] == ["export"]:
            env.update(w.split("=", 1) for w in words[1:] if "=" in w)  # type: ignore[misc]
        elif words[:1] == ["unset"]:
            for w in words[1:]:
                env.pop(w, None)
    return env


def suggested_plugin_line(config_d: Path) -> str:
    """The FILETRANSFER_PLUGINS line that 50-apppot.conf suggests, commented out, for a site without
    Box, Google Drive or OneDrive users (docs/condor.md, "Plugin probes"): the one definition that the
    condor test and bench/condor.py put in a drop-in, as a site would."""
    lines = [ln.lstrip("#").strip() for ln in (config_d / "50-apppot.conf").read_text().splitlines()
             if ln.startswith("#") and ln.lstrip("#").strip().startswith("FILETRANSFER_PLUGINS =")]  # fmt: skip
    if len(lines) != 1:
        raise ValueError(f"{config_d / '50-apppot.conf'}: expected one suggested FILETRANSFER_PLUGINS line, found {lines}")
    return lines[0]
