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

from apppot.backends import get_backend, qemu
from apppot.job import Disk


def run_once(backend: str, image: Path, job: Path, env: dict[str, str]) -> float:
    argv = [sys.executable, "-m", "apppot", "run", "--backend", backend, "--image", os.fspath(image), "--", "true"]
    t0 = time.perf_counter()
    res = subprocess.run(argv, cwd=job, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{backend} {image.name}: exit {res.returncode}\n{res.stderr}")
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", type=Path, required=True)
    p.add_argument("--debian", type=Path, required=True)
    p.add_argument("-n", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        kit = qemu.find_boot_files(Disk(args.debian.absolute(), "raw", None, "qcow2", True), kernel=None,
                                   initrd=None, rundir=Path(d))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO), "APPPOT_VM_KERNEL": os.fspath(kit.kernel),
           "APPPOT_VM_INITRD": os.fspath(kit.initrd)}  # fmt: skip
    print(f"accelerator: {qemu.choose_accel(kit)}; n={args.n}; load before: {os.getloadavg()[0]:.2f}\n")
    print("| backend | image | median wall s | min | max |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as job:
        for backend in ("uml", "qemu", "libvirt"):
            reason = get_backend(backend).unavailable_reason()
            if reason:
                print(f"| {backend} | – | skipped: {reason} | | |")
                continue
            for image in (args.tiny, args.debian):
                run_once(backend, image.absolute(), Path(job), env)  # warm caches (kernel extraction, digests)
                walls = [run_once(backend, image.absolute(), Path(job), env) for _ in range(args.n)]
                print(f"| {backend} | {image.name} | {statistics.median(walls):.2f} | {min(walls):.2f} | "
                      f"{max(walls):.2f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
