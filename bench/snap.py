"""apppot-snap's cost: time of `base`, `changes` and `merge` on a Debian minbase tree (run on the
host with --root, under dash + GNU tools and under busybox sh + busybox applets), the changes
tarball's size against the tree's, and `changes`/merge inside a UML guest (tiny image). Medians.
Writes the "## apppot-snap" section of docs/performance.md.

    python bench/snap.py [--runs 3] [--no-write]      (root: debootstrap, and owners in the trees)

The minbase tree is cached in $APPPOT_CACHE/bench-minbase (debootstrap, ~1 min, first run only).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(REPO))
sys.path.insert(0, os.fspath(REPO / "bench"))

from perfdoc import write_section  # noqa: E402
SNAP = REPO / "apppot" / "guest" / "apppot-snap"
SECTION = "## apppot-snap"
CACHE = Path(os.environ.get("APPPOT_CACHE", "/var/cache/apppot"))
MINBASE = CACHE / "bench-minbase"
MIRROR = "http://deb.debian.org/debian"


def ensure_minbase() -> Path:
    if not (MINBASE / "usr/bin").is_dir():
        part = MINBASE.with_name(MINBASE.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        print(f"debootstrap --variant=minbase bookworm {part} (first run only)", file=sys.stderr)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", os.fspath(part), MIRROR],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        part.rename(MINBASE)
    return MINBASE


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-a", os.fspath(src), os.fspath(dst)], check=True)
    install_exclude(dst)
    return dst


def install_exclude(root: Path) -> None:
    (root / "etc/apppot").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "apppot/guest/apppot-snap.exclude", root / "etc/apppot/snap.exclude")


def tree_stats(root: Path) -> tuple[int, int]:
    """(paths, bytes of regular files) outside the default excludes, roughly what an image holds."""
    n = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            n += 1
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and os.path.isfile(p):
                size += os.path.getsize(p)
    return n, size


def few_changes(root: Path) -> None:
    """What a user typically does: add a tool, remove a doc file, edit a config file."""
    (root / "usr/local/bin/hello").write_text("#!/bin/sh\necho hello\n")
    (root / "usr/local/bin/hello").chmod(0o755)
    (root / "usr/share/common-licenses/GPL-2").unlink()
    with open(root / "etc/motd", "a") as f:
        f.write("customised\n")


def package_sized_changes(root: Path) -> None:
    """Roughly a package install: 1,000 new files (4 KiB each) in 20 directories."""
    for d in range(20):
        sub = root / f"usr/lib/bench-pkg/d{d:02}"
        sub.mkdir(parents=True)
        for i in range(50):
            (sub / f"f{i:03}").write_bytes(os.urandom(2048) + bytes(2048))


def snap_runner(flavour: str, bbdir: Path) -> Callable[..., float]:
    if flavour == "gnu":
        argv, env = ["dash", os.fspath(SNAP)], dict(os.environ)
    else:
        argv, env = [os.fspath(bbdir / "sh"), os.fspath(SNAP)], dict(os.environ, PATH=os.fspath(bbdir))

    def run(*args: str) -> float:
        t = time.perf_counter()
        res = subprocess.run(argv + list(args), capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise SystemExit(f"apppot-snap {' '.join(args)} failed:\n{res.stderr}")
        return time.perf_counter() - t

    return run


def bench_tree(flavour: str, bbdir: Path, work_dir: Path, runs: int) -> dict[str, object]:
    """Each scenario: copy the tree, record its base in place, copy that as the merge target's
    pristine base, change the tree, then time `changes` and `merge` (each merge into a fresh
    hard-linked copy of the pristine tree: merge renames new files in, never writes in place)."""
    snap = snap_runner(flavour, bbdir)
    r: dict[str, object] = {}
    bases = []
    for scenario, change in (("few", few_changes), ("pkg", package_sized_changes)):
        work = copy_tree(MINBASE, work_dir / "work")
        bases.append(snap("base", "--root", os.fspath(work)))
        pristine = copy_tree(work, work_dir / "pristine")
        change(work)
        out = work_dir / f"{scenario}.tar.gz"
        r[f"changes_{scenario}"] = statistics.median(snap("changes", "--root", os.fspath(work), "-o", os.fspath(out))
                                                    for _ in range(runs))  # fmt: skip
        r[f"size_{scenario}"] = out.stat().st_size
        merges = []
        for _ in range(runs):
            target = work_dir / "target"
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run(["cp", "-al", os.fspath(pristine), os.fspath(target)], check=True)
            merges.append(snap("merge", "--root", os.fspath(target), os.fspath(out)))
        r[f"merge_{scenario}"] = statistics.median(merges)
    r["base"] = statistics.median(bases)
    # A base recorded in a build tree (no trusted inode/ctime): the first `changes` hashes every
    # file whose size and mtime match; it caches what it verified, so the next one is fast again.
    bt = work_dir / "work"
    r["base_build"] = snap("base", "--root", os.fspath(bt), "--build-tree")
    few_changes(work_dir / "work")  # on top of the 1,000 files, now part of this base
    r["changes_build_first"] = snap("changes", "--root", os.fspath(bt), "-o", os.fspath(work_dir / "bt.tar.gz"))
    r["changes_build_cached"] = snap("changes", "--root", os.fspath(bt), "-o", os.fspath(work_dir / "bt.tar.gz"))
    for d in ("work", "pristine", "target"):
        shutil.rmtree(work_dir / d, ignore_errors=True)
    return r


GUEST_TIME = re.compile(r"real\s+(?:(\d+)m\s*)?([\d.]+)s")


def bench_uml(work_dir: Path, runs: int) -> dict[str, object] | None:
    """Inside a UML guest (tiny image): `changes` with a few changes, and what --changes adds to a boot."""
    from apppot import build, kernel
    from apppot.errors import ApppotError

    try:
        kernel.find_uml_kernel(notice=False)
    except ApppotError as e:
        print(f"skipping the UML measurements: {e}", file=sys.stderr)
        return None
    img = build.build_tiny(work_dir / "tiny.img")
    job = work_dir / "job"
    job.mkdir()
    cow = job / "work.cow"

    def apppot(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "apppot", "run", "--mem", "128M", *args], cwd=job,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.fspath(REPO)}, check=False)  # fmt: skip
        if res.returncode != 0:
            raise SystemExit(f"apppot run {' '.join(args)} failed:\n{res.stderr}")
        return time.perf_counter() - t, res

    apppot("--apppot", f"{cow},{img}", "--", "sh", "-c",
           "mkdir -p /usr/local/bin && echo 'echo hi' > /usr/local/bin/hi && rm /usr/share/apppot/README && "
           "echo /bin/ash >> /etc/shells")  # fmt: skip
    inside = []
    for _ in range(runs):
        _, res = apppot("--apppot", f"{cow},{img}", "--", "sh", "-c", "time apppot-snap changes -o /home/user/job/c.tgz")
        m = GUEST_TIME.search(res.stderr)
        if m:
            inside.append(int(m.group(1) or 0) * 60 + float(m.group(2)))
    plain = statistics.median(apppot("--image", os.fspath(img), "--", "true")[0] for _ in range(runs))
    merged = statistics.median(apppot("--image", os.fspath(img), "--changes", "c.tgz", "--", "true")[0] for _ in range(runs))
    return {"changes": statistics.median(inside) if inside else float("nan"), "boot": plain, "boot_merge": merged,
            "kernel": os.fspath(kernel.find_uml_kernel(notice=False))}  # type: ignore[dict-item]


def fmt_s(x: object) -> str:
    return f"{float(x):.2f} s"  # type: ignore[arg-type]


def report(paths: int, size: int, results: dict[str, dict[str, object]], uml: dict[str, object] | None, runs: int) -> str:
    g, b = results["gnu"], results["busybox"]
    rows = [
        ("`base` (in place: trusted inode/ctime)", fmt_s(g["base"]), fmt_s(b["base"])),
        ("`base --build-tree` (what `apppot build` records)", fmt_s(g["base_build"]), fmt_s(b["base_build"])),
        ("`changes`, a few changes", fmt_s(g["changes_few"]), fmt_s(b["changes_few"])),
        ("`merge`, a few changes", fmt_s(g["merge_few"]), fmt_s(b["merge_few"])),
        ("`changes`, 1,000 new files", fmt_s(g["changes_pkg"]), fmt_s(b["changes_pkg"])),
        ("`merge`, 1,000 new files", fmt_s(g["merge_pkg"]), fmt_s(b["merge_pkg"])),
        ("`changes` after `--build-tree`, first run (hashes)", fmt_s(g["changes_build_first"]), fmt_s(b["changes_build_first"])),
        ("`changes` after `--build-tree`, next runs (cache)", fmt_s(g["changes_build_cached"]), fmt_s(b["changes_build_cached"])),
    ]  # fmt: skip
    table = "\n".join(f"| {a} | {x} | {y} |" for a, x, y in rows)
    sizes = (f"| a few changes | {g['size_few']:,} B | {g['size_few'] / size:.1e} |\n"
             f"| 1,000 new files (4 MiB) | {g['size_pkg']:,} B | {g['size_pkg'] / size:.1e} |")  # fmt: skip
    uml_text = "(no UML kernel on this host: not measured)"
    if uml:
        uml_text = (f"| `apppot-snap changes` inside the guest, a few changes | {fmt_s(uml['changes'])} |\n"
                    f"| `apppot run --image tiny.img -- true` | {fmt_s(uml['boot'])} |\n"
                    f"| same with `--changes` (merge at boot) | {fmt_s(uml['boot_merge'])} |\n\n"
                    "Under UML each process start costs ~35 ms; a merge runs ~25 of them (checks, extraction, "
                    "one\nplan script of batched mv/chmod/touch), whatever the number of files.")  # fmt: skip
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")  # fmt: skip
    return f"""{SECTION}

`python bench/snap.py` ({datetime.date.today()}, {os.cpu_count()} cores, {cpu}; medians of {runs} runs).
Debian bookworm minbase tree (debootstrap): {paths:,} paths, {size / 2**20:.0f} MiB of regular files.
apppot-snap runs on the host with `--root`, once under dash with GNU coreutils/findutils/tar/mawk
(what Debian images have) and once under busybox sh with only busybox 1.35 applets on PATH (what
the tiny image has). Each merge goes into a fresh copy of the pristine base tree. Minbase is
smaller than a working image (~20k paths): the scan is linear in the number of paths.

| step | dash + GNU | busybox |
|---|---|---|
{table}

The cost is one `find | xargs stat` over the tree plus awk; `base` also hashes every regular file.
A base recorded in a build tree (`apppot build` records it before `mke2fs -d`, which renumbers
inodes) cannot trust inode/ctime, so the first `changes` in an image verifies same-size, same-mtime
files by digest; it caches what it verified (`/var/lib/apppot/snap.cache`), so later runs in the
same (persistent COW) image take the fast path.

Changes tarball size against the tree's {size / 2**20:.0f} MiB (what shipping the image would cost):

| change | tarball | fraction of the tree |
|---|---|---|
{sizes}

Inside a UML guest (tiny image, kernel {uml['kernel'] if uml else '-'}, `--mem 128M`; the
tiny image's base is a build-tree base, so `changes` also verifies busybox and friends by digest):

| step | time |
|---|---|
{uml_text}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    ap.add_argument("--no-uml", action="store_true", help="skip the measurements inside a UML guest")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/snap.py: run as root (debootstrap, and trees with root-owned files)")
    ensure_minbase()
    install_exclude(MINBASE)
    paths, size = tree_stats(MINBASE)
    with tempfile.TemporaryDirectory(prefix="apppot-bench-snap-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        bbdir = work / "busybox-bin"
        bbdir.mkdir()
        busybox = shutil.which("busybox") or "/bin/busybox"
        for applet in subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split():
            (bbdir / applet).symlink_to(busybox)
        results = {}
        for flavour in ("gnu", "busybox"):
            print(f"measuring under {flavour}...", file=sys.stderr)
            results[flavour] = bench_tree(flavour, bbdir, work, args.runs)
        uml = None if args.no_uml else bench_uml(work, args.runs)
        text = report(paths, size, results, uml, args.runs)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
