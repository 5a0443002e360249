"""A URL image into a job's sandbox: the node's image cache vs downloading it per job.

    .venv/bin/python bench/imagecache.py [--reps N]     (as root: the fetch service drops to nobody)

One 1 GiB image (every block allocated, $APPPOT_CACHE/bench) served by Debian's nginx on 127.0.0.1;
medians in one run:
  naive: GET per job     an HTTP download of the image into the sandbox, as a URL in transfer_input_files
                         (HTCondor's curl_plugin) does for every job
  cold node              the first job on a node: the fetch service downloads and verifies the image
                         (empty cache each time), then the plugin process stages a UML COW layer over it
  warm node              every later job: the plugin process asks the service and stages its layer
  resident image         the plugin process staging over an image in APPPOT_IMAGE_PATH (no service)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(REPO))
sys.path.insert(0, os.fspath(REPO / "bench"))

from perfdoc import write_section
from staging import make_base

from tests.conftest import PREALLOCATED
from tests.httpserver import Nginx

SECTION = "## Images on demand: the node's image cache vs a download per job"
SERVICE_IDS = "65534.65534"  # nobody


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Service:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "CONDOR_CONFIG": "/dev/null", "PYTHONPATH": os.fspath(REPO),
                    "APPPOT_CACHE_DIR": os.fspath(root), "APPPOT_CACHE_BUDGET": "4G", "CONDOR_IDS": SERVICE_IDS,
                    "APPPOT_FETCHD_SOCKET": os.fspath(root / "fetchd.sock"), "APPPOT_FETCH_TIMEOUT": "600"}  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, REPO / "plugins/apppot_fetchd"], env=self.env,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        while not (root / "fetchd.sock").exists():
            assert self.proc.poll() is None, "apppot_fetchd exited"
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def run_plugin(env: dict[str, str], sandbox: Path, url: str) -> None:
    infile, outfile = sandbox / ".in", sandbox / ".out"
    infile.write_text(f'[ Url = "{url}"; LocalFileName = "{sandbox}/disk" ]')
    outfile.write_bytes(b" " * PREALLOCATED)
    subprocess.run([REPO / "plugins/apppot_plugin", "-infile", infile, "-outfile", outfile], env=env, check=True)
    (sandbox / "disk").unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: the fetch service drops root as condor_master starts it", file=sys.stderr)
        return 2
    base = make_base(1)
    sha = sha256_file(base)
    work = Path(tempfile.mkdtemp(prefix="apppot-bench-cache-"))
    work.chmod(0o755)
    nginx = Nginx(work / "nginx", rate="0")
    try:
        os.symlink(base, nginx.www / "img.raw")
        url = f"apppot://img?sha256={sha}&from={nginx.url('img.raw').replace(':', '%3A').replace('/', '%2F')}&format=uml-cow"
        sandbox = work / "sandbox"
        sandbox.mkdir()
        times: dict[str, list[float]] = {"naive: GET per job": [], "cold node": [], "warm node": [],
                                         "resident image (for reference)": []}  # fmt: skip
        for _ in range(args.reps):
            t0 = time.perf_counter()
            with urllib.request.urlopen(nginx.url("img.raw")) as resp, open(sandbox / "copy", "wb") as f:
                shutil.copyfileobj(resp, f, 1 << 20)
            times["naive: GET per job"].append(time.perf_counter() - t0)
            (sandbox / "copy").unlink()

            root = work / "cache"
            shutil.rmtree(root, ignore_errors=True)
            service = Service(root)
            try:
                env = {**service.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                       "APPPOT_IMAGE_PATH": os.fspath(base.parent)}  # as 50-apppot.conf sets it: no bindings  # fmt: skip
                t0 = time.perf_counter()
                run_plugin(env, sandbox, url)
                times["cold node"].append(time.perf_counter() - t0)
                for _ in range(3):
                    t0 = time.perf_counter()
                    run_plugin(env, sandbox, url)
                    times["warm node"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    run_plugin(env, sandbox, f"apppot://{base.stem}?format=uml-cow")
                    times["resident image (for reference)"].append(time.perf_counter() - t0)
            finally:
                service.stop()
        gets = len(nginx.gets("img.raw"))
    finally:
        nginx.stop()
        shutil.rmtree(work, ignore_errors=True)
    naive = statistics.median(times["naive: GET per job"])
    out = [SECTION, "",
           f"`{' '.join(sys.argv)}` ({datetime.date.today()}, {args.reps} rounds, load average "
           f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): a 1 GiB image from nginx on 127.0.0.1 into "
           f"a job's sandbox ({gets} GETs in nginx's log for {args.reps} naive + {args.reps} cold rounds).", "",
           "| per job | median (s) | vs a GET per job |", "|---|---|---|"]  # fmt: skip
    for name, ts in times.items():
        med = statistics.median(ts)
        out.append(f"| {name} | {med:.3f} | {med / naive:.3g}x |")
    out += ["", "Over a network the naive and cold rows grow with the image's transfer time; the warm row does "
            "not: the plugin's process start-up, one socket round trip and a sparse COW file (the resident row "
            "is the same without the round trip)."]  # fmt: skip
    text = "\n".join(out) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
