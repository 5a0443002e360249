"""`make demo`: the main job — an AppPot job submitted to a real HTCondor pool with `apppot submit`.
A development helper beside personal-pool, not part of the installed package.

1. bring up the personal pool (scripts/personal-pool: a Debian trixie chroot running HTCondor, into
   which this checkout is installed the way an admin would: `make install`, the tiny image in
   /var/lib/apppot/images) unless it is already up;
2. `apppot submit --image tiny --wait -- ...` from the host through the htcondor2 bindings: the
   starter runs the apppot:// plugin (a UML COW layer over the node's tiny image), then
   `apppot run` boots it under User-Mode Linux as the job's user;
3. print what came back: the command's output, the file it wrote, its exit status (42).
The pool is stopped again if the demo started it (APPPOT_DEMO_KEEP_POOL=1 keeps it).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pool import POOL, pool_env  # scripts/pool.py: python puts this script's directory first

SCRIPT = 'echo "hello from $(uname -sr) as $(id -un)"; tr " " "\\n" < input.txt | sort -n > sorted.txt; exit 42'
COMMAND = ["sh", "-c", SCRIPT]


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("apppot demo: the personal HTCondor pool is a chroot: run `make demo` as root", file=sys.stderr)
        return 1
    was_up = subprocess.run([os.fspath(POOL), "status"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, check=False).returncode == 0  # fmt: skip
    say("personal HTCondor pool: " + ("up; installing this checkout" if was_up else "starting it (first time ~2 min)"))
    subprocess.run([os.fspath(POOL), "up"], check=True)
    try:
        env = pool_env()
        job_dir = Path(env["SHARED_DIR"]) / f"demo.{os.getpid()}.{int(time.time())}"
        job_dir.mkdir(parents=True)
        (job_dir / "input.txt").write_text("3 1 2\n")
        uid = int(env.get("TEST_UID", "2000"))
        for p in (job_dir, job_dir / "input.txt"):
            os.chown(p, uid, uid)  # jobs run as the pool's test user

        argv = [sys.executable, "-m", "apppot", "submit", "--image", "tiny", "--input", "input.txt",
                "--job-dir", os.fspath(job_dir), "--wait", "--timeout", "300", "--", *COMMAND]  # fmt: skip
        say("apppot submit --image tiny --input input.txt --wait -- " + shlex.join(COMMAND))
        t0 = time.monotonic()
        status = subprocess.call(argv, env=env)
        wall = time.monotonic() - t0
        say(f"what came back to {job_dir} ({wall:.1f} s from submit to done)")
        for out in sorted(job_dir.glob("apppot.*.out")):
            print(f"{out.name}: {out.read_text()}", end="")
        sorted_txt = job_dir / "sorted.txt"
        print(f"sorted.txt written by the job: {sorted_txt.read_text().split() if sorted_txt.exists() else 'MISSING'}")
        print(f"exit status of the job: {status}")
        return 0 if status == 42 and sorted_txt.exists() else 1
    finally:
        if not was_up and os.environ.get("APPPOT_DEMO_KEEP_POOL") != "1":
            say("stopping the pool the demo started (APPPOT_DEMO_KEEP_POOL=1 keeps it)")
            subprocess.run([os.fspath(POOL), "down"], check=False)


if __name__ == "__main__":
    sys.exit(main())
