"""The `apppot` command (and `apppot-start`, the original AppPot's launcher name)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from apppot import __version__, image, options, proc, store
from apppot.errors import ApppotError
from apppot.job import BackendKind, ExitCode, JobSpec

RUN_EPILOG = """\
What runs in the guest, first match wins:
  1. CMD ARGS given on the command line (passed exactly: spaces, quotes, newlines, UTF-8);
  2. an executable `apppot-run` in the job directory;
  3. /home/user/apppot-autorun in the image;
  4. an interactive shell when stdin is a terminal; otherwise it is an error.
The job directory (default: the current one) is /home/user/job in the guest, and nothing else of the
host is visible. The guest user `user` gets your uid/gid, so files it writes there are yours.

Exit status: the command's own (0-255); 124 walltime exceeded; 125 apppot could not run the job;
255 the VM ended without the guest reporting a status (details in JOBDIR/.apppot/console.log and
JOBDIR/.apppot/outcome.json, which also tell these apart from a command that exits 124/125/255).

Disks: IMAGE may be a raw base (a private copy-on-write layer is made and discarded), a UML COW file
staged by the apppot:// transfer plugin (apppot://NAME?format=uml-cow), or the NAME of an image in the
node's image directories (APPPOT_IMAGE_PATH). The base is never modified. --apppot COW,BASE keeps
the COW file, so changes made in an interactive session persist across runs.
"""


def add_run_options(p: argparse.ArgumentParser) -> None:
    disk = p.add_mutually_exclusive_group()
    disk.add_argument("--image", metavar="IMG", help="the job's disk: a raw base, a staged COW file, or an image NAME "
                      "(default: $APPPOT_IMAGE)")  # fmt: skip
    disk.add_argument("--apppot", metavar="COW,BASE", help="writes go to COW (created if missing, kept), BASE is read-only")
    p.add_argument("--changes", "--merge", metavar="TARBALL", type=Path,
                   help="apppot-snap changes tarball merged into the guest before the job runs")  # fmt: skip
    p.add_argument("--force-changes", action="store_true", help="merge --changes even if made against another base")
    p.add_argument("--mem", type=options.memory_mib, default=os.environ.get("APPPOT_MEM", "256M"), metavar="SIZE",
                   help="guest memory (default: %(default)s, or $APPPOT_MEM)")  # fmt: skip
    p.add_argument("--kernel", "--linux", "--uml", type=Path, metavar="PATH",
                   help="UML kernel (default: $APPPOT_KERNEL, apppot's built kernel, then Debian's packaged one); "
                   "for qemu/libvirt the guest kernel (default: the image's /boot/apppot, then $APPPOT_VM_KERNEL)")
    p.add_argument("--initrd", type=Path, metavar="PATH", help="qemu/libvirt: the initramfs for --kernel "
                   "(default: the image's /boot/apppot/initrd.img, then $APPPOT_VM_INITRD)")  # fmt: skip
    p.add_argument("--walltime", type=options.walltime, metavar="S", help="stop the job after S seconds (or 90m, 2h): exit 124")
    p.add_argument("--grace", type=float, default=20.0, metavar="S",
                   help="after SIGTERM or walltime, give the guest S seconds to stop (default: %(default)s)")
    p.add_argument("--id", "--umid", dest="vm_id", metavar="NAME", help="VM name (default: apppot.HOST.PID)")
    p.add_argument("--extra", "-X", action="append", default=[], metavar="KERNEL_ARG",
                   help="append KERNEL_ARG to the guest kernel command line (repeatable)")
    p.add_argument("--job-dir", type=Path, metavar="DIR", help="shared as /home/user/job (default: the current dir)")
    p.add_argument("--backend", choices=[k.value for k in BackendKind], default="uml", help="hypervisor (default: uml)")
    p.add_argument("--discard-disk", action="store_true",
                   help="delete the job's writable disk layer afterwards (for HTCondor: keeps it out of the outputs)")
    p.add_argument("--slirp", help=argparse.SUPPRESS)  # the original's option; UML no longer has slirp
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD ARGS", help="command to run in the guest")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """The one place where command-line input is validated and turned into a JobSpec."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    job_dir = (args.job_dir or Path.cwd()).resolve()
    if not job_dir.is_dir():
        raise ApppotError(f"job directory {job_dir} does not exist")
    if args.changes is not None and not args.changes.is_file():
        raise ApppotError(f"changes tarball {args.changes} not found", hint="make one with `apppot-snap changes` in the guest")
    return JobSpec(
        disk=options.resolve_disk(args.image, args.apppot, BackendKind(args.backend), discard=args.discard_disk),
        job_dir=job_dir,
        command=tuple(command) if command else None,
        backend=BackendKind(args.backend),
        memory_mib=args.mem if isinstance(args.mem, int) else options.memory_mib(args.mem),
        walltime_s=args.walltime,
        grace_s=args.grace,
        kernel=args.kernel,
        vm_id=args.vm_id or f"apppot.{os.uname().nodename}.{os.getpid()}",
        extra_args=tuple(args.extra),
        changes=args.changes.absolute() if args.changes else None,
        changes_force=args.force_changes,
        interactive=not command and sys.stdin.isatty(),
        uid=os.getuid(),
        gid=os.getgid(),
    )


def cmd_run(args: argparse.Namespace) -> int:
    from apppot.backends import get_backend
    from apppot.run import explain, run_job

    spec = spec_from_args(args)
    outcome = run_job(spec, get_backend(spec.backend, initrd=args.initrd.absolute() if args.initrd else None))
    msg = explain(outcome)
    if msg:
        print(f"apppot: {msg}", file=sys.stderr)
    return outcome.exit_code


def cmd_build(args: argparse.Namespace) -> int:
    from apppot import build, debian

    if args.tiny:
        build.build_tiny(args.output, size_mib=args.size or 32)
    else:
        debian.build_debian(args.output, suite=args.suite, size_mib=args.size or 1024, mirror=args.mirror)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from apppot.backends import get_backend

    ok = True
    for kind in BackendKind:
        try:
            reason = get_backend(kind).unavailable_reason()
        except ApppotError as e:
            reason = str(e)
        ok &= reason is None
        print(f"{kind.value:8} {'ok' if reason is None else 'NOT AVAILABLE: ' + reason}")
    return 0 if ok else 1


def cmd_images(args: argparse.Namespace) -> int:
    from apppot import fetchd, imagecache

    if args.prefetch:
        if not imagecache.is_digest((args.sha256 or "").lower()):
            raise ApppotError("--prefetch URL needs --sha256 HEX (64 hexadecimal digits)", hint="sha256sum IMAGE")
        name = args.name or args.prefetch.rstrip("/").rsplit("/", 1)[-1]
        reply = fetchd.request("prefetch", name=name, url=args.prefetch, sha256=args.sha256.lower())
        print(f"cached\t{args.sha256.lower()}\t{reply['path']}")
        return 0
    dirs = store.image_path()
    print("# resident images (APPPOT_IMAGE_PATH): name, format, virtual size, file size, modified, path"
          + (", sha256" if args.digest else ""))  # fmt: skip
    for name in store.list_images(dirs):
        path = store.resolve(name, dirs)
        img = image.probe_image(path)
        st = path.stat()
        digest = image.sha256_of(path, update_cache=args.digest) if args.digest else ""
        print(f"{name}\t{img.format}\t{img.virtual_size}\t{st.st_blocks * 512}\t{_when(st.st_mtime)}\t{path}"
              + (f"\t{digest}" if digest else ""))  # fmt: skip
    root = imagecache.cache_dir()
    print(f"# cached images ({root}): sha256, name, size, last use, in use, url")
    for e in imagecache.entries(root):
        print(f"sha256:{e['sha256']}\t{e['name'] or '-'}\t{e['size']}\t{_when(e['last_use'])}\t"
              f"{'in use' if e['in_use'] else 'idle'}\t{e['url'] or '-'}")  # fmt: skip
    if not dirs and not os.path.isdir(root):
        raise ApppotError(f"{store.KNOB} is not set and there is no image cache at {root}",
                          hint="set APPPOT_IMAGE_PATH / APPPOT_CACHE_DIR in the HTCondor config or the environment")  # fmt: skip
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apppot",
        description="Run Linux software appliances (VM disk images) as batch jobs: under User-Mode Linux "
        "without root, or under qemu/libvirt, with the job directory shared in and the command's exit "
        "status coming back.",
    )
    p.add_argument("--version", action="version", version=f"apppot {__version__}")
    p.add_argument("--debug", action="store_true", help="show commands and tracebacks")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="run a command in an image", epilog=RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_run_options(r)
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("build", help="build an AppPot image (raw ext2/ext4 disk file)")
    kind = b.add_mutually_exclusive_group(required=True)
    kind.add_argument("--tiny", action="store_true", help="busybox root with the guest tools: seconds, no network")
    kind.add_argument("--debian", action="store_true", help="Debian minbase + sudo + guest tools, from the archive")
    b.add_argument("--suite", default="bookworm", help="Debian suite for --debian (default: %(default)s)")
    b.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror (default: %(default)s)")
    b.add_argument("--size", type=int, metavar="MIB", help="file system size (default: 32 tiny, 1024 debian)")
    b.add_argument("output", type=Path, metavar="OUT.img")
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("check", help="say which backends can run on this host, and how to fix the others")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("images", help="list the node's images: resident (APPPOT_IMAGE_PATH) and cached (APPPOT_CACHE_DIR)")
    i.add_argument("--digest", action="store_true", help="also print sha256 and cache it in IMAGE.sha256 (admin)")
    i.add_argument("--prefetch", metavar="URL", help="have the node's fetch service download URL into the cache now")
    i.add_argument("--sha256", metavar="HEX", help="the --prefetch image's digest (sha256sum IMAGE)")
    i.add_argument("--name", help="a label for the --prefetch image (default: the URL's file name)")
    i.set_defaults(func=cmd_images)

    from apppot import snap

    snap.add_parser(sub)

    from apppot import submit

    submit.add_parser(sub)
    return p


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # every `finally` then cleans up on the same path as Ctrl-C


def _dispatch(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    proc.DEBUG = bool(getattr(args, "debug", False))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return func(args)
    except ApppotError as e:
        if getattr(args, "debug", False):
            raise
        print(f"apppot: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  ({e.hint})", file=sys.stderr)
        return ExitCode.APPPOT_FAILED
    except KeyboardInterrupt:
        print("apppot: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _dispatch(args.func, args)


def start_main(argv: Sequence[str] | None = None) -> int:
    """`apppot-start`: the original AppPot launcher's interface, i.e. `apppot run` with its options."""
    p = argparse.ArgumentParser(prog="apppot-start", description="Start an AppPot appliance (same as `apppot run`).",
                                epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--version", "-V", action="version", version=f"apppot-start {__version__}")
    p.add_argument("--debug", action="store_true", help="show commands and tracebacks")
    add_run_options(p)
    return _dispatch(cmd_run, p.parse_args(argv))
