"""`apppot build`: AppPot images as raw ext2/ext4 disk files, without loop mounts or root-only tools.

* tiny: a busybox-static root with the guest tools (seconds, no network): the embedded default.
* debian: a Debian minbase root from the archive (debootstrap), with sudo, user `user`, the guest
  tools and a kernel + initrd for qemu/libvirt, so one file boots under UML, qemu and libvirt.

The file system is made with `mke2fs -d TREE` and owners/device nodes are fixed with `debugfs`,
so building the tiny image needs no root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from apppot import proc
from apppot.errors import ApppotError

GUEST_TOOLS = {"apppot-init": "sbin/apppot-init", "apppot-snap": "usr/bin/apppot-snap",
               "apppot-snap.exclude": "etc/apppot/snap.exclude"}  # fmt: skip
USER_UID = 1000
PASSWD = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:AppPot user:/home/user:/bin/sh\n"
GROUP = "root:x:0:\nusers:x:100:user\nuser:x:1000:\n"
DEVICES = (("console", "c", 5, 1), ("null", "c", 1, 3), ("zero", "c", 1, 5), ("tty", "c", 5, 0),
           ("random", "c", 1, 8), ("urandom", "c", 1, 9), ("kmsg", "c", 1, 11))  # fmt: skip


def progress(msg: str) -> None:
    print(f"apppot build: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it to `out` only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_guest_file(name: str) -> bytes:
    """One of apppot's guest files (package data, apppot/guest/), so image and host tool agree on the
    version. A missing one is a broken installation: an image without it would never report a status."""
    src = resources.files("apppot") / "guest" / name
    if not src.is_file():
        raise ApppotError(f"guest file {name} is missing from this apppot installation ({src})",
                          hint="reinstall apppot (the wheel or `make install` ships apppot/guest/)")  # fmt: skip
    return src.read_bytes()


def install_guest_tools(root: Path) -> None:
    """Copy apppot's guest scripts (package data) into an image tree."""
    for name, dest in GUEST_TOOLS.items():
        target = root / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_guest_file(name))
        target.chmod(0o644 if name.endswith(".exclude") else 0o755)


def find_static_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.is_file() and b"ld-linux" not in p.read_bytes()[:65536]:
            return p
    raise ApppotError("no static busybox found", hint="install it: apt-get install busybox-static")


def make_ext_image(tree: Path, out: Path, *, size_mib: int, fstype: str, label: str,
                   fixups: list[str]) -> None:  # fmt: skip
    """mke2fs -d TREE, then apply debugfs commands (owners, device nodes), into `out` atomically."""
    with atomic_output(out) as tmp:
        proc.spawn(["mke2fs", "-q", "-t", fstype, "-L", label, "-d", os.fspath(tree), "-E", "root_owner=0:0",
                    "-F", os.fspath(tmp), f"{size_mib}M"])  # fmt: skip
        if fixups:
            with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as cmds:
                cmds.write("\n".join(fixups) + "\n")
                cmds.flush()
                proc.spawn(["debugfs", "-w", "-f", cmds.name, os.fspath(tmp)])
        tmp.chmod(0o644)


def ownership_fixups(tree: Path, owner_of: dict[str, tuple[int, int]]) -> list[str]:
    """debugfs commands that make every file root's except the paths in owner_of (and below)."""
    cmds = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            rel = "/" + os.path.relpath(os.path.join(dirpath, name), tree)
            uid, gid = next((o for p, o in owner_of.items() if rel == p or rel.startswith(p + "/")), (0, 0))
            cmds += [f'sif "{rel}" uid {uid}', f'sif "{rel}" gid {gid}']
    return cmds


def device_fixups() -> list[str]:
    # debugfs' mknod only links relative names (an absolute one leaves an orphan inode) and sets
    # no permission bits, so cd first and set the mode after.
    cmds = ["cd /dev"]
    for name, kind, major, minor in DEVICES:
        mode = "020600" if name == "console" else "020666"
        cmds += [f"mknod {name} {kind} {major} {minor}", f"sif {name} mode {mode}"]
    return cmds + ["cd /"]


def build_tiny(out: Path, *, size_mib: int = 32) -> Path:
    start = time.monotonic()
    busybox = find_static_busybox()
    with tempfile.TemporaryDirectory(prefix="apppot-tiny-") as tmpdir:
        root = Path(tmpdir)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/apppot", "proc", "sys", "dev", "tmp", "mnt",
                  "root", "home/user/job", "var/lib/apppot", "var/tmp"):  # fmt: skip
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "tmp").chmod(0o1777)
        (root / "var/tmp").chmod(0o1777)
        shutil.copy2(busybox, root / "bin/busybox")
        applets = proc.capture([os.fspath(busybox), "--list"]).split()
        for applet in applets:
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        (root / "etc/passwd").write_text(PASSWD)
        (root / "etc/group").write_text(GROUP)
        (root / "etc/hostname").write_text("apppot\n")
        (root / "etc/shells").write_text("/bin/sh\n")
        install_guest_tools(root)
        # a file to show in /usr/share, then the apppot-snap base, recorded last
        (root / "usr/share/apppot").mkdir(parents=True, exist_ok=True)
        (root / "usr/share/apppot/README").write_text(TINY_README)
        record_base(root, label="apppot-tiny", owners={"/": (0, 0), "/home/user": (USER_UID, USER_UID)})
        progress(f"busybox {busybox} with {len(applets)} applets; making a {size_mib} MiB ext2 file system")
        fixups = ownership_fixups(root, {"/home/user": (USER_UID, USER_UID)})
        fixups += device_fixups()
        make_ext_image(root, out, size_mib=size_mib, fstype="ext2", label="apppot-tiny", fixups=fixups)
    progress(f"wrote {out} in {time.monotonic() - start:.1f} s")
    return out


TINY_README = """AppPot tiny image: busybox, apppot-init (/sbin) and apppot-snap (/usr/bin).
`apppot-snap changes` ships what you changed since this image was built; see apppot's README.
"""


def record_base(tree: Path, *, label: str = "", owners: dict[str, tuple[int, int]] | None = None) -> None:
    """Record `tree` as the image's apppot-snap base (in tree/var/lib/apppot/): the LAST build step
    before the tree becomes a file system, after install_guest_tools(tree).

    The tree is copied into an image afterwards (mke2fs -d), so inode numbers and change times
    are not recorded (`changes` checks contents by digest instead). `owners` maps image paths to
    the (uid, gid) they will have in the image when that differs from the tree (longest prefix
    wins; "/" for everything), e.g. when debugfs fixes owners after mke2fs.
    """
    argv = ["sh", os.fspath(tree / GUEST_TOOLS["apppot-snap"]), "base", "--root", os.fspath(tree),
            "--build-tree", "--label", label]  # fmt: skip
    for path, (uid, gid) in (owners or {}).items():
        argv += ["--owner", f"{path}={uid}:{gid}"]
    proc.spawn(argv)


def is_executable(p: Path) -> bool:
    return p.is_file() and bool(p.stat().st_mode & stat.S_IXUSR)
