"""`apppot snap changes|diff --image IMG`: run the guest's apppot-snap in an image, from the host.

A user who worked in an image (a modified raw image, or the UML COW file of `apppot run --apppot
COW,BASE`) gets the changes tarball in one command: apppot boots the image with the same backend
as `apppot run`, runs `apppot-snap changes` as root in it, and moves the tarball out of a private
job directory. The guest side (format, safety) is apppot/guest/apppot-snap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from apppot import options
from apppot.errors import ApppotError
from apppot.job import BackendKind, JobSpec

GUEST_OUTPUT = "apppot-changes.tar.gz"  # in the guest's job dir, /home/user/job
NOT_FOUND = 127  # the shell's status for a missing command

SNAP_EPILOG = """\
The image is booted like `apppot run` boots it (a raw image gets a private, discarded COW layer; a
UML COW file is used in place) and `apppot-snap` runs in it as root. The base it compares with is
the one recorded in the image (/var/lib/apppot, see `apppot-snap id`); merge the tarball into a job
on the pristine base with `apppot run --changes FILE`.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snap", help="base + changes: ship only what you changed in an image",
                       description="Run apppot-snap inside an image without booting it by hand.",
                       epilog=SNAP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    actions = p.add_subparsers(dest="snap_action", metavar="ACTION", required=True)
    changes = actions.add_parser("changes", help="write the tarball of what changed since the image's base",
                                 epilog=SNAP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    changes.add_argument("-o", "--output", type=Path, default=Path(GUEST_OUTPUT), metavar="FILE",
                         help="the changes tarball (default: %(default)s)")  # fmt: skip
    diff = actions.add_parser("diff", help="list what `changes` would ship: A|M|D PATH lines")
    for a in (changes, diff):
        disk = a.add_mutually_exclusive_group(required=True)
        disk.add_argument("--image", metavar="IMG", help="the modified image: a raw image or a UML COW file")
        disk.add_argument("--apppot", metavar="COW,BASE", help="the COW file and base of `apppot run --apppot`")
        a.add_argument("--backend", choices=[k.value for k in BackendKind], default="uml", help="hypervisor (default: uml)")
        a.add_argument("--kernel", type=Path, metavar="PATH", help="UML kernel (default: as `apppot run`)")
        a.add_argument("--mem", type=options.memory_mib, default=256, metavar="SIZE", help="guest memory (default: 256M)")
        a.add_argument("--walltime", type=options.walltime, default=3600.0, metavar="S", help="give up after S seconds (default: 3600)")
        a.set_defaults(func=cmd_snap)


def cmd_snap(args: argparse.Namespace) -> int:
    from apppot.backends import get_backend
    from apppot.run import explain, run_job

    disk = options.resolve_disk(args.image, args.apppot, BackendKind(args.backend), discard=False)
    if args.snap_action == "changes":
        out = args.output.absolute()
        if not out.parent.is_dir():
            raise ApppotError(f"directory {out.parent} does not exist")
        command: tuple[str, ...] = ("apppot-snap", "changes", "-o", f"/home/user/job/{GUEST_OUTPUT}")
        job_dir = Path(tempfile.mkdtemp(prefix=".apppot-snap-", dir=out.parent))  # same fs: the result is renamed
    else:
        command = ("apppot-snap", "diff")
        job_dir = Path(tempfile.mkdtemp(prefix="apppot-snap-"))
    try:
        spec = JobSpec(
            disk=disk,
            job_dir=job_dir,
            command=command,
            backend=BackendKind(args.backend),
            memory_mib=args.mem,
            walltime_s=args.walltime,
            kernel=args.kernel,
            vm_id=f"apppot-snap.{os.getpid()}",
            uid=0,  # apppot-init runs the command as root and leaves /etc/passwd alone
            gid=0,
        )
        outcome = run_job(spec, get_backend(spec.backend))
        if outcome.exit_code == NOT_FOUND and outcome.guest_status == NOT_FOUND:
            raise ApppotError("the image has no apppot-snap (/usr/bin/apppot-snap)",
                              hint="images made by `apppot build` have it; other images need it installed and a base recorded")  # fmt: skip
        msg = explain(outcome)
        if msg:
            print(f"apppot: {msg}", file=sys.stderr)
        if outcome.exit_code != 0:
            return outcome.exit_code
        if args.snap_action == "changes":
            result = job_dir / GUEST_OUTPUT
            if not result.is_file():
                raise ApppotError(f"apppot-snap reported success but left no {GUEST_OUTPUT} in the job directory")
            os.replace(result, out)
            print(f"apppot: changes written to {out}", file=sys.stderr)
        return 0
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(job_dir)
