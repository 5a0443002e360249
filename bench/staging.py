"""Staging a VM disk into a job sandbox: the apppot:// plugin vs copying the image (`cp`).

    .venv/bin/python bench/staging.py [--reps N]

Bases: 1 GiB and 8 GiB raw images, fully allocated (every block written), cached under
$APPPOT_CACHE/bench. Rows, medians in one run:
  plugin (in process)   apppot.plugin.transfer() for one URL: what the plugin does per image
  plugin (process)      the plugin executable with -infile/-outfile, as condor_starter runs it
  cp                    copying the base into the sandbox (page cache warm), then removing it
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(REPO))

from apppot import plugin

CACHE = Path(os.environ.get("APPPOT_CACHE", "/var/cache/apppot")) / "bench"


def make_base(size_gib: int) -> Path:
    path = CACHE / f"full{size_gib}g.img"
    if not path.exists() or path.stat().st_size != size_gib << 30:
        print(f"writing {path} ({size_gib} GiB, every block allocated)...", file=sys.stderr, flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        subprocess.run(["dd", "if=/dev/zero", f"of={tmp}", "bs=4M", f"count={size_gib * 256}", "conv=fsync",
                        "status=none"], check=True)  # fmt: skip
        tmp.rename(path)
    return path


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    os.environ["APPPOT_IMAGE_PATH"] = os.fspath(CACHE)
    os.environ.setdefault("CONDOR_CONFIG", "/dev/null")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="apppot-bench-sandbox-", dir=CACHE.parent) as sb:
        sandbox = Path(sb)
        for gib in (1, 8):
            base = make_base(gib)
            subprocess.run(["cat", base], stdout=subprocess.DEVNULL, check=True)  # warm the page cache for cp
            dest = sandbox / "disk"

            def in_process() -> None:
                ad = plugin.transfer(plugin.Request(f"apppot://{base.name}", os.fspath(dest)), upload=False)
                assert ad["TransferSuccess"], ad
                dest.unlink()

            infile, outfile = sandbox / ".in", sandbox / ".out"
            infile.write_text(f'[ Url = "apppot://{base.name}"; LocalFileName = "{dest}" ]')

            def as_process() -> None:
                outfile.write_bytes(b" " * 19264)
                subprocess.run([REPO / "plugins/apppot_plugin", "-infile", infile, "-outfile", outfile], env=env,
                               check=True)  # fmt: skip
                dest.unlink()

            infile10 = sandbox / ".in10"
            infile10.write_text("".join(f'[ Url = "apppot://{base.name}"; LocalFileName = "{dest}{i}" ]'
                                        for i in range(10)))  # fmt: skip

            def as_process_10() -> None:
                outfile.write_bytes(b" " * 19264)
                subprocess.run([REPO / "plugins/apppot_plugin", "-infile", infile10, "-outfile", outfile], env=env,
                               check=True)  # fmt: skip
                for i in range(10):
                    Path(f"{dest}{i}").unlink()

            def copy() -> None:
                subprocess.run(["cp", base, dest], check=True)
                dest.unlink()

            cp_reps = args.reps if gib == 1 else max(3, args.reps // 2)
            r = {"base": f"{gib} GiB", "in_process": median_ms(in_process, 200), "process": median_ms(as_process, args.reps),
                 "process10": median_ms(as_process_10, args.reps) / 10, "cp": median_ms(copy, cp_reps)}  # fmt: skip
            rows.append(r)
    floor = median_ms(lambda: subprocess.run([sys.executable, "-I", "-c", "pass"], check=True), args.reps)
    print(f"interpreter start-up alone ({sys.executable} -I -c pass): {floor:.1f} ms")
    print("| base | plugin, in process (ms) | plugin process, 1 image (ms) | plugin process, 10 images (ms per image) "
          "| cp (ms) | cp / plugin process |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {r['in_process']:.3f} | {r['process']:.1f} | {r['process10']:.1f} | {r['cp']:.0f} | "
              f"{r['cp'] / r['process']:.0f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
