#!/usr/bin/env python3
"""Boot-to-exit latency of `apppot run -- true` per backend and image; prints a markdown table.

Usage: .venv/bin/python bench/boot.py --tiny TINY.img --debian DEBIAN.img [-n 5]
The tiny image has no kernel of its own: for qemu/libvirt it boots the Debian image's kernel and
initramfs (APPPOT_VM_KERNEL/APPPOT_VM_INITRD, as the tests do). libvirtd must be running for the
libvirt rows (they are skipped otherwise). Guest clocks tick every 10 ms under UML and TCG.
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

from apppot import accel, bootfiles, kernel
from apppot.backends import get_backend
from apppot.job import Disk


JOB = ["sh", "-c", ": > started"]  # the job's first instruction creates a file in the job dir


def run_once(argv: list[str], job: Path, env: dict[str, str]) -> tuple[float, float]:
    """(launch -> first job instruction, launch -> exit), in seconds. The first instruction is timed
    by the host clock: `started` is created through hostfs/9p, so its mtime is the host's time."""
    (job / "started").unlink(missing_ok=True)
    t0 = time.time()
    res = subprocess.run(argv + JOB, cwd=job, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"{argv}: exit {res.returncode}\n{res.stderr}")
    return (job / "started").stat().st_mtime_ns / 1e9 - t0, wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", type=Path, required=True)
    p.add_argument("--debian", type=Path, required=True)
    p.add_argument("-n", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        kit = bootfiles.find_boot_files(Disk(args.debian.absolute(), "raw", None, "qcow2", True), kernel=None,
                                   initrd=None, rundir=Path(d))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO), "APPPOT_VM_KERNEL": os.fspath(kit.kernel),
           "APPPOT_VM_INITRD": os.fspath(kit.initrd)}  # fmt: skip
    built = kernel.find_uml_kernel(notice=False)
    print(f"accelerator: {accel.choose_accel(kit)}; n={args.n}; load before: {os.getloadavg()[0]:.2f}\n")
    print("| backend | image | launch -> first job instruction, median s | launch -> exit, median s | exit min | exit max |")
    print("|---|---|---|---|---|---|")
    apppot = [sys.executable, "-m", "apppot", "run"]
    rows: list[tuple[str, str, list[str]]] = [("native (no VM)", "-", [])]
    for label, k in ((f"uml, apppot's kernel ({built})", built), (f"uml, Debian's packaged kernel ({kernel.PACKAGED})", kernel.PACKAGED)):
        rows += [(label, img.name, [*apppot, "--backend", "uml", "--kernel", os.fspath(k), "--image", os.fspath(img.absolute()), "--"])
                 for img in (args.tiny, args.debian)]  # fmt: skip
    for backend in ("qemu", "libvirt"):
        reason = get_backend(backend).unavailable_reason()
        if reason:
            print(f"| {backend} | – | skipped: {reason} | | | |")
            continue
        rows += [(f"{backend} (TCG)" if "tcg" in accel.choose_accel(kit) else backend, img.name,
                  [*apppot, "--backend", backend, "--image", os.fspath(img.absolute()), "--"])
                 for img in (args.tiny, args.debian)]  # fmt: skip
    with tempfile.TemporaryDirectory() as job:
        for label, image, argv in rows:
            run_once(argv, Path(job), env)  # warm caches (kernel extraction, digests, page cache)
            runs = [run_once(argv, Path(job), env) for _ in range(args.n)]
            first, walls = [r[0] for r in runs], [r[1] for r in runs]
            print(f"| {label} | {image} | {statistics.median(first):.3f} | {statistics.median(walls):.3f} | "
                  f"{min(walls):.3f} | {max(walls):.3f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
