"""A boot kit for VM-universe jobs: a Debian kernel and a tiny initramfs that hands over to apppot-init.

The VM universe boots the job's qcow2 overlay under qemu/libvirt. apppot's LIBVIRT_XML_SCRIPT boots
it with a direct kernel boot (<kernel>, <initrd>, <cmdline>), so images without their own bootloader
(the tiny busybox image) work, and apppot's parameters reach the guest on the command line. This
module builds the two files an execute node needs for that (the knobs APPPOT_VM_KERNEL and
APPPOT_VM_INITRD point at them):

* vmlinuz: Debian's stock `linux-image-*-amd64` kernel (`apt-get download`, no installation);
* initrd.img: the initramfs of `apppot build --debian` images (apppot.debian.make_initramfs):
  busybox-static, the modules for virtio disks, ext4 and 9p, and apppot/guest/apppot-initrd, which
  loads them, mounts /dev/vda and `switch_root`s into /sbin/apppot-init; that mounts the job's
  scratch directory over 9p (APPPOT_JOBFS=9p on the kernel command line).

Usage (as root on the node, or anywhere, then copy):  python3 -m apppot.condor.vmboot OUTDIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def build_boot_kit(outdir: Path, *, deb: Path | None = None) -> tuple[Path, Path]:
    """Write OUTDIR/vmlinuz and OUTDIR/initrd.img (skipped if both exist); return their paths."""
    from apppot import build, debian, image

    kernel, initrd = outdir / "vmlinuz", outdir / "initrd.img"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apppot-vmboot-") as tmp:
        work = Path(tmp)
        vmlinuz, moddir, _ = debian.unpack_kernel(deb or debian.download_kernel_deb(work), work)
        # the same initramfs `apppot build --debian` puts in its images (guest/apppot-initrd as /init)
        image.write_atomically(initrd, debian.make_initramfs(moddir, build.find_static_busybox()))
        image.write_atomically(kernel, vmlinuz.read_bytes())
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
