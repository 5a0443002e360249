#!/usr/bin/env python3
"""Boot-to-exit latency of `apppot run -- true` per backend and image; prints a markdown table.

Usage: .venv/bin/python bench/boot.py --tiny TINY.img --debian DEBIAN.img [-n 5]
       .venv/bin/python bench/boot.py --launch --tiny TINY.img [--kernel K]... [-n 10]   (phases, UML)
       .venv/bin/python bench/boot.py --exec DEBIAN.img [--kernel K]... [-n 5]  (guest process starts)
The tiny image has no kernel of its own: for qemu/libvirt it boots the Debian image's kernel and
initramfs (APPPOT_VM_KERNEL/APPPOT_VM_INITRD, as the tests do). libvirtd must be running for the
libvirt rows (they are skipped otherwise). Guest clocks tick every 10 ms under UML and TCG.
"""

from __future__ import annotations

import argparse
import os
import re
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


LAUNCH_JOB = ["sh", "-c", ": > started; read -r up _ </proc/uptime; echo $up > uptime; dmesg > dmesg"]
_INIT_RE = re.compile(r"\[ *([0-9.]+)\] Run /sbin/apppot-init as init process")


def launch_once(argv: list[str], job: Path, env: dict[str, str]) -> dict[str, float]:
    """One `apppot run --debug` of LAUNCH_JOB, split into phases on the host clock: apppot's own
    start-up until it starts the kernel (the moment its `+ KERNEL ...` debug line arrives on the
    pipe), the kernel until the job's first instruction, and in the guest's own clock (10 ms ticks)
    the kernel until it runs init."""
    for name in ("started", "uptime", "dmesg"):
        (job / name).unlink(missing_ok=True)
    t0 = time.time()
    proc = subprocess.Popen([*argv, *LAUNCH_JOB], cwd=job, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    t_exec = None
    for line in proc.stderr:
        if t_exec is None and line.startswith("apppot: + "):
            t_exec = time.time()
    if proc.wait() != 0 or t_exec is None:
        raise SystemExit(f"{argv}: exit {proc.returncode}")
    wall = time.time() - t0
    first = (job / "started").stat().st_mtime_ns / 1e9 - t0
    m = _INIT_RE.search((job / "dmesg").read_text())
    return {"apppot start-up (python, imports, COW) -> kernel exec": t_exec - t0,
            "kernel exec -> first job instruction": first - (t_exec - t0),
            "  of which kernel boot -> init (guest clock)": float(m.group(1)) if m else float("nan"),
            "  of which -> first instruction (guest uptime)": float((job / "uptime").read_text()),
            "launch -> first job instruction": first,
            "launch -> exit": wall}  # fmt: skip


def launch_main(args: argparse.Namespace) -> int:
    """--launch: the phases of `apppot run` on the tiny image under UML, per kernel, in one run;
    --baseline DIR adds the same for another checkout of apppot (its own tiny image and kernel)."""
    # apppot as installed: byte-compiled (a warm-up run writes the .pyc files)
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    rows = [(f"this checkout, {k}", REPO, k, args.tiny.absolute())
            for k in args.kernel or [kernel.find_uml_kernel(notice=False)]]  # fmt: skip
    with tempfile.TemporaryDirectory() as job, tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            tiny = Path(tmp, "baseline-tiny.img")
            subprocess.run([sys.executable, "-m", "apppot", "build", "--tiny", tiny], check=True, capture_output=True,
                           env={**base_env, "PYTHONPATH": os.fspath(args.baseline)})  # fmt: skip
            rows.insert(0, (f"baseline {args.baseline}, {args.baseline_kernel}", args.baseline, args.baseline_kernel, tiny))
        print(f"n={args.n}; load before: {os.getloadavg()[0]:.2f}; medians in s; "
              f"python3 -I -c pass: {_python_floor(args.n):.3f} s\n")  # fmt: skip
        results = []
        for label, repo, k, tiny in rows:
            env = {**base_env, "PYTHONPATH": os.fspath(repo)}
            argv = [sys.executable, "-m", "apppot", "--debug", "run", "--backend", "uml", "--kernel", os.fspath(k),
                    "--image", os.fspath(tiny), "-X", "printk.time=1", "--"]  # fmt: skip
            launch_once(argv, Path(job), env)  # warm caches, write .pyc files
            results.append([launch_once(argv, Path(job), env) for _ in range(args.n)])
    print("| phase | " + " | ".join(label for label, *_ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for phase in results[0][0]:
        print(f"| {phase} | " + " | ".join(f"{statistics.median(r[phase] for r in runs):.3f}"
                                          for runs in results) + " |")  # fmt: skip
    return 0


EXEC_SCRIPT = r"""
t() { read -r up _ </proc/uptime; echo "$up"; }
a=$(t); i=0; while [ $i -lt $N ]; do /bin/true; i=$((i+1)); done; b=$(t)
c=$(t); i=0; while [ $i -lt $N ]; do dd if=/dev/zero of=/dev/null bs=1M count=1 2>/dev/null; i=$((i+1)); done; d=$(t)
echo "$a $b $c $d"
"""


def exec_main(args: argparse.Namespace) -> int:
    """--exec IMAGE: what a process start costs in the guest, per kernel, against the host: the guest's
    shell runs /bin/true and a 1 MiB `dd` N times each (timed by the guest's /proc/uptime, 10 ms ticks),
    and the host's /bin/sh the same loops. Each kernel boots `-n` times; medians per process."""
    n_proc = 100
    rows: dict[str, list[tuple[float, float]]] = {}
    host = []
    for _ in range(args.n):
        t0 = time.perf_counter()
        subprocess.run(["sh", "-c", f"i=0; while [ $i -lt {n_proc} ]; do /bin/true; i=$((i+1)); done"], check=True)
        t1 = time.perf_counter()
        subprocess.run(["sh", "-c", f"i=0; while [ $i -lt {n_proc} ]; do dd if=/dev/zero of=/dev/null bs=1M count=1 "
                        "2>/dev/null; i=$((i+1)); done"], check=True)  # fmt: skip
        host.append(((t1 - t0) / n_proc, (time.perf_counter() - t1) / n_proc))
    with tempfile.TemporaryDirectory() as job:
        for _ in range(args.n):
            for k in args.kernel or [kernel.find_uml_kernel(notice=False)]:
                argv = [sys.executable, "-m", "apppot", "run", "--backend", "uml", "--kernel", os.fspath(k), "--image",
                        os.fspath(args.exec), "--discard-disk", "--", "env", f"N={n_proc}", "sh", "-c", EXEC_SCRIPT]  # fmt: skip
                res = subprocess.run(argv, cwd=job, env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
                                     capture_output=True, text=True, check=False)  # fmt: skip
                if res.returncode != 0:
                    raise SystemExit(f"{argv}: exit {res.returncode}\n{res.stderr}")
                a, b, c, d = map(float, res.stdout.split()[-4:])
                rows.setdefault(f"uml, {k}", []).append(((b - a) / n_proc, (d - c) / n_proc))
    print(f"{args.exec.name}: {n_proc} process starts per loop, {args.n} boots per kernel, load before "
          f"{os.getloadavg()[0]:.2f}; medians in ms per process\n")  # fmt: skip
    print("| where | /bin/true (fork+exec+exit) | dd 1 MiB /dev/zero -> /dev/null |")
    print("|---|---|---|")
    for label, xs in [("host", host), *rows.items()]:
        print(f"| {label} | {statistics.median(x[0] for x in xs) * 1000:.1f} | "
              f"{statistics.median(x[1] for x in xs) * 1000:.1f} |")  # fmt: skip
    return 0


def _python_floor(n: int) -> float:
    """The interpreter's own start-up, the floor under apppot's."""
    walls = []
    for _ in range(n):
        t0 = time.time()
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
        walls.append(time.time() - t0)
    return statistics.median(walls)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", type=Path)
    p.add_argument("--debian", type=Path)
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--launch", action="store_true", help="only the phases of a UML launch of the tiny image")
    p.add_argument("--exec", type=Path, metavar="IMAGE", help="only process starts in IMAGE's guest, per --kernel")
    p.add_argument("--kernel", type=Path, action="append", help="with --launch: UML kernels to compare (repeatable)")
    p.add_argument("--baseline", type=Path, help="with --launch: another apppot checkout to compare against")
    p.add_argument(
        "--baseline-kernel",
        type=Path,
        default=Path("/usr/local/lib/apppot/linux"),
        help="with --baseline: its UML kernel (default: %(default)s)",
    )
    args = p.parse_args()
    if args.exec:
        return exec_main(args)
    if not args.tiny:
        p.error("--tiny is required (except with --exec)")
    if args.launch:
        return launch_main(args)
    if args.debian is None:
        p.error("--debian is required (except with --launch)")
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
