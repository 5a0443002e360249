"""The node's image directories (APPPOT_IMAGE_PATH) and how names and paths resolve inside them."""

from __future__ import annotations

import os

from apppot.errors import ApppotError, NotFoundError
from apppot.knobs import condor_param

KNOB = "APPPOT_IMAGE_PATH"
# A NAME may omit the usual suffixes: apppot://debian finds debian, debian.img, debian.raw, debian.qcow2.
SUFFIXES = ("", ".img", ".raw", ".qcow2")
NOT_IMAGES = (".sha256", ".part", ".tmp")


if False:  # for type checkers only: pathlib loads where a Path is made (the plugin's -classad needs none)
    from pathlib import Path


def image_dirs(*, env_first: bool = False) -> list[str]:
    """The image directories (the knob APPPOT_IMAGE_PATH, colon-separated). env_first: see
    knobs.condor_param (the plugin; root-run scripts read HTCondor's config)."""
    return [p for p in (condor_param(KNOB, env_first=env_first) or "").split(":") if p.strip()]


def image_path() -> list[Path]:
    from pathlib import Path

    return [Path(p) for p in image_dirs()]


def _inside(path: str | Path, dirs: list[str] | list[Path]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(d)]) == os.path.realpath(d) for d in dirs)


def resolve(ref: str, dirs: list[str] | list[Path] | None = None) -> Path:
    """Map an image reference (a NAME, or an absolute path) to a file inside the image directories.

    Symlinks are followed, but the final file must still lie inside one of the directories, so a
    job cannot use the plugin to read or reference arbitrary files on the node.
    """
    from pathlib import Path

    dirs = image_dirs() if dirs is None else dirs
    if not dirs:
        raise ApppotError(
            "this node has no image directories configured",
            hint=f"the node's admin must set {KNOB} in the HTCondor configuration (see condor_config.d/50-apppot.conf)",
        )
    where = ":".join(map(os.fspath, dirs))
    if ".." in Path(ref).parts:
        raise ApppotError(f"image reference {ref!r} contains '..'", hint=f"name an image inside {where}")
    if ref.startswith("/"):
        candidates = [Path(ref)]
        if not _inside(Path(ref), dirs):
            raise ApppotError(
                f"{ref} is outside this node's image directories ({where})",
                hint="use apppot://NAME for an image the node holds, or ask the admin to add its directory",
            )
    else:
        if not ref:
            raise ApppotError("the URL names no image", hint="write apppot://NAME, e.g. apppot://debian")
        candidates = [Path(d, ref + s) for d in dirs for s in SUFFIXES]
    for c in candidates:
        if c.is_file() or (c.exists() and not c.is_dir()):
            if not _inside(c, dirs):
                raise ApppotError(
                    f"image {ref!r} resolves to {os.path.realpath(c)}, outside the image directories ({where})",
                    hint="a symlink in the image directory escapes it; the node's admin must fix it",
                )
            return c
    if ref.startswith("/") and Path(ref).is_dir():
        raise ApppotError(f"{ref} is a directory, not an image")
    known = ", ".join(list_images(dirs)) or "none"
    raise NotFoundError(f"no image named {ref!r} on this node (in {where})", hint=f"images here: {known}")


MAX_CHAIN_DEPTH = 16


def backing_chain(top: Path, dirs: list[str] | list[Path] | None = None, *, confine: bool = True) -> list[tuple[Path, str]]:
    """The images below `top` that qemu would open, as [(resolved path, format)], nearest first.

    The one rule for every backing file, used by the transfer plugin (for a base) and by the VM
    universe's domain generator (for a disk the job brought): each must resolve inside the node's
    image directories, so a crafted qcow2 cannot make qemu open a host device or another job's disk.
    Formats come from the headers (a recorded backing format, else the file's own magic). `top` is
    read as the caller can read it; callers check where `top` itself is. `confine=False` (a user's own
    `apppot run`, with the user's own rights) only resolves the chain.
    """
    from pathlib import Path

    dirs = [] if not confine else image_dirs() if dirs is None else dirs
    where = ":".join(map(os.fspath, dirs)) or "none configured"
    from apppot import image  # not at module level: the plugin's -classad path never needs it

    chain: list[tuple[Path, str]] = []
    current = top
    while True:
        try:
            header = image.read_qcow2_header(current)
        except ApppotError as e:
            raise ApppotError(f"image {current}: {e.message}") from None
        if header is None:
            return chain
        if header.has_external_data_file:
            raise ApppotError(f"qcow2 image {current} keeps its data in an external file, which apppot refuses",
                              hint="convert it: qemu-img convert -O qcow2 IMAGE NEW.qcow2")  # fmt: skip
        if header.backing is None:
            return chain
        backing = Path(header.backing)
        if not backing.is_absolute():
            backing = current.parent / backing
        if confine and (".." in backing.parts or not _inside(backing, dirs)):
            raise ApppotError(
                f"qcow2 image {current} is backed by {header.backing}, outside this node's image directories ({where})",
                hint="an image may only build on a base the node holds: stage it with apppot://NAME",
            )
        real = Path(os.path.realpath(backing))
        if not real.is_file():
            raise NotFoundError(f"qcow2 image {current} is backed by {header.backing}, which does not exist")
        fmt = header.backing_format or image.probe_image(real).format
        if fmt not in ("raw", "qcow2"):
            raise ApppotError(f"qcow2 image {current} is backed by {real} in {fmt} format, which apppot cannot use")
        chain.append((real, fmt))
        if len(chain) > MAX_CHAIN_DEPTH:
            raise ApppotError(f"the backing chain of {top} is longer than {MAX_CHAIN_DEPTH} (a loop?)")
        current = real


def list_images(dirs: list[str] | list[Path] | None = None) -> list[str]:
    """Names of the images the node holds, for the slot ad and for error messages."""
    dirs = image_dirs() if dirs is None else dirs
    names: list[str] = []
    for d in dirs:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(".") or e.name.endswith(NOT_IMAGES) or not e.is_file():
                continue
            name = next((e.name[: -len(s)] for s in SUFFIXES[1:] if e.name.endswith(s)), e.name)
            if name not in names:
                names.append(name)
    return names
