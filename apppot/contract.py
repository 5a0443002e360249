"""The host <-> guest contract: the files in JOBDIR/.apppot (see guest/apppot-init for the guest side).

Before boot the host writes `params` (sh assignments) and `argv` (`set -- ARG...`); the guest writes
`stdout`, `stderr` and, last, `status` (line 1: exit status 0-255, line 2: a message); the host
keeps `outcome.json` there afterwards. `apppot run` and the VM universe's domain generator write the
same files through `write_contract`, and read them back with `read_status`.

The job directory is the guest's (and, in HTCondor, the job's) to change at any time, so nothing
here trusts a name in it: `.apppot` is opened once with O_NOFOLLOW and used by descriptor after
that (a guest that swaps it for a symlink mid-run changes nothing); files are written by rename (a
symlink planted at the name is replaced, never followed) and read with O_NOFOLLOW | O_NONBLOCK,
regular files only, up to a size limit (no /dev/zero, no FIFO that blocks the host).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from apppot.errors import ApppotError

CONTROL_DIR = ".apppot"
# Written by the host for one run, and the guest's answers: removed before a run (a stale status must
# never be taken for this run's) and, except the answers apppot_vm_post still needs, after it.
TRANSIENT = ("params", "argv", "stdin", "stdout", "stderr", "status", "changes.tar.gz")
STATUS_LIMIT = 64 << 10  # the status file is two short lines; anything bigger is not ours


def open_control_dir(job_dir: Path | str, *, owner: int | None = None, replace_bad: bool = False) -> int:
    """Create JOBDIR/.apppot if needed and return a descriptor of it (close it when done).

    Refuses a `.apppot` that is a symlink or not a directory (`replace_bad`: unlink it first, which
    never follows it), and with `owner`, one owned by another uid.
    """
    job_fd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if replace_bad:
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISDIR(os.lstat(CONTROL_DIR, dir_fd=job_fd).st_mode):
                    os.unlink(CONTROL_DIR, dir_fd=job_fd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(CONTROL_DIR, 0o755, dir_fd=job_fd)
        try:
            fd = os.open(CONTROL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=job_fd)
        except OSError:
            raise ApppotError(
                f"{os.path.join(job_dir, CONTROL_DIR)} is a symlink or not a directory: apppot will not follow it",
                hint="remove it; apppot creates that directory itself",
            ) from None
    finally:
        os.close(job_fd)
    if owner is not None and os.fstat(fd).st_uid != owner:
        os.close(fd)
        raise ApppotError(f"{os.path.join(job_dir, CONTROL_DIR)} is not owned by the job's user (uid {owner})",
                          hint="remove it; apppot creates that directory itself")  # fmt: skip
    return fd


def write_file(ctl_fd: int, name: str, data: bytes | str, *, mode: int = 0o644) -> None:
    from apppot.image import write_atomically

    write_atomically(Path(name), data.encode() if isinstance(data, str) else data, mode=mode, dir_fd=ctl_fd)


def open_regular(ctl_fd: int, name: str) -> BinaryIO | None:
    """The file NAME for reading if it is a regular file (not a symlink, FIFO or device); else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=ctl_fd)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def read_file(ctl_fd: int, name: str, *, limit: int) -> bytes | None:
    f = open_regular(ctl_fd, name)
    if f is None:
        return None
    with f:
        return f.read(limit)


def remove(ctl_fd: int, names: Sequence[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(name, dir_fd=ctl_fd)  # unlink never follows a symlink


def argv_text(command: Sequence[str]) -> str:
    # Sourced by the guest's sh: `set -- 'a' 'b c'`. shlex.quote survives spaces, quotes, newlines, UTF-8.
    return "set -- " + " ".join(shlex.quote(a) for a in command) + "\n"


def write_contract(ctl_fd: int, *, uid: int, gid: int, command: Sequence[str] | None, interactive: bool = False,
                   changes: str | None = None, changes_force: bool = False) -> None:  # fmt: skip
    """Everything the guest init reads, never on the kernel command line. `changes` is the tarball's
    path relative to the job dir."""
    remove(ctl_fd, (*TRANSIENT, "outcome.json"))
    params: dict[str, object] = {"APPPOT_UID": uid, "APPPOT_GID": gid, "APPPOT_INTERACTIVE": int(interactive)}
    if changes:
        params["APPPOT_CHANGES"] = changes
        if changes_force:
            params["APPPOT_CHANGES_FORCE"] = 1
    write_file(ctl_fd, "params", "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in params.items()))
    if command is not None:
        write_file(ctl_fd, "argv", argv_text(command))


def write_failure(ctl_fd: int, message: str) -> None:
    """What the guest would report had apppot failed inside it: status 125 and the reason."""
    remove(ctl_fd, TRANSIENT)
    write_file(ctl_fd, "stderr", f"apppot: error: {message}\n")
    write_file(ctl_fd, "status", f"125\n{message}\n")


def read_status(ctl_fd: int) -> tuple[int | None, str]:
    """(exit status, message) from the guest's status file; (None, "") if it left none we can use."""
    data = read_file(ctl_fd, "status", limit=STATUS_LIMIT)
    if data is None:
        return None, ""
    lines = data.decode(errors="replace").splitlines()
    try:
        status = int(lines[0])
    except (ValueError, IndexError):
        return None, ""
    return (status if 0 <= status <= 255 else None), "\n".join(lines[1:]).strip()
