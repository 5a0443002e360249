"""`apppot build --debian`: a Debian minbase AppPot image that boots under UML, qemu and libvirt.

The root tree comes from the archive with debootstrap (minbase + sudo), gets user `user` (uid 1000,
passwordless sudo) and the guest tools, and becomes an ext4 raw image with `mke2fs -d`: no loop
mounts. For qemu/libvirt the image also carries, in /boot/apppot/:

* vmlinuz: the suite's standard kernel (linux-image-amd64), as Debian ships it;
* initrd.img: an uncompressed busybox initramfs with the 16 modules for virtio-pci, virtio-blk,
  ext4 and 9p, whose /init (guest/apppot-initrd) loads them, mounts /dev/vda and switch_roots to
  /sbin/apppot-init.

The host takes both out again without mounting (debugfs, see backends/qemu.py) and boots the
kernel's uncompressed ELF through PVH: the standard kernel is XZ-compressed, and XZ decompression
costs ~3.9 s per boot under TCG (docs/performance.md "## Boot").
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from apppot import build, proc
from apppot.errors import ApppotError

# What the initramfs loads; their dependencies are resolved from each module's .modinfo and loaded
# first. ext4 asks the crypto API for crc32c at mount time, which .modinfo does not declare.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "9pnet_virtio", "9p")
BOOT_DIR = "boot/apppot"  # in the image: vmlinuz, initrd.img, version
SUDOERS = "# apppot: the job user may become root (the image is the user's own appliance)\nuser ALL=(ALL) NOPASSWD:ALL\n"
KERNEL_ARCH = {"amd64": "amd64"}  # linux-image-<flavour> per Debian architecture


def build_debian(out: Path, *, suite: str = "bookworm", size_mib: int = 1024,
                 mirror: str = "http://deb.debian.org/debian") -> Path:  # fmt: skip
    """Build OUT (raw ext4) from the Debian archive; return it. Needs root (debootstrap)."""
    if os.geteuid() != 0:
        raise ApppotError("building a Debian image needs root (debootstrap creates device nodes and chroots)",
                          hint="run `sudo apppot build --debian OUT.img`, or use `apppot build --tiny`")  # fmt: skip
    for tool in ("debootstrap", "mke2fs", "dpkg-deb", "chroot"):
        if shutil.which(tool) is None:
            raise ApppotError(f"{tool} is not installed", hint="apt-get install debootstrap e2fsprogs dpkg")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="apppot-debian-", dir=os.environ.get("APPPOT_BUILD_DIR")) as tmp:
        work = Path(tmp)
        root = work / "root"
        step = Steps(start)
        step(f"debootstrap --variant=minbase {suite} from {mirror}")
        debootstrap(root, suite=suite, mirror=mirror)
        step("user `user` with sudo, guest tools")
        configure_tree(root)
        step("kernel + initramfs for qemu/libvirt")
        version = install_boot_files(root, work)
        step(f"kernel {version}; cleaning apt caches")
        clean_tree(root)
        step("recording the base for apppot-snap")  # last, so it sees the final tree
        build.record_base(root, label=f"apppot-{suite}")
        used_mib = tree_size(root) >> 20
        if used_mib * 1.25 + 64 > size_mib:
            raise ApppotError(f"the tree needs {used_mib} MiB; --size {size_mib} is too small",
                              hint=f"use --size {int(used_mib * 1.25 + 64)} or more")  # fmt: skip
        step(f"mke2fs -t ext4 {size_mib} MiB from a {used_mib} MiB tree")
        build.make_ext_image(root, out, size_mib=size_mib, fstype="ext4", label=f"apppot-{suite}", fixups=[])
    build.progress(f"wrote {out} ({out.stat().st_blocks * 512 >> 20} MiB allocated, {size_mib} MiB virtual) "
                   f"in {time.monotonic() - start:.1f} s")  # fmt: skip
    return out


class Steps:
    """The progress display: numbered steps with the elapsed time."""

    def __init__(self, start: float) -> None:
        self.start, self.n = start, 0

    def __call__(self, what: str) -> None:
        self.n += 1
        build.progress(f"[{time.monotonic() - self.start:5.1f}s] {self.n}. {what}")


def debootstrap(root: Path, *, suite: str, mirror: str) -> None:
    """debootstrap in a thread while this one shows its progress (from its own log file)."""
    argv = ["debootstrap", "--variant=minbase", "--include=sudo", suite, os.fspath(root), mirror]
    error: list[BaseException] = []

    def run() -> None:
        try:
            proc.spawn(argv)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            error.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    show_debootstrap_progress(t, root)
    if error:
        raise error[0]


def show_debootstrap_progress(t: threading.Thread, root: Path) -> None:
    """debootstrap prints its phases only to the terminal we capture: count what it leaves in the tree
    (.debs downloaded, packages set up) instead. One line rewritten in place on a terminal, else a
    line every 10 s."""
    tty, t0, last = sys.stderr.isatty(), time.monotonic(), 0.0
    while t.is_alive():
        t.join(0.5)
        debs = len(list((root / "var/cache/apt/archives").glob("*.deb")))
        set_up = 0
        try:
            set_up = (root / "debootstrap/debootstrap.log").read_bytes().count(b"\nSetting up ")
        except OSError:
            pass
        elapsed = time.monotonic() - t0
        line = f"  debootstrap {elapsed:5.1f}s: {debs} packages downloaded, {set_up} set up"
        if tty:
            sys.stderr.write(f"\r\033[K{line}")
            sys.stderr.flush()
        elif elapsed - last >= 10:
            build.progress(line.strip())
            last = elapsed
    if tty:
        sys.stderr.write("\r\033[K")


def configure_tree(root: Path) -> None:
    with open(root / "etc/passwd", "a") as f:
        f.write(f"user:x:{build.USER_UID}:{build.USER_UID}:AppPot user:/home/user:/bin/bash\n")
    with open(root / "etc/group", "a") as f:
        f.write(f"user:x:{build.USER_UID}:\n")
    with open(root / "etc/shadow", "a") as f:
        f.write("user:*:19000:0:99999:7:::\n")
    _add_to_group(root / "etc/group", "sudo", "user")
    sudoers = root / "etc/sudoers.d/apppot"
    sudoers.write_text(SUDOERS)
    sudoers.chmod(0o440)
    (root / "etc/hostname").write_text("apppot\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 apppot\n")
    job = root / "home/user/job"
    job.mkdir(parents=True, exist_ok=True)
    for p in (root / "home/user", job):
        os.chown(p, build.USER_UID, build.USER_UID)
    build.install_guest_tools(root)


def _add_to_group(group_file: Path, group: str, user: str) -> None:
    lines = group_file.read_text().splitlines()
    for i, line in enumerate(lines):
        name, pw, gid, members = (line.split(":") + [""] * 4)[:4]
        if name == group:
            lines[i] = f"{name}:{pw}:{gid}:{','.join(filter(None, members.split(',') + [user]))}"
    group_file.write_text("\n".join(lines) + "\n")


def download_kernel_deb(dest_dir: Path, *, root: Path | None = None) -> Path:
    """`apt-get download` the kernel package linux-image-FLAVOUR depends on, with the apt of ROOT (a
    debootstrapped tree, through chroot) or of this host; return the .deb, in dest_dir."""
    inroot = ["chroot", os.fspath(root)] if root is not None else []
    arch = proc.capture([*inroot, "dpkg", "--print-architecture"]).strip()
    if arch not in KERNEL_ARCH:
        raise ApppotError(f"no kernel flavour known for architecture {arch}")
    meta = f"linux-image-{KERNEL_ARCH[arch]}"
    match = re.search(r"Depends: (linux-image-\S+)", proc.capture([*inroot, "apt-cache", "depends", meta]))
    pkg = match.group(1) if match else meta
    where = root / "tmp" if root is not None else dest_dir  # apt writes into its own cwd
    download = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", pkg]
    if root is not None:
        proc.spawn([*inroot, "sh", "-c", 'cd /tmp && exec "$@"', "sh", *download])
    else:
        proc.spawn(download, cwd=dest_dir)
    deb = next(where.glob(f"{pkg}_*.deb"))
    if where != dest_dir:
        deb = Path(shutil.move(deb, dest_dir / deb.name))
    return deb


def unpack_kernel(deb: Path, work: Path) -> tuple[Path, Path, str]:
    """(vmlinuz, module directory, version) of a linux-image .deb unpacked below WORK."""
    unpacked = work / "kernel"
    proc.spawn(["dpkg-deb", "-x", os.fspath(deb), os.fspath(unpacked)])
    vmlinuz = next((unpacked / "boot").glob("vmlinuz-*"))
    version = vmlinuz.name.removeprefix("vmlinuz-")
    return vmlinuz, unpacked / "lib/modules" / version, version


def install_boot_files(root: Path, work: Path) -> str:
    """Download the suite's kernel package in the chroot; put vmlinuz + initramfs in /boot/apppot."""
    deb = download_kernel_deb(work, root=root)
    vmlinuz, moddir, version = unpack_kernel(deb, work)
    deb.unlink()
    boot = root / BOOT_DIR
    boot.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vmlinuz, boot / "vmlinuz")
    shutil.copyfile(vmlinuz.parent / f"config-{version}", boot / "config")
    (boot / "version").write_text(version + "\n")
    (boot / "initrd.img").write_bytes(make_initramfs(moddir, build.find_static_busybox()))
    for f in boot.iterdir():
        f.chmod(0o644)
    return version


def module_index(moddir: Path) -> dict[str, Path]:
    return {p.name.split(".ko")[0].replace("-", "_"): p for p in moddir.rglob("*.ko")}


def module_depends(ko: Path) -> list[str]:
    """The `depends=` of a module's .modinfo section (no kmod needed)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko.read_bytes())
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def module_order(moddir: Path, wanted: tuple[str, ...] = INITRD_MODULES) -> list[Path]:
    """The .ko files for `wanted` and all they depend on, dependencies first; built-ins skipped."""
    index, order = module_index(moddir), []

    def visit(name: str) -> None:
        path = index.get(name)
        if path is None or path in order:
            return
        for dep in module_depends(path):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc archive of (name, mode, data); root-owned, mtime 0 (reproducible)."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        nm = name.encode() + b"\0"
        nlink = 2 if mode & 0o40000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nm), 0)
        out.write(b"070701" + "".join(f"{v:08X}" for v in fields).encode() + nm)
        out.write(b"\0" * (-(110 + len(nm)) % 4) + data + b"\0" * (-len(data) % 4))
    return out.getvalue()


def make_initramfs(moddir: Path, busybox: Path) -> bytes:
    """Busybox + the modules + guest/apppot-initrd as /init. Uncompressed: nothing to inflate under TCG."""
    modules = module_order(moddir)
    if not any(m.name.startswith("9p.ko") for m in modules):
        raise ApppotError(f"the kernel in {moddir} has no 9p module", hint="use a standard (not cloud) kernel flavour")
    init = build.read_guest_file("apppot-initrd")
    entries = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "newroot", "modules")]
    entries += [("bin/busybox", 0o100755, busybox.read_bytes()), ("init", 0o100755, init)]
    names = []
    for ko in modules:
        name = ko.name.split(".ko")[0]
        names.append(name)
        entries.append((f"modules/{name}.ko", 0o100644, ko.read_bytes()))
    entries.append(("modules.list", 0o100644, ("\n".join(names) + "\n").encode()))
    return cpio_newc(entries)


def clean_tree(root: Path) -> None:
    """Drop what apt can fetch again (package lists, .debs): ~60 MiB less to store and stage."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*",
                    "var/log/*.log", "tmp/*", "debootstrap"):  # fmt: skip
        for p in root.glob(pattern):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total
