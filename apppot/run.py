"""`apppot run`: set up the job dir contract, boot the backend, stream output, collect the status."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from apppot import contract, proc
from apppot.backends import Backend
from apppot.errors import ApppotError
from apppot.job import JobSpec, VmOutcome


class Tail:
    """Copies what the guest appends to a file in .apppot to one of our own streams, live.
    Only a regular file is read (contract.open_regular): a guest's symlink or FIFO yields nothing."""

    def __init__(self, ctl_fd: int, name: str, out: BinaryIO) -> None:
        self.ctl_fd, self.name, self.out, self.pos = ctl_fd, name, out, 0

    def pump(self) -> None:
        f = contract.open_regular(self.ctl_fd, self.name)
        if f is None:
            return
        with f:
            f.seek(self.pos)
            while chunk := f.read(1 << 16):
                self.out.write(chunk)
                self.pos += len(chunk)
            self.out.flush()


def prepare_job_dir(spec: JobSpec, ctl_fd: int) -> None:
    """Everything the guest init reads, written into JOBDIR/.apppot (never on the kernel command line)."""
    contract.remove(ctl_fd, ("console.log",))
    changes = stage_changes(spec, ctl_fd) if spec.changes is not None else None
    contract.write_contract(ctl_fd, uid=spec.uid, gid=spec.gid, command=spec.command, interactive=spec.interactive,
                            changes=changes, changes_force=spec.changes_force)  # fmt: skip
    if not spec.interactive and _stdin_has_data():
        fd = os.open("stdin", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=ctl_fd)
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)


def stage_changes(spec: JobSpec, ctl_fd: int) -> str:
    """The changes tarball's path relative to the job dir; outside tarballs are linked (or copied) in."""
    assert spec.changes is not None
    src = spec.changes.resolve()
    with contextlib.suppress(ValueError):
        return os.fspath(src.relative_to(spec.job_dir.resolve()))
    try:
        os.link(src, "changes.tar.gz", dst_dir_fd=ctl_fd)
    except OSError:
        with open(src, "rb") as f:
            contract.write_file(ctl_fd, "changes.tar.gz", f.read())
    return os.fspath(Path(contract.CONTROL_DIR) / "changes.tar.gz")


def _stdin_has_data() -> bool:
    """A regular file or a pipe on stdin is the job's input; a terminal or /dev/null is not."""
    try:
        st = os.fstat(0)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)


def run_job(spec: JobSpec, backend: Backend) -> VmOutcome:
    if not spec.job_dir.is_dir():
        raise ApppotError(f"job directory {spec.job_dir} does not exist")
    console = spec.control_dir / "console.log"
    # One descriptor for the whole run: the guest may rename .apppot or plant symlinks in it.
    ctl_fd = contract.open_control_dir(spec.job_dir)
    rundir = Path(tempfile.mkdtemp(prefix=f"apppot-{spec.vm_id}-"))
    try:
        reaper = proc.DirReaper(rundir)
    except OSError as e:
        rundir.rmdir()
        os.close(ctl_fd)
        raise ApppotError(f"cannot start /bin/sh to guard the run directory: {e.strerror}") from None
    if spec.disk.layer is None:  # a private writable layer, gone with the run dir
        spec = dataclasses.replace(spec, disk=dataclasses.replace(spec.disk, layer=rundir / "root.cow"))
    start = time.monotonic()
    try:
        prepare_job_dir(spec, ctl_fd)
        plan = backend.plan(spec, rundir, backend.prepare(spec, rundir))
        for path, text in plan.files:
            path.write_text(text)
        tails = [Tail(ctl_fd, "stdout", sys.stdout.buffer), Tail(ctl_fd, "stderr", sys.stderr.buffer)]

        def pump() -> None:
            for t in tails:
                t.pump()

        times = {"boot": time.time()}
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
        times["vm_exit"] = time.time()
        pump()
        status, message = contract.read_status(ctl_fd)
        with contextlib.suppress(OSError):  # (timing only: the status itself came from read_status)
            times["status"] = os.stat("status", dir_fd=ctl_fd, follow_symlinks=False).st_mtime
        outcome = VmOutcome(status, message, rc, timed_out, interrupted, console, round(time.monotonic() - start, 3),
                            {k: round(v, 4) for k, v in times.items()})  # fmt: skip
        contract.write_file(ctl_fd, "outcome.json", outcome.to_json())
        return outcome
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
        reaper.release()
        if spec.disk.discard and spec.disk.layer is not None:
            with contextlib.suppress(FileNotFoundError):
                spec.disk.layer.unlink()
        contract.remove(ctl_fd, contract.TRANSIENT)
        os.close(ctl_fd)


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
