"""Finding the UML kernel: apppot's own fast build first, Debian's packaged one as the fallback.

apppot's kernel measures its delay loop against the host clock in ~3 ms (kernel/patches/0004), so
nothing here calibrates or caches loops_per_jiffy; Debian's kernel calibrates itself (~50 ms)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from apppot.errors import NotFoundError

PACKAGED = Path("/usr/bin/linux")  # Debian's user-mode-linux: works, but ~1.4 s slower per boot


def candidates() -> list[Path]:
    """apppot's kernel as `make uml-kernel` / `make install` place it, most specific first."""
    here = Path(__file__).resolve().parent.parent  # PREFIX/lib/apppot when installed by `make install`
    prefixes = [here, Path(sys.prefix, "lib", "apppot"), Path("/usr/local/lib/apppot"), Path("/usr/lib/apppot")]
    return [p / "linux" for p in prefixes]


def find_uml_kernel(explicit: Path | None = None, *, notice: bool = True) -> Path:
    """--kernel, else $APPPOT_KERNEL, else apppot's built kernel, else the packaged one (with a notice)."""
    chosen = explicit or (Path(os.environ["APPPOT_KERNEL"]) if os.environ.get("APPPOT_KERNEL") else None)
    if chosen is not None:
        if not (chosen.is_file() and os.access(chosen, os.X_OK)):
            raise NotFoundError(f"UML kernel {chosen} not found or not executable",
                                hint="build one with `make uml-kernel`, or install user-mode-linux")  # fmt: skip
        return chosen
    for cand in candidates():
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    packaged = shutil.which("linux") or (os.fspath(PACKAGED) if PACKAGED.exists() else None)
    if packaged:
        if notice:
            print(f"apppot: notice: using the packaged UML kernel {packaged}, which boots ~1.4 s slower; "
                  "`make uml-kernel && make install` builds apppot's fast one", file=sys.stderr)  # fmt: skip
        return Path(packaged)
    raise NotFoundError(
        "no UML kernel found",
        hint="run `make uml-kernel` (builds apppot's kernel), or apt-get install user-mode-linux, or pass --kernel",
    )
