"""A boot kit for VM-universe jobs: a Debian kernel and a tiny initramfs that hands over to apppot-init.

The VM universe boots the job's qcow2 overlay under qemu/libvirt. apppot's LIBVIRT_XML_SCRIPT boots
it with a direct kernel boot (<kernel>, <initrd>, <cmdline>), so images without their own bootloader
(the tiny busybox image) work, and apppot's parameters reach the guest on the command line. This
module builds the two files an execute node needs for that (the knobs APPPOT_VM_KERNEL and
APPPOT_VM_INITRD point at them):

* vmlinuz: Debian's stock `linux-image-*-amd64` kernel (`apt-get download`, no installation);
* initrd.img: busybox-static plus the modules for virtio disks, ext2/3/4 and 9p (virtfs), and an
  /init that loads them, mounts /dev/vda and `switch_root`s into /sbin/apppot-init, which then
  mounts the job's scratch directory over 9p (APPPOT_JOBFS=9p on the kernel command line).

Usage (as root on the node, or anywhere, then copy):  python3 -m apppot.condor.vmboot OUTDIR
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Loaded in this order (dependencies are resolved from `modinfo` and put first). ext4 asks the
# crypto API for crc32c at mount time, which modinfo does not list.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "9pnet_virtio", "9p")

INIT = r"""#!/bin/busybox sh
# apppot VM boot kit: load the drivers, mount the root disk, hand over to apppot-init.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.list); do insmod "/modules/$m.ko" 2>/dev/null; done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in apppot.root=*) root=${arg#apppot.root=} ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -o rw "$root" /newroot; then
    echo "apppot-initrd: cannot mount the root disk $root" >/dev/console
    echo o >/proc/sysrq-trigger; sleep 60
fi
init=/sbin/apppot-init
[ -x "/newroot$init" ] || init=/sbin/init
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot "$init"
"""


def download_kernel_deb(workdir: Path, package: str = "linux-image-amd64") -> Path:
    """`apt-get download` the kernel package the metapackage PACKAGE depends on; return the .deb."""
    deps = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True, check=True).stdout
    real = next((line.split()[-1] for line in deps.splitlines()
                 if line.strip().startswith("Depends: linux-image-")), package)  # fmt: skip
    subprocess.run(["apt-get", "download", "-q", real], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return next(workdir.glob(f"{real}_*.deb"))


def module_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for WANTED and everything they depend on, dependencies first."""
    index = {p.name.split(".ko")[0].replace("-", "_"): p for p in moddir.rglob("*.ko*")}
    order: list[Path] = []

    def visit(name: str) -> None:
        path = index.get(name.replace("-", "_"))
        if path is None or path in order:
            return  # built in (or unknown): nothing to load
        deps = subprocess.run(["modinfo", "-F", "depends", os.fspath(path)], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        for dep in filter(None, deps.split(",")):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A gzip-free newc archive of (name, mode, data) entries; directories have empty data."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        nm = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nm), 0))
        out.write(hdr.encode() + nm)
        out.write(b"\0" * (-(110 + len(nm)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def build_initrd(dest: Path, moddir: Path, busybox: Path = Path("/bin/busybox")) -> None:
    modules = module_order(moddir, WANTED_MODULES)
    entries: list[tuple[str, int, bytes]] = [(d, 0o40755, b"") for d in
                                             ("bin", "dev", "proc", "sys", "newroot", "modules")]  # fmt: skip
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    names = []
    for ko in modules:
        data = ko.read_bytes()
        if ko.name.endswith(".xz") or ko.name.endswith(".zst"):
            raise SystemExit(f"{ko}: compressed modules are not supported by busybox insmod")
        name = ko.name.split(".ko")[0]
        names.append(name)
        entries.append((f"modules/{name}.ko", 0o100644, data))
    entries.append(("modules.list", 0o100644, ("\n".join(names) + "\n").encode()))
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6))
    os.replace(tmp, dest)


def build_boot_kit(outdir: Path, *, deb: Path | None = None) -> tuple[Path, Path]:
    """Write OUTDIR/vmlinuz and OUTDIR/initrd.img (skipped if both exist); return their paths."""
    kernel, initrd = outdir / "vmlinuz", outdir / "initrd.img"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apppot-vmboot-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt-get download runs as _apt
        deb = deb or download_kernel_deb(work)
        subprocess.run(["dpkg-deb", "-x", os.fspath(deb), os.fspath(work / "x")], check=True)
        vmlinuz = next((work / "x/boot").glob("vmlinuz-*"))
        moddir = next((work / "x/lib/modules").iterdir())
        build_initrd(initrd, moddir)
        shutil.copyfile(vmlinuz, kernel.with_suffix(".part"))
        os.replace(kernel.with_suffix(".part"), kernel)
    for p in (kernel, initrd):
        os.chmod(p, 0o644)
    return kernel, initrd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m apppot.condor.vmboot", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path, help="writes vmlinuz and initrd.img here")
    p.add_argument("--deb", type=Path, help="use this linux-image-*.deb instead of downloading one")
    args = p.parse_args(argv)
    kernel, initrd = build_boot_kit(args.outdir, deb=args.deb)
    print(f"APPPOT_VM_KERNEL = {kernel}\nAPPPOT_VM_INITRD = {initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
