"""The guest kernel and initramfs qemu/libvirt boot directly: --kernel/--initrd, the image's own
/boot/apppot (read out of the image with debugfs, without mounting it, cached by the image's
digest), or the node's APPPOT_VM_KERNEL/APPPOT_VM_INITRD. A compressed bzImage is unpacked once on
the host and booted as an ELF through PVH: the in-guest XZ decompressor alone costs ~3 s per boot
under TCG (docs/performance.md "## Boot").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import lzma
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

from apppot import cache as cache_mod
from apppot import image, proc, store
from apppot.errors import ApppotError
from apppot.job import Disk
from apppot.knobs import condor_param

IMAGE_BOOT_DIR = "/boot/apppot"  # where `apppot build --debian` puts vmlinuz and initrd.img


@dataclasses.dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path | None
    origin: str  # for messages: "the image", "--kernel", "$APPPOT_VM_KERNEL"


def raw_base_of(disk: Disk) -> Path | None:
    """The raw file system image at the bottom of the disk's chain (debugfs reads only raw)."""
    if disk.base_format == "raw":
        return disk.base
    if disk.base_format != "qcow2":
        return None
    with contextlib.suppress(ApppotError, OSError):
        chain = store.backing_chain(disk.base, confine=False)
        if chain and chain[-1][1] == "raw":
            return chain[-1][0]
    return None


def debugfs_dump(img: Path, src: str, dest: Path) -> bool:
    """Copy one file out of an ext2/3/4 image without mounting it; False if it is not there."""
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    proc.capture(["debugfs", "-R", f"dump {src} {dest}", os.fspath(img)])  # read-only: no -w
    return dest.is_file() and dest.stat().st_size > 0


def find_boot_files(disk: Disk, *, kernel: Path | None, initrd: Path | None, rundir: Path) -> BootFiles:
    """--kernel/--initrd, else the image's /boot/apppot, else $APPPOT_VM_KERNEL/$APPPOT_VM_INITRD."""
    cache = cache_mod.writable_cache_dir("boot") or rundir  # nobody can cache: extract per run (~1 s)
    if kernel is not None:
        return BootFiles(bootable_kernel(kernel, cache), _checked(initrd), "--kernel")
    base = raw_base_of(disk)
    if base is not None:
        found = boot_files_from_image(base, cache, rundir)
        if found is not None:
            return BootFiles(found.kernel, _checked(initrd) or found.initrd, found.origin)
    env_k = condor_param("APPPOT_VM_KERNEL")
    if env_k:
        env_i = condor_param("APPPOT_VM_INITRD")
        return BootFiles(bootable_kernel(Path(env_k), cache), _checked(initrd or (Path(env_i) if env_i else None)),
                         "$APPPOT_VM_KERNEL")  # fmt: skip
    raise ApppotError(
        f"the image {disk.base} has no kernel for qemu/libvirt (no {IMAGE_BOOT_DIR}/vmlinuz)",
        hint="build it with `apppot build --debian`, or pass --kernel K --initrd I (a Debian image's: "
        "debugfs -R 'dump /boot/apppot/vmlinuz K' IMG, same for initrd.img), or set APPPOT_VM_KERNEL/APPPOT_VM_INITRD",
    )


def _is_file(p: Path) -> bool:
    try:
        return p.is_file() and os.access(p, os.R_OK)
    except OSError:  # e.g. another user's ~/.cache
        return False


def _checked(p: Path | None) -> Path | None:
    if p is not None and not (p.is_file() and os.access(p, os.R_OK)):
        raise ApppotError(f"initrd {p} not found or not readable")
    return p


def boot_files_from_image(base: Path, cache: Path, rundir: Path) -> BootFiles | None:
    """Kernel + initrd from the image's /boot/apppot, extracted once per image digest."""
    digest = image.sha256_of(base, memo=True)
    for d in [*cache_mod.cache_dirs("boot"), cache]:
        entry = d / digest
        if _is_file(entry / "vmlinux") and _is_file(entry / "initrd.img"):
            return BootFiles(entry / "vmlinux", entry / "initrd.img", f"the image ({entry})")
    work = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        if not debugfs_dump(base, f"{IMAGE_BOOT_DIR}/vmlinuz", work / "vmlinuz"):
            return None
        if not debugfs_dump(base, f"{IMAGE_BOOT_DIR}/initrd.img", work / "initrd.img"):
            raise ApppotError(f"{base} has {IMAGE_BOOT_DIR}/vmlinuz but no initrd.img beside it")
        (work / "vmlinux").write_bytes(pvh_kernel((work / "vmlinuz").read_bytes()))
        (work / "vmlinuz").unlink()
        for f in work.iterdir():
            f.chmod(0o644)
        work.chmod(0o755)
        entry = cache / digest
        try:
            work.rename(entry)
        except OSError:  # another run extracted it at the same time
            if not (entry / "vmlinux").is_file():
                raise
        return BootFiles(entry / "vmlinux", entry / "initrd.img", f"the image ({entry})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bootable_kernel(kernel: Path, cache: Path) -> Path:
    """A given kernel, as an uncompressed PVH ELF when it is a compressed bzImage (cached by digest)."""
    try:
        with open(kernel, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return kernel  # already what PVH boots
        data = kernel.read_bytes()
    except OSError as e:
        raise ApppotError(f"kernel {kernel}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    for d in [*cache_mod.cache_dirs("boot"), cache]:
        if _is_file(d / f"vmlinux-{digest}"):
            return d / f"vmlinux-{digest}"
    elf = pvh_kernel(data)
    if elf is data:
        return kernel
    dest = cache / f"vmlinux-{digest}"
    image.write_atomically(dest, elf)
    return dest


def pvh_kernel(bzimage: bytes) -> bytes:
    """The uncompressed vmlinux ELF inside a bzImage, if it has a PVH entry; else the bzImage itself."""
    if bzimage[:4] == b"\x7fELF" or bzimage[0x202:0x206] != b"HdrS":
        return bzimage
    payload = bzimage[0x200 + bzimage[0x1F1] * 0x200 :] if bzimage[0x1F1] else bzimage
    elf = b""
    for magic, unpack in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip)):
        at = payload.find(magic)
        if at >= 0:
            with contextlib.suppress(Exception):
                elf = unpack(payload[at:])
            if elf[:4] == b"\x7fELF":
                break
    # qemu boots an ELF through PVH only if it carries XEN_ELFNOTE_PHYS32_ENTRY (CONFIG_PVH=y).
    if elf[:4] != b"\x7fELF" or not _has_pvh_note(elf):
        return bzimage
    return elf


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _has_pvh_note(elf: bytes) -> bool:
    """Scan the ELF64 PT_NOTE segments for a "Xen" note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + -(-namesz // 4) * 4 + -(-descsz // 4) * 4
    return False
