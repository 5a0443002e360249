#!/usr/bin/env python3
"""Sequential write/read throughput to the job dir and to the root disk inside each backend vs the
host, in one run; prints a markdown table.

Usage: .venv/bin/python bench/io.py --image DEBIAN.img [--mib 256] [-n 3] [--backend uml] [--kernel K]...
Inside the guest: `dd if=/dev/zero of=F bs=1M count=MIB conv=fsync` (write), then drop the page
cache and `dd if=F of=/dev/null bs=1M` (read), timed with /proc/uptime (10 ms ticks under UML/TCG).
The job dir is hostfs (UML) or virtio-9p (qemu, libvirt); the root disk is a UML COW file or a
qcow2 overlay over the raw base. The host row runs the same dd on the job dir's file system.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.fspath(REPO))

from apppot.backends import get_backend

GUEST = r"""
t() { read -r up _ </proc/uptime; echo "$up"; }
for target in "$@"; do
  f=$target/apppot-io.bin
  a=$(t); dd if=/dev/zero of=$f bs=1M count=$MIB conv=fsync 2>/dev/null; b=$(t)
  sync; echo 3 > /proc/sys/vm/drop_caches
  c=$(t); dd if=$f of=/dev/null bs=1M 2>/dev/null; d=$(t)
  rm -f $f
  echo "$target $a $b $c $d"
done
"""


def guest_run(backend: str, image: Path, job: Path, mib: int, kernel: Path | None = None) -> dict[str, tuple[float, float]]:
    argv = [sys.executable, "-m", "apppot", "run", "--backend", backend, "--image", os.fspath(image), "--mem", "256M",
            *(["--kernel", os.fspath(kernel)] if kernel else []),
            "--", "sh", "-c", f"MIB={mib}\n{GUEST}", "io", "/home/user/job", "/root"]  # fmt: skip
    res = subprocess.run(argv, cwd=job, env={**os.environ, "PYTHONPATH": os.fspath(REPO)}, capture_output=True,
                         text=True, check=False)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"{backend}: exit {res.returncode}\n{res.stderr}")
    out = {}
    for line in res.stdout.splitlines():
        target, a, b, c, d = line.split()
        out[target] = (float(b) - float(a), float(d) - float(c))
    return out


def host_run(job: Path, mib: int) -> tuple[float, float]:
    f = job / "apppot-io.bin"
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={mib}", "conv=fsync"], check=True,
                   capture_output=True)  # fmt: skip
    t1 = time.perf_counter()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    t2 = time.perf_counter()
    subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    t3 = time.perf_counter()
    f.unlink()
    return t1 - t0, t3 - t2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=Path, required=True, help="an image with a kernel (apppot build --debian)")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--backend", action="append", choices=("uml", "qemu", "libvirt"),
                   help="only these backends (repeatable; default: every usable one)")
    p.add_argument("--kernel", type=Path, action="append",
                   help="UML kernels to compare, a row pair each (repeatable; default: the one apppot finds)")
    args = p.parse_args()
    mb = args.mib * 1.048576
    rows: list[tuple[str, str, list[tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as job:
        os.chmod(job, 0o755)
        rows.append(("host", "same file system", [host_run(Path(job), args.mib) for _ in range(args.n)]))
        for backend in args.backend or ("uml", "qemu", "libvirt"):
            if get_backend(backend).unavailable_reason():
                continue
            for k in (args.kernel or [None]) if backend == "uml" else [None]:
                runs = [guest_run(backend, args.image.absolute(), Path(job), args.mib, k) for _ in range(args.n)]
                fs = "hostfs" if backend == "uml" else "9p"
                disk = "UML COW" if backend == "uml" else "qcow2 overlay"
                label = f"{backend} ({k})" if k else backend
                rows.append((label, f"job dir ({fs})", [r["/home/user/job"] for r in runs]))
                rows.append((label, f"root disk ({disk})", [r["/root"] for r in runs]))
    host_w = mb / statistics.median(w for w, _ in rows[0][2])
    host_r = mb / statistics.median(r for _, r in rows[0][2])
    print(f"{args.mib} MiB, median of {args.n}\n")
    print("| backend | target | write MB/s | ratio | read MB/s (cold) | ratio |\n|---|---|---|---|---|---|")
    for backend, target, runs in rows:
        w = mb / max(statistics.median(x for x, _ in runs), 0.01)
        r = mb / max(statistics.median(y for _, y in runs), 0.01)
        print(f"| {backend} | {target} | {w:.0f} | {w / host_w:.2f} | {r:.0f} | {r / host_r:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
