"""Disk images: format detection, copy-on-write layers in O(1), and pinned digests.

Two writable-layer formats, both written directly (no process spawn, tens of microseconds):
* qcow2 v3 overlays with an explicit backing format, for qemu/libvirt (qemu >= 6.1 and libvirt
  refuse a backing file whose format is not recorded);
* UML COW v3 files (arch/um/drivers/cow_user.c), for `ubd0=cow,base` under User-Mode Linux.
Neither touches the base image, which only has to be readable.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

from apppot.errors import ApppotError, NotFoundError, UnreadableError

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_BACKING_FORMAT_EXT = 0xE2792ACA
UML_COW_MAGIC = 0x4F4F4F4D  # "MOOO"
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
# A writable layer holds what the running guest writes: only its owner (the job's user) may read it.
LAYER_MODE = 0o600

# Formats we recognise but cannot use as a base: name them instead of booting garbage.
_FOREIGN_MAGIC = {
    b"KDMV": "vmdk",
    b"conectix": "vhd",
    b"<<< Oracle VM VirtualBox Disk Image >>>": "vdi",
    struct.pack(">I", UML_COW_MAGIC): "uml-cow",
}


class Qcow2Header(NamedTuple):  # NamedTuple, not a dataclass: the plugin loads no `inspect` (start-up time)
    """What a qcow2 header says about the files qemu would open besides this one."""

    version: int
    backing: str | None  # the backing file name as recorded (may be relative to the image's directory)
    backing_format: str | None  # None: not recorded (qemu would probe it)
    incompatible_features: int

    @property
    def has_external_data_file(self) -> bool:
        return bool(self.incompatible_features & 0x4)  # qemu opens the data file the header names


class Image(NamedTuple):
    """A disk image on this host: its format ("raw", "qcow2" or "uml-cow") and virtual size."""

    path: Path
    format: str
    virtual_size: int


def parse_size(text: str) -> int:
    """'10G', '512M', '1024' (bytes) -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(num) * units[unit]
    except ValueError:
        raise ApppotError(f"invalid size {text!r}", hint="write it like 512M, 10G or 1T") from None
    if value <= 0:
        raise ApppotError(f"invalid size {text!r}", hint="the size must be positive")
    return value


def probe_image(path: Path) -> Image:
    """Identify an image's format from its header; raise ApppotError if it is unusable."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise NotFoundError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ApppotError(f"image {path} is a directory, not a disk image") from None
    except PermissionError:
        raise UnreadableError(
            f"image {path} is not readable by this user (uid {os.getuid()})",
            hint="the node's admin must make base images world-readable (chmod a+r)",
        ) from None
    if head.startswith(QCOW2_MAGIC):
        return Image(path, "qcow2", _qcow2_virtual_size(path, head, size))
    for magic, name in _FOREIGN_MAGIC.items():
        if head.startswith(magic):
            return Image(path, name, size)
    if size == 0:
        raise ApppotError(f"image {path} is empty (0 bytes)", hint="the base image is corrupt or was not copied")
    if size % 512:
        raise ApppotError(
            f"image {path} is {size} bytes, not a whole number of 512-byte sectors",
            hint="a raw disk image is always sector-aligned: the file is truncated or not a disk image",
        )
    return Image(path, "raw", size)


def parse_qcow2_header(head: bytes) -> Qcow2Header | None:
    """Parse the first 64 KiB of a file; None if it is not qcow2. Never follows what it reads."""
    if not head.startswith(QCOW2_MAGIC) or len(head) < 72:
        return None
    version, bf_off, bf_size = struct.unpack(">IQI", head[4:20])
    backing = None
    if bf_off:
        if bf_off + bf_size > len(head) or bf_size > 1023:
            raise ApppotError("its qcow2 backing file name lies outside the header (corrupt or crafted image)")
        backing = head[bf_off : bf_off + bf_size].decode(errors="surrogateescape")
    incompatible, fmt = 0, None
    if version >= 3 and len(head) >= 104:
        (incompatible,) = struct.unpack(">Q", head[72:80])
        (off,) = struct.unpack(">I", head[100:104])
        while off + 8 <= len(head):
            ext, length = struct.unpack(">II", head[off : off + 8])
            if ext == 0:
                break
            if ext == QCOW2_BACKING_FORMAT_EXT:
                fmt = head[off + 8 : off + 8 + length].decode(errors="replace")
            off += 8 + -(-length // 8) * 8
    return Qcow2Header(version, backing, fmt, incompatible)


def read_qcow2_header(path: Path) -> Qcow2Header | None:
    with open(path, "rb") as f:
        return parse_qcow2_header(f.read(65536))


def _qcow2_virtual_size(path: Path, head: bytes, file_size: int) -> int:
    """Sanity-check a qcow2 header (enough to refuse a corrupt base) and return its virtual size."""
    if len(head) < 72:
        raise ApppotError(f"qcow2 image {path} is truncated (header incomplete)")
    version, _bf_off, _bf_size, cluster_bits, vsize, crypt, l1_size, l1_off, rt_off = struct.unpack(
        ">IQIIQIIQQ", head[4:56]
    )
    problems = []
    if version not in (2, 3):
        problems.append(f"unknown qcow2 version {version}")
    if not 9 <= cluster_bits <= 21:
        problems.append(f"cluster size 2^{cluster_bits} is out of range")
    if crypt:
        problems.append("it is encrypted")
    if vsize == 0:
        problems.append("its virtual size is 0")
    if l1_off >= file_size or rt_off >= file_size or l1_size * 8 > file_size:
        problems.append("its tables point past the end of the file (truncated?)")
    if problems:
        raise ApppotError(f"qcow2 image {path} is unusable: " + "; ".join(problems))
    return vsize


def write_atomically(dest: Path, write: Callable[[BinaryIO], None] | bytes, *, mode: int = 0o644,
                     dir_fd: int | None = None) -> None:  # fmt: skip
    """Write dest (bytes, or a function that writes the file) through a temporary file in the same
    directory, then rename: nothing half-written is ever visible, nothing is left on failure, and a
    symlink planted at dest is replaced, never followed. With dir_fd, dest is a name in that directory."""
    # Not tempfile.mkstemp: importing tempfile costs the transfer plugin (run per job) ~10 ms.
    name = f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.part"
    tmp = name if dir_fd is not None else os.fspath(dest.parent / name)
    final = dest.name if dir_fd is not None else os.fspath(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(write) if isinstance(write, bytes) else write(f)
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
        os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def create_qcow2_overlay(dest: Path, base: Image, *, size: int | None = None) -> int:
    """Write a qcow2 v3 overlay over `base` (absolute path recorded, format recorded); return its size.

    Same layout as `qemu-img create -f qcow2 -F FMT -b BASE`: header + extensions + backing name in
    cluster 0, refcount table, one refcount block, then the (all-zero) L1 table.
    """
    vsize = max(size or 0, base.virtual_size)
    if size is not None and size < base.virtual_size:
        raise ApppotError(
            f"requested size {size} is smaller than the base image ({base.virtual_size} bytes)",
            hint="size= can only grow the disk; omit it to keep the base's size",
        )
    backing = os.fspath(base.path.absolute()).encode()
    if len(backing) > 1023:
        raise ApppotError(f"base image path is too long for qcow2 ({len(backing)} > 1023 bytes)")
    l1_entries = -(-vsize // (CLUSTER * (CLUSTER // 8)))
    l1_clusters = max(1, -(-l1_entries * 8 // CLUSTER))
    n_clusters = 3 + l1_clusters  # header, refcount table, refcount block, L1
    if n_clusters > CLUSTER // 2:
        raise ApppotError(f"virtual size {vsize} is too large for one refcount block")
    fmt = base.format.encode()
    ext = struct.pack(">II", QCOW2_BACKING_FORMAT_EXT, len(fmt)) + fmt.ljust(-(-len(fmt) // 8) * 8, b"\0")
    ext += struct.pack(">II", 0, 0)  # end of header extensions
    backing_off = 104 + len(ext)
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        QCOW2_MAGIC, 3, backing_off, len(backing), CLUSTER_BITS, vsize,
        0,                       # no encryption
        l1_entries, 3 * CLUSTER,  # L1 table after header, refcount table, refcount block
        1 * CLUSTER, 1,          # refcount table: cluster 1, one cluster long
        0, 0,                    # no snapshots
        0, 0, 0,                 # incompatible / compatible / autoclear features
        4, 104,                  # 16-bit refcounts; header length
    )  # fmt: skip

    def write(f: BinaryIO) -> None:
        f.write(header + ext + backing)
        f.seek(CLUSTER)
        f.write(struct.pack(">Q", 2 * CLUSTER))  # refcount table[0] -> refcount block
        f.seek(2 * CLUSTER)
        f.write(struct.pack(">H", 1) * n_clusters)  # every metadata cluster is used once
        f.truncate(n_clusters * CLUSTER)  # L1 table: zeros, sparse

    write_atomically(dest, write, mode=LAYER_MODE)
    return n_clusters * CLUSTER


def create_uml_cow(dest: Path, base: Image) -> int:
    """Write a UML COW v3 file over a raw `base`, as the UML kernel itself would; return its length.

    UML checks the backing file's size and mtime against the header at every boot, so a base that
    changes after staging is refused by the kernel instead of silently corrupting the job's disk.
    """
    if base.format != "raw":
        raise ApppotError(
            f"UML can only use a raw base image; {base.path} is {base.format}",
            hint="convert it once on the node: qemu-img convert -O raw BASE BASE.raw",
        )
    backing = os.fspath(base.path.absolute()).encode()
    if len(backing) > 4095:
        raise ApppotError(f"base image path is too long for a UML COW file ({len(backing)} > 4095 bytes)")
    st = os.stat(base.path)
    sector, align = 512, 4096
    header = struct.pack(">IIIQIII", UML_COW_MAGIC, 3, int(st.st_mtime) & 0xFFFFFFFF, st.st_size, sector, align, 0)
    header += backing.ljust(4096, b"\0")
    bitmap_off = -(-len(header) // align) * align
    bitmap_len = -(-(-(-st.st_size // sector)) // 8)
    data_off = -(-(bitmap_off + bitmap_len) // align) * align
    length = data_off + st.st_size

    def write(f: BinaryIO) -> None:
        f.write(header)
        f.truncate(length)  # bitmap all zero (nothing copied yet) and data area sparse

    write_atomically(dest, write, mode=LAYER_MODE)
    return length


def read_uml_cow_backing(path: Path) -> Path | None:
    """The backing file a UML COW v3 file names, or None if `path` is not one."""
    with open(path, "rb") as f:
        head = f.read(32 + 4096)
    if len(head) < 32 or struct.unpack(">I", head[:4])[0] != UML_COW_MAGIC:
        return None
    name = head[32:].split(b"\0", 1)[0]
    return Path(os.fsdecode(name)) if name else None


# --- sha256 pinning, cached so a 20 GB base is hashed once, not once per job ------------------------


def hash_file(f: BinaryIO) -> str:
    import hashlib

    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def stat_key(st: os.stat_result) -> dict[str, int]:
    """What identifies one version of a file: a record keyed by it is stale once the file changes."""
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}  # fmt: skip


def digest_sidecar(path: Path) -> Path:
    """Where the node's admin tooling caches an image's digest: IMAGE.sha256 beside it."""
    return path.with_name(path.name + ".sha256")


def _trusted(cache_file: Path, image_st: os.stat_result) -> bool:
    # A cached digest decides whether a pinned base is accepted, so only root's or the image owner's
    # count: a job user must not be able to vouch for an image.
    st = cache_file.stat()
    return st.st_uid in (0, image_st.st_uid) and not st.st_mode & 0o022


def sha256_of(path: Path, *, update_cache: bool = False, memo: bool = False, record_only: bool = False) -> str | None:
    """The image's sha256: from IMAGE.sha256 if trusted and its recorded stat still matches, else
    computed (record_only: else None). `update_cache` (admin tools only; the transfer plugin never writes outside the sandbox)
    rewrites the sidecar. `memo` also keeps it in apppot's cache directories, keyed by the stat (a
    cache key for extracted boot files; never for pins: the user's own cache is not trusted)."""
    import hashlib  # not at module level: most plugin runs never hash, and start-up time counts
    import json

    sidecar = digest_sidecar(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = stat_key(st)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            entry = json.loads(sidecar.read_text())
            if entry["stat"] == key and _trusted(sidecar, st):
                return str(entry["sha256"])
        if record_only:
            return None
        memo_name = ""
        if memo:
            from apppot import cache

            memo_name = "sha256-" + hashlib.sha256(f"{os.path.abspath(path)}:{sorted(key.items())}".encode()).hexdigest()[:32]

            for d in cache.cache_dirs("digests"):
                with contextlib.suppress(OSError):
                    return (d / memo_name).read_text().strip()
        digest = hash_file(f)
    if update_cache:
        write_atomically(sidecar, json.dumps({"stat": key, "sha256": digest}).encode())
    if memo and (d := cache.writable_cache_dir("digests")) is not None:
        with contextlib.suppress(OSError):
            write_atomically(d / memo_name, digest.encode())
    return digest
