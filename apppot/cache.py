"""apppot's caches on this host: extracted boot files, the KVM probe and digest memos.

Looked up in order: $APPPOT_CACHE (what `make` exports), /var/cache/apppot (an admin's, shared), the
user's $XDG_CACHE_HOME/apppot (or ~/.cache/apppot); new entries go to the first writable one.
Entries are content-addressed or keyed by what they depend on, so a stale one is never used.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cache_dirs(sub: str) -> list[Path]:
    """Where SUB entries are looked up, in order."""
    dirs = []
    if os.environ.get("APPPOT_CACHE"):
        dirs.append(Path(os.environ["APPPOT_CACHE"]) / sub)
    dirs.append(Path("/var/cache/apppot") / sub)
    home = os.environ.get("XDG_CACHE_HOME") or (os.path.expanduser("~/.cache") if "HOME" in os.environ else "")
    if home:
        dirs.append(Path(home) / "apppot" / sub)
    return list(dict.fromkeys(dirs))


def writable_cache_dir(sub: str) -> Path | None:
    """The first of cache_dirs(SUB) this user can write (created if needed), or None."""
    for d in cache_dirs(sub):
        with contextlib.suppress(OSError):
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK | os.X_OK):
                return d
    return None
