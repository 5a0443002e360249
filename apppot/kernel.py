"""Finding the UML kernel: apppot's own fast build first, Debian's packaged one as the fallback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from apppot import cache as cache_dirs
from apppot import image
from apppot import proc
from apppot.errors import ApppotError, NotFoundError

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


# --- lpj: skip the guest's ~50 ms delay-loop calibration, with a value measured on THIS host --------

_LPJ_RE = re.compile(r"Calibrating delay loop\.\.\. [0-9.]+ BogoMIPS \(lpj=([0-9]+)\)")
LPJ_MAX_AGE_S = 86400  # VMs migrate between hosts: measure again daily


def _host_key(kernel_path: Path) -> str:
    st = kernel_path.stat()
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "")
    text = f"{kernel_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{cpu}|{os.cpu_count()}|{os.uname().release}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def calibrate_lpj(kernel_path: Path, *, boots: int = 3) -> int | None:
    """Boot the kernel with no root file system (it calibrates, then panics: ~0.07 s each) and read
    the delay-loop value it prints; None unless `boots` readings agree within 10 %."""
    values = []
    with tempfile.TemporaryDirectory(prefix="apppot-lpj-") as d:
        for i in range(boots):
            _, out = proc.run([os.fspath(kernel_path), "mem=32M", f"umid=lpj{os.getpid()}-{i}", f"uml_dir={d}",
                               "con=null", "con0=null,fd:1", "ssl=null", "panic=-1", "root=/dev/apppot-none"],
                              cwd=d, timeout_s=20)  # fmt: skip
            m = _LPJ_RE.search(out)
            if not m:
                return None
            values.append(int(m.group(1)))
    values.sort()
    median = values[len(values) // 2]
    return median if values[-1] <= median * 1.1 and values[0] >= median * 0.9 else None


def lpj_for(kernel_path: Path) -> int | None:
    """This host's lpj for the kernel, measured once a day and cached (apppot.cache "lpj"); None (the kernel
    calibrates itself) when there is nowhere to cache it or the readings disagree."""
    if kernel_path == PACKAGED or os.environ.get("APPPOT_LPJ") == "0":
        return None
    cache = cache_dirs.writable_cache_dir("lpj")
    if cache is None:
        return None  # calibrating on every run would cost more than it saves
    key, cache_file = _host_key(kernel_path), cache / "lpj.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        entry = json.loads(cache_file.read_text())[key]
        # readings that disagreed (a busy host) are tried again sooner than a good value expires
        if time.time() - entry["when"] < (LPJ_MAX_AGE_S if entry["lpj"] else 600):
            return int(entry["lpj"]) if entry["lpj"] else None
    try:
        lpj = calibrate_lpj(kernel_path)
    except (OSError, ApppotError):
        lpj = None
    with contextlib.suppress(OSError):
        image.write_atomically(cache_file, json.dumps({key: {"lpj": lpj, "when": time.time()}}).encode())
    return lpj
