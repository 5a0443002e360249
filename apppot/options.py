"""What `apppot run`, `apppot snap` and `apppot submit` share: option value types and the job's disk."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from apppot import image, store
from apppot.errors import ApppotError
from apppot.job import BackendKind, Disk


def walltime(text: str) -> float:
    """3600, 90m, 2h, 1d -> seconds (an argparse type)."""
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"invalid walltime {text!r}: write 3600, 90m or 2h") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the walltime must be positive")
    return value


def memory_mib(text: str) -> int:
    """256M, 1G, 512 (MiB) -> MiB (an argparse type)."""
    try:
        size = image.parse_size(text if text[-1:].isalpha() else text + "M")
    except ApppotError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 32 << 20:
        raise argparse.ArgumentTypeError(f"--mem {text} is too small: a guest needs at least 32M")
    return size >> 20


_held: list[int] = []  # fds of the cache entries this process boots (closed when it exits)


def hold_cached_bases(disk: Disk) -> Disk:
    """Hold a shared flock on every image-cache entry under the job's disk for this process's life, so
    the node's fetch service does not evict a base while the guest runs (apppot/imagecache.py)."""
    from apppot import imagecache

    paths = [disk.base]
    if disk.base_format == "qcow2":
        try:
            paths += [p for p, _ in store.backing_chain(disk.base, confine=False)]
        except ApppotError:
            pass  # a broken chain: the backend reports it, as before
    for p in paths:
        if imagecache.digest_of_entry(os.fspath(p)):
            _held.append(imagecache.hold(os.fspath(p)))
    return disk


def resolve_disk(image_ref: str | None, apppot: str | None, backend: BackendKind, *, discard: bool) -> Disk:
    return hold_cached_bases(_resolve_disk(image_ref, apppot, backend, discard=discard))


def _resolve_disk(image_ref: str | None, apppot: str | None, backend: BackendKind, *, discard: bool) -> Disk:
    """The job's disk from --image IMG (a raw base, a staged COW layer, or an image NAME) or --apppot
    COW,BASE (a persistent layer), checked for what the backend can boot."""
    if apppot:
        sep = "," if "," in apppot else ":"
        if sep not in apppot:
            raise ApppotError(f"--apppot {apppot}: expected COW,BASE", hint="e.g. --apppot my.cow,/images/debian.img")
        cow_s, base_s = apppot.split(sep, 1)
        cow, base = Path(cow_s).absolute(), Path(base_s).absolute()
        base_img = image.probe_image(base)
        layer_format = "uml-cow" if backend == BackendKind.UML else "qcow2"  # qemu/libvirt keep a qcow2 overlay
        if cow.exists() and image.probe_image(cow).format != layer_format:
            raise ApppotError(f"{cow} exists and is not a {layer_format} layer", hint="name a new file or an existing one")
        return Disk(base, base_img.format, cow, layer_format, discard)
    ref = image_ref or os.environ.get("APPPOT_IMAGE")
    if not ref:
        raise ApppotError("no disk image given", hint="pass --image IMG (or set APPPOT_IMAGE); `apppot build --tiny IMG` makes one")
    path = Path(ref)
    if not path.exists() and "/" not in ref:
        path = store.resolve(ref)  # the NAME of an image the node holds
    img = image.probe_image(path.absolute())
    if img.format == "uml-cow":
        backing = image.read_uml_cow_backing(img.path)
        if backing is None:
            raise ApppotError(f"{img.path} is a UML COW file without a backing file name")
        return Disk(backing, "raw", img.path, "uml-cow", discard)
    if img.format == "qcow2" and backend == BackendKind.UML:
        raise ApppotError(
            f"{img.path} is a qcow2 overlay, which UML cannot boot",
            hint=f"stage it for UML with apppot://{img.path.name}?format=uml-cow in transfer_input_files, or use --backend qemu",
        )
    if img.format not in ("raw", "qcow2"):
        raise ApppotError(f"{img.path} is a {img.format} image; apppot boots raw images (and qcow2 with qemu)")
    # A private layer in the run directory (apppot fills in the path), removed afterwards.
    return Disk(img.path, img.format, None, "uml-cow" if backend == BackendKind.UML else "qcow2", True)
