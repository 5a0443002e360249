"""`apppot_vm_post`: the +PostCmd of an AppPot VM-universe job (runs on the node after the VM stopped).

The VM universe ends a job when its VM powers off and always reports ExitCode 0: the starter
never learns what happened inside the guest. HTCondor does run a job's PostCmd in the VM
universe too, as the job's user, in the scratch directory, before the output transfer. This
command, named there by submit_templates/apppot-vm.sub, turns what apppot-init left in
SCRATCH/.apppot into things that reach the submitter:

* apppot.out, apppot.err: the guest command's stdout and stderr;
* apppot.status: its exit status (line 1) and apppot's message (line 2), 255 if the guest never
  reported one (then apppot.console.log, the serial console, comes back too);
* the job attribute AppPotExitCode (and AppPotExitMessage), set through condor_chirp, so
  `condor_history -af AppPotExitCode` and job policies (on_exit_hold ...) can use it. Needs
  `+WantIOProxy = true` in the job;
* the job's writable disk layers (the vm_disk files) are deleted, so they are not transferred
  back (use --keep-disk to keep them). `vm_no_output_vm = true` cannot be used for this: it makes
  the vm-gahp delete every file the job created, outputs included.
It always exits 0: a PostCmd's status does not become the job's ExitCode anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from apppot.job import CONTROL_DIR
from apppot.job import ExitCode as _ExitCode
from apppot.run import read_status  # the guest's status file is read the same way as by `apppot run`

NO_STATUS = _ExitCode.NO_STATUS


def job_disks(job_ad_path: str | None) -> list[str]:
    """The job's vm_disk file names (relative ones only: those are in the scratch directory)."""
    if not job_ad_path:
        return []
    try:
        text = Path(job_ad_path).read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip().lower() == "vmparam_vm_disk":
            spec = value.strip().strip('"')
            return [item.split(":")[0].strip() for item in spec.split(",")
                    if item.strip() and not item.strip().startswith("/")]  # fmt: skip
    return []


def chirp_binary() -> str | None:
    libexec = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import htcondor2

        libexec = htcondor2.param.get("LIBEXEC")
    except Exception:  # noqa: BLE001 -- no bindings or no config: try the usual places
        libexec = None
    for cand in filter(None, [libexec and os.path.join(libexec, "condor_chirp"), "/usr/libexec/condor/condor_chirp",
                              shutil.which("condor_chirp")]):  # fmt: skip
        if os.access(cand, os.X_OK):
            return cand
    return None


def set_job_attrs(attrs: dict[str, object]) -> str | None:
    """condor_chirp set_job_attr for each; returns an error text, or None."""
    chirp = chirp_binary()
    if chirp is None:
        return "condor_chirp not found"
    for name, value in attrs.items():
        expr = json.dumps(value) if isinstance(value, str) else str(value)
        proc = subprocess.run([chirp, "set_job_attr", name, expr], capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            return (f"condor_chirp set_job_attr {name} failed ({proc.returncode}): {proc.stderr.strip()} "
                    "(does the job have +WantIOProxy = true?)")  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    scratch = Path.cwd()
    ctl = scratch / CONTROL_DIR
    status, message = read_status(ctl)
    for src, dest in (("stdout", "apppot.out"), ("stderr", "apppot.err")):
        with contextlib.suppress(OSError):
            shutil.copyfile(ctl / src, scratch / dest)
    code = NO_STATUS if status is None else status
    if status is None:
        message = message or "the VM ended without the guest reporting an exit status (see apppot.console.log)"
        with contextlib.suppress(OSError):
            shutil.copyfile(ctl / "console.log", scratch / "apppot.console.log")
    (scratch / "apppot.status").write_text(f"{code}\n{message}\n")
    if "--keep-disk" not in args:
        for name in job_disks(os.environ.get("_CONDOR_JOB_AD")):
            with contextlib.suppress(OSError):
                (scratch / name).unlink()
    attrs: dict[str, object] = {"AppPotExitCode": code}
    if message:
        attrs["AppPotExitMessage"] = message
    err = set_job_attrs(attrs)
    if err:
        print(f"apppot_vm_post: warning: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
