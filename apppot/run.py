"""`apppot run`: set up the job dir contract, boot the backend, stream output, collect the status."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from apppot import proc
from apppot.backends import Backend
from apppot.errors import ApppotError
from apppot.job import JobSpec, VmOutcome

# Files of the host<->guest contract that only matter during the run (see guest/apppot-init).
TRANSIENT = ("params", "argv", "stdin", "stdout", "stderr", "status", "changes.tar.gz")


class Tail:
    """Copies what the guest appends to a file in the job dir to one of our own streams, live."""

    def __init__(self, path: Path, out: BinaryIO) -> None:
        self.path, self.out, self.pos = path, out, 0

    def pump(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.pos)
            while chunk := f.read(1 << 16):
                self.out.write(chunk)
                self.pos += len(chunk)
            self.out.flush()


def write_contract(spec: JobSpec) -> None:
    """Everything the guest init reads, written into JOBDIR/.apppot (never on the kernel command line)."""
    ctl = spec.control_dir
    ctl.mkdir(exist_ok=True)
    for name in TRANSIENT + ("console.log", "outcome.json"):
        with contextlib.suppress(FileNotFoundError):
            (ctl / name).unlink()  # a stale status from an earlier run must never be taken for this one's
    params = {"APPPOT_UID": spec.uid, "APPPOT_GID": spec.gid, "APPPOT_INTERACTIVE": int(spec.interactive)}
    if spec.changes is not None:
        params["APPPOT_CHANGES"] = stage_changes(spec)
        if spec.changes_force:
            params["APPPOT_CHANGES_FORCE"] = 1
    (ctl / "params").write_text("".join(f"{k}={shlex.quote(str(v))}\n" for k, v in params.items()))
    if spec.command is not None:
        # Sourced by the guest's sh: `set -- 'a' 'b c'`. shlex.quote survives spaces, quotes, newlines, UTF-8.
        (ctl / "argv").write_text("set -- " + " ".join(shlex.quote(a) for a in spec.command) + "\n")
    if not spec.interactive and _stdin_has_data():
        with open(ctl / "stdin", "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)


def stage_changes(spec: JobSpec) -> str:
    """The changes tarball's path relative to the job dir; outside tarballs are linked (or copied) in."""
    assert spec.changes is not None
    src = spec.changes.resolve()
    with contextlib.suppress(ValueError):
        return os.fspath(src.relative_to(spec.job_dir))
    dest = spec.control_dir / "changes.tar.gz"
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
    return os.fspath(dest.relative_to(spec.job_dir))


def _stdin_has_data() -> bool:
    """A regular file or a pipe on stdin is the job's input; a terminal or /dev/null is not."""
    try:
        st = os.fstat(0)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)


def read_status(ctl: Path) -> tuple[int | None, str]:
    try:
        lines = (ctl / "status").read_text(errors="replace").splitlines()
        status = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None, ""
    return (status if 0 <= status <= 255 else None), "\n".join(lines[1:]).strip()


def run_job(spec: JobSpec, backend: Backend) -> VmOutcome:
    if not spec.job_dir.is_dir():
        raise ApppotError(f"job directory {spec.job_dir} does not exist")
    ctl = spec.control_dir
    console = ctl / "console.log"
    rundir = Path(tempfile.mkdtemp(prefix=f"apppot-{spec.vm_id}-"))
    if spec.disk.layer is None:  # a private writable layer, gone with the run dir
        spec = dataclasses.replace(spec, disk=dataclasses.replace(spec.disk, layer=rundir / "root.cow"))
    start = time.monotonic()
    try:
        write_contract(spec)
        backend.prepare(spec, rundir)
        plan = backend.plan(spec, rundir)
        for path, text in plan.files:
            path.write_text(text)
        tails = [Tail(ctl / "stdout", sys.stdout.buffer), Tail(ctl / "stderr", sys.stderr.buffer)]

        def pump() -> None:
            for t in tails:
                t.pump()

        rc, timed_out, interrupted = proc.supervise(
            plan.argv,
            log_path=console,
            walltime_s=spec.walltime_s,
            polite_stop=backend.polite_stop(spec, rundir),
            grace_s=spec.grace_s,
            env={**os.environ, **plan.env},
            stdin=None if spec.interactive else subprocess.DEVNULL,
            stdout=sys.stdout.fileno() if spec.interactive else None,
            cwd=rundir,
            on_tick=pump,
        )
        pump()
        status, message = read_status(ctl)
        outcome = VmOutcome(status, message, rc, timed_out, interrupted, console, round(time.monotonic() - start, 3))
        outcome.write_json(ctl / "outcome.json")
        return outcome
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
        if spec.disk.discard and spec.disk.layer is not None:
            with contextlib.suppress(FileNotFoundError):
                spec.disk.layer.unlink()
        for name in TRANSIENT:
            with contextlib.suppress(FileNotFoundError):
                (ctl / name).unlink()


def explain(outcome: VmOutcome) -> str | None:
    """A plain-language account of a run that did not end with the guest's own status."""
    if outcome.timed_out:
        return f"the job exceeded its walltime and was stopped (console log: {outcome.console_log})"
    if outcome.guest_status is None:
        how = (f"killed by signal {-outcome.vm_returncode}" if outcome.vm_returncode < 0
               else f"exit code {outcome.vm_returncode}")  # fmt: skip
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(outcome.console_log.read_text(errors="replace").splitlines()[-20:])
        why = "after a stop request" if outcome.interrupted else "(guest kernel panic or crash?)"
        return (f"the VM ended ({how}) without the guest reporting an exit status {why}; "
                f"last lines of {outcome.console_log}:\n{tail}")  # fmt: skip
    if outcome.guest_status == 125 and outcome.guest_message:
        return f"in the guest: {outcome.guest_message}"
    return None
