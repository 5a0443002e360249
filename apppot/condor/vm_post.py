"""`apppot_vm_post`: the +PostCmd of an AppPot VM-universe job (runs on the node after the VM stopped).

The VM universe ends a job when its VM powers off and always reports ExitCode 0: the starter
never learns what happened inside the guest. HTCondor does run a job's PostCmd in the VM
universe too, as the job's user, in the scratch directory, before the output transfer. This
command, named there by submit_templates/apppot-vm.sub, turns what apppot-init left in
SCRATCH/.apppot into things that reach the submitter:

* apppot.out, apppot.err: the guest command's stdout and stderr;
* apppot.status: its exit status (line 1) and apppot's message (line 2), 255 if the guest never
  reported one, 125 if apppot_libvirt_xml refused the job (the reason is the message);
* the job attribute AppPotExitCode (and AppPotExitMessage), set through condor_chirp, so
  `condor_history -af AppPotExitCode` and job policies (on_exit_hold ...) can use it. Needs
  `+WantIOProxy = true` in the job;
* the disk layers the apppot:// plugin staged are deleted, so they are not transferred back (use
  --keep-disk to keep them); other files, a results disk the job brought included, stay.
  `vm_no_output_vm = true` cannot be used for this: it makes the vm-gahp delete every file the job
  created, outputs included.
It always exits 0: a PostCmd's status does not become the job's ExitCode anyway.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import urllib.parse
from pathlib import Path

from apppot import contract, proc
from apppot.errors import ApppotError
from apppot.knobs import bindings, condor_param
from apppot.job import ExitCode as _ExitCode

NO_STATUS = _ExitCode.NO_STATUS


def staged_layers(job_ad_path: str | None) -> list[str]:
    """Names of the files the apppot:// plugin staged in the sandbox (one per apppot:// URL in
    TransferInput: HTCondor names it after the URL's last path component, without the query).
    Nothing when the job ad cannot be read: then no file is removed."""
    if not job_ad_path:
        return []
    try:
        text = Path(job_ad_path).read_text()
        classad2 = bindings()[1]
        ad = classad2.parseOne(text, classad2.ParserType.Old)  # the starter writes the old (line) form
        transfer_input = ad.get("TransferInput")
    except (OSError, UnicodeDecodeError, ApppotError, ValueError):
        return []
    if not isinstance(transfer_input, str):
        return []
    names = []
    for item in transfer_input.split(","):
        url = urllib.parse.urlsplit(item.strip())
        if url.scheme == "apppot":
            name = (url.path or url.netloc).rstrip("/").rpartition("/")[2] or url.netloc
            if name and name not in (".", ".."):
                names.append(name)
    return names


def remove_regular(dir_fd: int, name: str) -> None:
    """Unlink NAME if it is a regular file (never a symlink's target, never outside the directory)."""
    with contextlib.suppress(OSError):
        if "/" not in name and stat.S_ISREG(os.lstat(name, dir_fd=dir_fd).st_mode):
            os.unlink(name, dir_fd=dir_fd)


def chirp_binary() -> str | None:
    libexec = condor_param("LIBEXEC")
    for cand in filter(None, [libexec and os.path.join(libexec, "condor_chirp"), "/usr/libexec/condor/condor_chirp",
                              shutil.which("condor_chirp")]):  # fmt: skip
        if os.access(cand, os.X_OK):
            return cand
    return None


def classad_literal(text: str) -> str:
    """TEXT as a ClassAd string literal (JSON's \\uXXXX escapes are not ClassAd's: non-ASCII broke)."""
    return str(bindings()[1].quote(text))


def set_job_attrs(attrs: dict[str, object]) -> str | None:
    """condor_chirp set_job_attr for each; returns an error text, or None."""
    chirp = chirp_binary()
    if chirp is None:
        return "condor_chirp not found"
    for name, value in attrs.items():
        expr = classad_literal(value) if isinstance(value, str) else str(value)
        try:
            rc, out = proc.run([chirp, "set_job_attr", name, expr], timeout_s=60)
        except ApppotError as e:
            return e.message
        if rc != 0:
            return (f"condor_chirp set_job_attr {name} failed ({rc}): {out.strip()} "
                    "(does the job have +WantIOProxy = true?)")  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    # We run as the job's user, but the guest wrote in here: no symlink is followed, nothing is
    # read that is not a regular file, and outputs are moved (rename) or written by rename.
    scratch_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    status, message = None, ""
    try:
        ctl_fd = contract.open_control_dir(".")
    except ApppotError as e:
        message = e.message
    else:
        status, message = contract.read_status(ctl_fd)
        for src, dest in (("stdout", "apppot.out"), ("stderr", "apppot.err")):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(src, dir_fd=ctl_fd).st_mode):
                    os.rename(src, dest, src_dir_fd=ctl_fd, dst_dir_fd=scratch_fd)
        os.close(ctl_fd)
    code = NO_STATUS if status is None else status
    if status is None:
        message = message or "the VM ended without the guest reporting an exit status (kernel panic, crash or killed)"
    contract.write_file(scratch_fd, "apppot.status", f"{code}\n{message}\n")
    if "--keep-disk" not in args:
        for name in staged_layers(os.environ.get("_CONDOR_JOB_AD")):
            remove_regular(scratch_fd, name)
    os.close(scratch_fd)
    attrs: dict[str, object] = {"AppPotExitCode": code}
    if message:
        attrs["AppPotExitMessage"] = message
    err = set_job_attrs(attrs)
    if err:
        print(f"apppot_vm_post: warning: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
