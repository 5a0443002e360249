"""Images on demand: time to first job for a 1 GiB image fetched by URL on a cold node (its cache lacks
the entry) vs a warm node (the entry is there), the naive way (HTCondor's own curl plugin downloads the
image into every job's sandbox), and 50 jobs through the pool's two execute points, plain vs apppot,
in jobs per minute, end to end through HTCondor (bench/imagecache.py measures the staging alone).
Writes the "## Images on demand through the pool's two execute points" section of docs/performance.md.

    python bench/imagecache_pool.py [--runs 3] [--jobs 50] [--no-write]     (root: it brings the pool up)
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
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(REPO))
sys.path.insert(0, os.fspath(REPO / "bench"))
sys.path.insert(0, os.fspath(REPO / "scripts"))

from perfdoc import write_section  # noqa: E402
from pool import POOL, pool_env  # noqa: E402

from tests.httpserver import Nginx  # noqa: E402

SECTION = "## Images on demand through the pool's two execute points"
TEMPLATE = REPO / "submit_templates" / "apppot-vanilla.sub"
GIB = 1 << 30


def make_image(tiny: Path, out: Path, size: int) -> str:
    """The tiny image grown to SIZE with random bytes after its file system (so nothing is sparse and
    nothing compresses), world-readable; returns its sha256."""
    h = hashlib.sha256()
    with tiny.open("rb") as src, out.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            h.update(chunk)
        left = size - dst.tell()
        while left > 0:
            chunk = os.urandom(min(left, 1 << 20))
            dst.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    out.chmod(0o644)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="cold/warm/naive first jobs each")
    ap.add_argument("--jobs", type=int, default=50, help="jobs per throughput batch")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/imagecache_pool.py: the personal pool is a chroot: run as root")
    was_up = subprocess.run([os.fspath(POOL), "status"], stdout=subprocess.DEVNULL, check=False).returncode == 0
    subprocess.run([os.fspath(POOL), "up"], check=True)
    env = pool_env()
    root, shared, uid = Path(env["CONDOR_ROOT"]), Path(env["SHARED_DIR"]), int(env.get("TEST_UID", "2000"))
    caches = {"nodea": root / "var/lib/apppot/cache", "nodeb": root / "var/lib/apppot/nodeb/cache"}
    work = shared / f"bench-imagecache.{os.getpid()}"
    rows: dict[str, list[float]] = {"cold": [], "warm": [], "naive": []}
    rates: dict[str, tuple[float, dict[str, int]]] = {}
    digest = ""
    load_before = os.getloadavg()[0]
    try:
        os.environ.clear()
        os.environ.update(env)
        import htcondor2

        htcondor2.reload_config()
        schedd = htcondor2.Schedd()

        def job_dir() -> Path:
            d = work / f"job.{time.time_ns()}"
            d.mkdir(parents=True)
            os.chown(d, uid, uid)
            return d

        def submit(desc: str, count: int = 1) -> int:
            return schedd.submit(htcondor2.Submit(desc + f"\nqueue {count}\n")).cluster()

        def wait(cluster: int, count: int, t0: float, timeout_s: float = 1800) -> tuple[float, list]:
            """Seconds from t0 until all COUNT jobs completed; their history ads."""
            while True:
                ads = schedd.query(f"ClusterId == {cluster}", projection=["JobStatus", "HoldReason"])
                if not ads or all(ad.get("JobStatus") == 4 for ad in ads):
                    elapsed = time.perf_counter() - t0
                    break
                held = [ad for ad in ads if ad.get("JobStatus") in (3, 5)]
                if held:
                    schedd.act(htcondor2.JobAction.Remove, f"ClusterId == {cluster}", "bench failed")
                    raise SystemExit(f"bench job {cluster} held/removed: {held[0].get('HoldReason')}")
                if time.perf_counter() - t0 > timeout_s:
                    raise SystemExit(f"bench cluster {cluster} not done within {timeout_s} s")
                time.sleep(0.1)
            for _ in range(120):
                hist = list(schedd.history(f"ClusterId == {cluster}", ["ExitCode", "LastRemoteHost"], count))
                if len(hist) >= count:
                    break
                time.sleep(0.25)
            bad = [h for h in hist if h.get("ExitCode") != 0]
            if len(hist) < count or bad:
                raise SystemExit(f"bench cluster {cluster} failed: {bad[:1] or 'not all in the history'}")
            return elapsed, hist

        def template(d: Path, variables: dict[str, str], node: str | None) -> str:
            text = TEMPLATE.read_text().rstrip()
            pin = [f'requirements = $(requirements) && PoolNode =?= "{node}"'] if node else []
            lines = [f"initialdir = {d}", *(f"{k} = {v}" for k, v in variables.items()), text[: -len("queue")], *pin]
            return "\n".join(lines)

        work.mkdir(mode=0o755)
        server = Nginx(work / "nginx")
        try:
            print("making the 1 GiB image", flush=True)
            image = server.www / "big.img"
            digest = make_image(root / "var/lib/apppot/images/tiny.img", image, GIB)
            url = urllib.parse.quote(server.url("big.img"), safe="")
            cmd = "/bin/true"
            by_url = {"image": "big", "image_sha256": digest, "image_url": url, "cmd": cmd, "mem": "128"}

            def evict(node: str) -> None:
                # cold = the entry is absent: what an admin's rm does (the service keeps no other state)
                for p in (caches[node] / "sha256" / digest, caches[node] / "meta" / f"{digest}.json"):
                    p.unlink(missing_ok=True)

            def first_job(kind: str, node: str) -> float:
                d = job_dir()
                if kind == "naive":
                    # HTCondor's curl plugin copies the image into the sandbox; apppot boots that copy
                    desc = "\n".join([
                        f"initialdir = {d}", "universe = vanilla", "executable = $$(APPPOT_LAUNCHER)",
                        "transfer_executable = false", f"transfer_input_files = {server.url('big.img')}",
                        "should_transfer_files = YES", "when_to_transfer_output = ON_EXIT",
                        f'arguments = "run --image big.img --discard-disk --mem 128M -- {cmd}"',
                        "request_memory = 192", "request_disk = 2GB", "output = out", "error = err", "log = log",
                        f'requirements = HasAppPot =?= True && PoolNode =?= "{node}"'])  # fmt: skip
                else:
                    desc = template(d, by_url, node) + "\nlog = log"
                t0 = time.perf_counter()
                return wait(submit(desc), 1, t0)[0]

            # warm-up: a plain job claims a slot on each node, page cache for the tools
            for node in caches:
                d = job_dir()
                t0 = time.perf_counter()
                wait(submit(f'initialdir = {d}\nexecutable = /bin/true\ntransfer_executable = false\nlog = log\n'
                            f'requirements = PoolNode =?= "{node}"'), 1, t0)  # fmt: skip
            for i in range(args.runs):
                for kind in ("cold", "warm", "naive"):
                    if kind == "cold":
                        evict("nodea")
                    t = first_job(kind, "nodea")
                    rows[kind].append(t)
                    print(f"run {i + 1}/{args.runs} {kind:5} {t:7.2f} s", flush=True)

            # throughput: both caches warm, jobs free to go to either node
            first_job("warm", "nodeb")
            for kind in ("plain", "apppot"):
                d = job_dir()
                if kind == "plain":
                    desc = "\n".join([f"initialdir = {d}", "executable = /bin/true", "transfer_executable = false",
                                      "should_transfer_files = YES", "request_memory = 192", "request_disk = 1GB",
                                      "output = out.$(Process)", "error = err.$(Process)", "log = log"])  # fmt: skip
                else:
                    desc = template(d, by_url, None) + "\nlog = log"
                t0 = time.perf_counter()
                elapsed, hist = wait(submit(desc, args.jobs), args.jobs, t0)
                nodes: dict[str, int] = {}
                for h in hist:
                    parts = str(h.get("LastRemoteHost", "")).split("@")
                    n = parts[1] if len(parts) == 3 else "?"
                    nodes[n] = nodes.get(n, 0) + 1
                rates[kind] = (args.jobs / elapsed * 60, nodes)
                print(f"{args.jobs} {kind} jobs: {elapsed:.1f} s, {rates[kind][0]:.1f} jobs/min, {nodes}", flush=True)
            downloads = len([ln for ln in server.gets("big.img") if '" 200 ' in ln or '" 206 ' in ln])
        finally:
            server.stop()
    finally:
        if digest:  # the bench's image leaves the nodes' caches as an admin would remove it
            for cache in caches.values():
                for p in (cache / "sha256" / digest, cache / "meta" / f"{digest}.json"):
                    p.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        if not was_up:
            subprocess.run([os.fspath(POOL), "down"], check=False)

    load_after = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in rows.items()}
    today = datetime.date.today().isoformat()
    table = "\n".join(f"| {label} | **{med[k]:.2f} s** | {min(rows[k]):.2f}–{max(rows[k]):.2f} s | "
                      f"{' '.join(f'{t:.2f}' for t in rows[k])} |"
                      for k, label in (("cold", "cold node (entry absent: download 1 GiB, verify, stage)"),
                                       ("warm", "warm node (entry cached: stage only)"),
                                       ("naive", "naive: HTCondor's curl plugin copies the image into the sandbox")))  # fmt: skip
    text = f"""{SECTION}

`bench/imagecache_pool.py` ({today}, {args.runs} runs each, personal pool of `scripts/personal-pool` with its two
execute points, HTCondor in a trixie chroot; image served by nginx on 127.0.0.1). Time from
`Schedd.submit()` until the schedd reports the job completed, for one `/bin/true` job from
`apppot-vanilla.sub` with `image_url`/`image_sha256` pinned to node A: a 1 GiB raw image (the tiny image
plus random bytes). Host load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on 2 cores.

| first job | median | range | runs |
|---|---|---|---|
{table}

A warm node starts the job **{med['cold'] / med['warm']:.1f}x** sooner than a cold one (cold − warm =
{med['cold'] - med['warm']:.2f} s: the download and its streaming sha256); the naive way pays a full copy
per job, every job ({med['naive'] / med['warm']:.1f}x the warm node's time). End to end these times are
quantised by HTCondor's 1 s scheduling ticks, and on 127.0.0.1 a 1 GiB copy costs about a second: over a
real network the naive way's copy (and only the cold node's first download) grows with the image.
`bench/imagecache.py` times the staging itself, without HTCondor.

{args.jobs} jobs submitted at once, free to run on either node (both caches warm; 8 slots per node):

| jobs | jobs/minute | ran on |
|---|---|---|
| plain `/bin/true` | **{rates['plain'][0]:.1f}** | {', '.join(f'{n}: {c}' for n, c in sorted(rates['plain'][1].items()))} |
| apppot (URL image, cached) | **{rates['apppot'][0]:.1f}** | {', '.join(f'{n}: {c}' for n, c in sorted(rates['apppot'][1].items()))} |

nginx served the image {downloads} times in the whole run ({args.runs} cold runs, {args.runs} naive
jobs, node B's first job): no apppot job after the first on a node downloaded anything.

Reproduce: `flock /tmp/apppot-pool.lock .venv/bin/python bench/imagecache_pool.py` (root).
"""
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
