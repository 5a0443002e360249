"""The only module that starts processes: spawn()/capture() for short commands that must succeed,
run() for ones whose failure the caller handles, supervise() for VMs, run_as_user() to drop root."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from apppot.errors import ApppotError

# `apppot --debug` shows the commands it runs. Not the logging module: importing it (traceback,
# linecache, tokenize, threading) cost every launch ~3 ms, for four debug lines.
DEBUG = False


def debug(message: str) -> None:
    if DEBUG:
        print(f"apppot: {message}", file=sys.stderr, flush=True)


def _describe_failure(argv: Sequence[str], returncode: int, output: str) -> ApppotError:
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
    tail = "\n".join(output.strip().splitlines()[-15:])
    return ApppotError(f"{shlex.join(argv)} failed ({how})" + (f":\n{tail}" if tail else ""))


def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run a short command; raise ApppotError with its output if it fails."""
    capture(argv, env=env, cwd=cwd)


def capture(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a short command and return its stdout; raise ApppotError with its output if it fails."""
    debug(f"+ {shlex.join(argv)}")
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=cwd)
    except FileNotFoundError:
        raise ApppotError(f"command not found: {argv[0]}", hint="run `apppot check` to see what is missing") from None
    if res.returncode != 0:
        raise _describe_failure(argv, res.returncode, res.stdout + res.stderr)
    return res.stdout


def run(argv: Sequence[str], *, timeout_s: float, cwd: Path | str | None = None) -> tuple[int, str]:
    """Run a short command whose failure the caller handles: (exit code, stdout + stderr). No core
    files. Raises ApppotError only when it cannot be started or runs past timeout_s."""
    debug(f"+ {shlex.join(argv)}")
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", cwd=cwd, timeout=timeout_s,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))  # fmt: skip
    except FileNotFoundError:
        raise ApppotError(f"command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise ApppotError(f"{shlex.join(argv)} did not finish within {timeout_s:g} s") from None
    return res.returncode, res.stdout


def run_as_user(uid: int, gid: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn() in a forked child with only the given uid/gid (no supplementary groups, no way back); its
    JSON-able result comes back through a pipe, {"error": ...} if the child gave none. A root
    process uses it so that its rights never touch a path a job controls (condor/libvirt_xml.py)."""
    import json

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, then work
        code = 0
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            data = json.dumps(fn()).encode()
            with os.fdopen(w, "wb") as out:
                out.write(data)
        except BaseException:  # noqa: BLE001 -- the parent reports a child without an answer
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    try:
        return dict(json.loads(data))
    except ValueError:
        return {"error": "internal error: the unprivileged helper process gave no answer"}


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is `pgid` (UML forks many host processes; they all stay in it)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def kill_group(pgid: int, *, deadline_s: float = 5.0) -> None:
    """SIGKILL every process of the group until none is left; raise if one survives the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        left = group_members(pgid)
        if not left:
            return
        if time.monotonic() > end:
            raise ApppotError(f"processes {left} of the VM survived SIGKILL", hint="report this as a bug")
        time.sleep(0.01)


class DirReaper:
    """A child that removes `path` once this process is gone, whatever the way: a SIGKILLed apppot
    cannot run its own clean-up, and the run dir holds the guest's private root-disk layer (as large
    as the guest wrote). The child waits for EOF on a pipe only this process can write to (the write
    end is close-on-exec: the VM does not inherit it), in its own session so that a signal to apppot's
    process group does not take it along."""

    def __init__(self, path: Path) -> None:
        r, self._w = os.pipe()
        try:
            self._child = subprocess.Popen(
                ["/bin/sh", "-c", 'read -r _; [ ! -e "$1" ] || exec rm -rf -- "$1"', "apppot-reaper", os.fspath(path)],
                stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        except OSError:
            os.close(self._w)
            raise
        finally:
            os.close(r)

    def release(self) -> None:
        """This process cleaned up itself: let the child go (it removes whatever is left) and reap it."""
        os.close(self._w)
        self._child.wait()


_PR_SET_PDEATHSIG = 1


def _vm_child_setup() -> None:
    # A guest kernel panic makes UML abort; its core file (~130 MB) must not land in a job sandbox.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # If apppot itself is SIGKILLed (the batch system's last resort), the VM must die with it: it runs
    # in its own session, so nothing else would reach it.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def supervise(
    argv: Sequence[str],
    *,
    log_path: Path,
    walltime_s: float | None,
    polite_stop: Callable[[int], None],
    grace_s: float = 30.0,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    cwd: Path | None = None,
    on_tick: Callable[[], None] | None = None,
) -> tuple[int, bool, bool]:
    """Run a VM to completion; return (returncode, timed_out, interrupted).

    The VM gets its own process group. Walltime or an interruption (SIGINT, or SIGTERM turned into
    KeyboardInterrupt by the CLI) asks the guest to stop politely, waits `grace_s`, then kills the
    whole group. Whatever happens, no process of the group is left when this returns.
    """
    debug(f"+ {shlex.join(argv)}")
    # O_NOFOLLOW: the log lives in the job dir, where the guest of an earlier run may have left a symlink
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "ab") as out:
        try:
            vm = subprocess.Popen(argv, stdin=stdin, stdout=stdout if stdout is not None else out,
                                  stderr=out, env=env, pass_fds=pass_fds, cwd=cwd, start_new_session=True,
                                  preexec_fn=_vm_child_setup)  # fmt: skip
        except OSError as e:
            raise ApppotError(f"cannot start {argv[0]}: {e.strerror}") from None
    deadline = None if walltime_s is None else time.monotonic() + walltime_s
    timed_out = interrupted = False
    try:
        try:
            while vm.poll() is None:
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    break
                if on_tick:
                    on_tick()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    vm.wait(timeout=0.05)
        except KeyboardInterrupt:
            interrupted = True
        if vm.poll() is None:
            _stop(vm, polite_stop, grace_s)
    except KeyboardInterrupt:  # a second signal during the polite stop: no more grace
        interrupted = True
    finally:
        if vm.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(vm.pid, signal.SIGKILL)
        vm.wait()
        kill_group(vm.pid)  # UML's helper processes outlive the main one if it was killed
    return vm.returncode, timed_out, interrupted


def _stop(vm: subprocess.Popen[bytes], polite_stop: Callable[[int], None], grace_s: float) -> None:
    try:
        polite_stop(vm.pid)
    except Exception as e:  # a failed polite stop only means we go straight to the kill
        debug(f"polite stop failed: {e}")
    with contextlib.suppress(subprocess.TimeoutExpired):
        vm.wait(timeout=grace_s)
