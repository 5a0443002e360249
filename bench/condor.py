"""What apppot adds to an HTCondor job: submit-to-completion time of a plain vanilla /bin/true job vs
the same command as an AppPot job (apppot:// plugin + `apppot run` under UML), in the same personal
pool, interleaved, medians of one run. Writes the "## HTCondor jobs" section of docs/performance.md
(the default 23.x pool only) and its row in "## HTCondor jobs by HTCondor version" (any pool).

    python bench/condor.py [--runs 7] [--no-write]        (root: it brings the personal pool up)
    CONDOR_SUITE=sid .venv.25/bin/python bench/condor.py   (the 25.x pool: make bench-condor-25)
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(REPO))
sys.path.insert(0, os.fspath(REPO / "bench"))
sys.path.insert(0, os.fspath(REPO / "scripts"))

from perfdoc import write_section  # noqa: E402
from pool import POOL, pool_env  # noqa: E402
SECTION = "## HTCondor jobs"
BY_VERSION = "## HTCondor jobs by HTCondor version"
TARGET_S = 0.8  # issue 15: the added time vs a plain job in the same pool, median


# What the starter logs (with D_SUB_SECOND: scripts/personal-pool) at the end of each phase of a job.
PHASE_MARKS = [
    ("", "** condor_starter (CONDOR_STARTER) STARTING UP"),
    ("starter start-up", "Set filetransfer runtime ads"),
    ("input transfer (apppot: the plugin)", "File transfer completed successfully."),
    ("job set-up", "Create_Process succeeded"),
    ("job (apppot: `apppot run`)", "Process exited"),
    ("output transfer, starter exit", "All jobs have exited... starter exiting"),
]


def starter_phases(log_dir: Path, cluster: int) -> dict[str, float] | None:
    """Seconds each phase of job CLUSTER.0 took on the execute point, from its starter's log; None
    without sub-second time stamps."""
    stamp = re.compile(r"^(\d\d/\d\d/\d\d \d\d:\d\d:\d\d\.\d+) \(pid:(\d+)\) (.*)$")
    for log in log_dir.glob("StarterLog.slot*"):
        lines = log.read_text(errors="replace").splitlines()
        hit = next((i for i, ln in enumerate(lines) if f"universe job with ID: {cluster}.0" in ln), None)
        if hit is None or not stamp.match(lines[hit]):
            continue
        pid = stamp.match(lines[hit]).group(2)
        first = max(i for i in range(hit) if f"(pid:{pid}) " in lines[i] and PHASE_MARKS[0][1] in lines[i])
        seen: list[float] = []
        for ln in lines[first:]:
            m = stamp.match(ln)
            if m and m.group(2) == pid and PHASE_MARKS[len(seen)][1] in m.group(3):
                seen.append(datetime.datetime.strptime(m.group(1), "%m/%d/%y %H:%M:%S.%f").timestamp())
                if len(seen) == len(PHASE_MARKS):
                    return {name: t - t0 for (name, _), t0, t in zip(PHASE_MARKS[1:], seen, seen[1:])}
    return None


def run_one(htcondor2, schedd, desc, timeout_s: float = 120) -> tuple[float, int]:
    """Seconds from submit() until the schedd says the job completed (status 4 or left the queue),
    and the job's cluster."""
    t0 = time.perf_counter()
    cluster = schedd.submit(desc if isinstance(desc, htcondor2.Submit) else htcondor2.Submit(desc)).cluster()
    deadline = t0 + timeout_s
    while True:
        ads = schedd.query(f"ClusterId == {cluster}", projection=["JobStatus", "HoldReason"])
        if not ads or ads[0].get("JobStatus") == 4:
            elapsed = time.perf_counter() - t0
            break
        if ads[0].get("JobStatus") in (3, 5):
            raise SystemExit(f"bench job {cluster} held/removed: {ads[0].get('HoldReason')}")
        if time.perf_counter() > deadline:
            raise SystemExit(f"bench job {cluster} did not finish within {timeout_s} s")
        time.sleep(0.05)
    hist = []
    for _ in range(40):
        hist = list(schedd.history(f"ClusterId == {cluster}", ["ExitCode"], 1))
        if hist:
            break
        time.sleep(0.25)
    if not hist or hist[0].get("ExitCode") != 0:
        raise SystemExit(f"bench job {cluster} failed: {hist[0] if hist else 'not in history'}")
    return elapsed, cluster


def pool_condor_version() -> str:
    """The pool's HTCondor version, e.g. "23.9.6", as its condor_version says."""
    out = subprocess.run([os.fspath(POOL), "in-pool", "condor_version"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return out.split()[1] if out.startswith("$CondorVersion:") else out.strip()


def by_version_section(version: str, suite: str, row: str) -> str:
    """The per-version table with this pool's row replaced (rows of other suites kept)."""
    import re

    from perfdoc import DOC

    doc = DOC.read_text() if DOC.exists() else ""
    m = re.search(rf"^{re.escape(BY_VERSION)}\n(.*?)(?=^## |\Z)", doc, re.DOTALL | re.MULTILINE)
    rows = [r for r in (m.group(1) if m else "").splitlines()
            if r.startswith("| ") and not r.startswith(("| HTCondor", "|---")) and f"({suite})" not in r]
    rows = sorted([*rows, row], key=lambda r: [int(x) for x in re.findall(r"\d+", r.split("|")[1])[:3]])
    return f"""{BY_VERSION}

apppot's added time per vanilla job on each HTCondor series this project is tested on: the medians of
`bench/condor.py` (see "HTCondor jobs" for the method) against the personal pool of that series.
The pools cannot run at once (same ports), so each row is its own run on a shared 2-core machine:
compare the two jobs within a row, not rows with each other.

| HTCondor (Debian suite) | plain job | apppot job | apppot adds | date | reproduce |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/condor.py: the personal pool is a chroot: run as root")
    was_up = subprocess.run([os.fspath(POOL), "status"], stdout=subprocess.DEVNULL, check=False).returncode == 0
    subprocess.run([os.fspath(POOL), "up"], check=True)
    try:
        env = pool_env()
        version = pool_condor_version()
        os.environ.clear()
        os.environ.update(env)
        import htcondor2

        from apppot import submit as apppot_submit

        htcondor2.reload_config()
        schedd = htcondor2.Schedd()
        shared, uid = Path(env["SHARED_DIR"]), int(env.get("TEST_UID", "2000"))

        def job_dir() -> Path:
            d = shared / f"bench.{os.getpid()}.{time.time_ns()}"
            d.mkdir()
            os.chown(d, uid, uid)
            return d

        def plain() -> dict[str, str]:
            return {"executable": "/bin/true", "transfer_executable": "false", "should_transfer_files": "YES",
                    "when_to_transfer_output": "ON_EXIT", "output": "out", "error": "err", "log": "log",
                    # the same request as the apppot job: otherwise only one of the two can reuse
                    # the other's claimed slot, and the comparison measures a negotiation cycle
                    "request_memory": "192", "request_disk": "1GB",  # = apppot-vanilla.sub's for mem=128
                    "initialdir": os.fspath(job_dir())}  # fmt: skip

        def apppot():
            return apppot_submit.build_submit(image="tiny", command=["/bin/true"], universe="vanilla",
                                              memory_mib=128, inputs=[], changes=None, job_dir=job_dir())  # fmt: skip

        load_before = os.getloadavg()[0]
        run_one(htcondor2, schedd, plain())  # warm-up: first match, shadow/starter start, page cache
        run_one(htcondor2, schedd, apppot())
        times: dict[str, list[float]] = {"plain": [], "apppot": []}
        phases: dict[str, list[dict[str, float]]] = {"plain": [], "apppot": []}
        log_dir = Path(env.get("CONDOR_ROOT", "/"), "var/log/condor")
        for i in range(args.runs):
            for name, make in (("plain", plain), ("apppot", apppot)):
                t, cluster = run_one(htcondor2, schedd, make())
                times[name].append(t)
                p = starter_phases(log_dir, cluster)
                if p:
                    phases[name].append(p)
                print(f"run {i + 1}/{args.runs} {name:6} {t:6.2f} s", flush=True)
    finally:
        if not was_up:
            subprocess.run([os.fspath(POOL), "down"], check=False)

    load_after = os.getloadavg()[0]
    suite = env.get("CONDOR_SUITE", "trixie")
    med = {k: statistics.median(v) for k, v in times.items()}
    added = med["apppot"] - med["plain"]
    phase_rows = ""
    if phases["plain"] and phases["apppot"]:
        names = [n for n, _ in PHASE_MARKS[1:]]
        pm = {k: {n: statistics.median(p[n] for p in v) for n in names} for k, v in phases.items()}
        phase_rows = "\n".join(f"| {n} | {pm['plain'][n]:.3f} | {pm['apppot'][n]:.3f} | {pm['apppot'][n] - pm['plain'][n]:+.3f} |"
                                for n in names)  # fmt: skip
        node = sum(pm["apppot"].values()) - sum(pm["plain"].values())
        phase_rows = f"""
Where the time goes on the execute point (medians, s; from the starter's log with D_SUB_SECOND time
stamps: each phase ends at the starter's log line for it). The rest of a job's time is the schedd's,
the negotiator's and the shadow's, the same for both jobs but for HTCondor's 1 s ticks.

| phase | plain | apppot | apppot − plain |
|---|---|---|---|
{phase_rows}
| **on the execute point** | {sum(pm['plain'].values()):.3f} | {sum(pm['apppot'].values()):.3f} | **{node:+.3f}** |
"""
    installed = Path(env.get("CONDOR_ROOT", "/"), env.get("APPPOT_PREFIX", "/usr/local").lstrip("/"), "lib/apppot/linux")
    kernel_note = ("apppot's UML kernel" if installed.exists()
                   else "Debian's packaged UML kernel (apppot's own kernel not installed: ~1.4 s slower boot)")  # fmt: skip
    rows = "\n".join(
        f"| {name} | **{med[name]:.2f} s** | {min(v):.2f}–{max(v):.2f} s | {' '.join(f'{x:.2f}' for x in v)} |"
        for name, v in times.items()
    )
    text = f"""{SECTION}

`bench/condor.py` ({datetime.date.today()}, {args.runs} interleaved runs each after one warm-up, personal pool of
`scripts/personal-pool`: HTCondor {version} in a {suite} chroot, scheduling intervals at 1 s). Time from
`Schedd.submit()` on the host until the schedd reports the job completed. "plain" is a vanilla
`/bin/true`; "apppot" is `apppot submit --image tiny -- /bin/true`: the apppot:// plugin stages a UML COW
layer, `apppot run --mem 128M` boots the tiny image under UML ({kernel_note}) and runs `/bin/true`.
Host load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} cores: the numbers
are only as quiet as the machine.

| job | median | range | runs |
|---|---|---|---|
{rows}

**apppot adds {added:.2f} s** per job (target < {TARGET_S:.1f} s: {'met' if added < TARGET_S else 'NOT met'}).
{phase_rows}
Both jobs request the same memory and disk, so each reuses the slot the previous one claimed. Inside
the node the apppot job adds the plugin (run twice by the starter, `-classad` then the transfer, each
mostly Python start-up) and `apppot run` (~0.3 s with apppot's UML kernel, 1.5 s with Debian's: see
"Boot"); the rest is HTCondor's extra file-transfer step and its 1 s scheduling ticks.
A VM-universe job (submit_templates/apppot-vm.sub, TCG) takes ~80 s whatever the guest does: the
starter polls the VM every VM_STATUS_INTERVAL, which HTCondor forces to >= 30 s (the guest itself
boots, runs and powers off in ~4–8 s).
"""
    cmd = "make bench" if suite == "trixie" else f"CONDOR_SUITE={suite} .venv.25/bin/python bench/condor.py"
    row = (f"| {version} ({suite}) | {med['plain']:.2f} s | {med['apppot']:.2f} s | **{added:.2f} s** "
           f"| {datetime.date.today()} | `{cmd}` |")
    print(text if suite == "trixie" else "", row, sep="\n")
    if not args.no_write:
        if suite == "trixie":  # the section describes the default pool; other series add their row
            write_section(SECTION, text)
        write_section(BY_VERSION, by_version_section(version, suite, row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
