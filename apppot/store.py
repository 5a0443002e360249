"""The node's image directories (APPPOT_IMAGE_PATH) and how names and paths resolve inside them."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from apppot.errors import ApppotError, NotFoundError

KNOB = "APPPOT_IMAGE_PATH"
# A NAME may omit the usual suffixes: apppot://debian finds debian, debian.img, debian.raw, debian.qcow2.
SUFFIXES = ("", ".img", ".raw", ".qcow2")
NOT_IMAGES = (".sha256", ".part", ".tmp")


def image_path() -> list[Path]:
    """The image directories: the HTCondor knob APPPOT_IMAGE_PATH when the bindings are available
    and it is set, else the environment variable of the same name. Colon-separated."""
    value = None
    try:
        with warnings.catch_warnings():  # the bindings warn when there is no condor_config at all
            warnings.simplefilter("ignore")
            import htcondor2

        value = htcondor2.param.get(KNOB)
    except Exception:  # no bindings, or a broken config: fall back to the environment
        value = None
    value = value or os.environ.get(KNOB, "")
    return [Path(p) for p in value.split(":") if p.strip()]


def _inside(path: Path, dirs: list[Path]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(d)]) == os.path.realpath(d) for d in dirs)


def resolve(ref: str, dirs: list[Path] | None = None) -> Path:
    """Map an image reference (a NAME, or an absolute path) to a file inside the image directories.

    Symlinks are followed, but the final file must still lie inside one of the directories, so a
    job cannot use the plugin to read or reference arbitrary files on the node.
    """
    dirs = image_path() if dirs is None else dirs
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
        candidates = [d / (ref + s) for d in dirs for s in SUFFIXES]
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


def list_images(dirs: list[Path] | None = None) -> list[str]:
    """Names of the images the node holds, for the slot ad and for error messages."""
    dirs = image_path() if dirs is None else dirs
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
