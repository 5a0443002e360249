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
