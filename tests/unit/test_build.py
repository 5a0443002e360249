"""`apppot build` and its package data: a broken installation fails loudly, it never builds an image
that lacks a guest file (such an image would boot and never report a status)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apppot import build, debian
from apppot.errors import ApppotError
from tests.conftest import REPO


@pytest.mark.parametrize("name", sorted(build.GUEST_TOOLS))
def test_missing_guest_file_fails_the_build_naming_it(tmp_path: Path, name: str) -> None:
    # a copy of the package with one guest file gone, as a wheel without its package data had it
    shutil.copytree(REPO / "apppot", tmp_path / "apppot", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "apppot" / "guest" / name).unlink()
    out = tmp_path / "tiny.img"
    res = subprocess.run([sys.executable, "-m", "apppot", "build", "--tiny", os.fspath(out)], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.fspath(tmp_path)}, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip
    assert res.returncode == 125, res.stderr
    assert f"apppot: error: guest file {name} is missing" in res.stderr
    assert os.fspath(tmp_path / "apppot" / "guest" / name) in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".tiny.img.*"))


def test_every_guest_file_is_package_data() -> None:
    """setup.cfg ships every file the builders read (apppot-initrd: the initramfs of --debian)."""
    for name in [*build.GUEST_TOOLS, "apppot-initrd"]:
        assert build.read_guest_file(name)
    package_data = next(line for line in (REPO / "setup.cfg").read_text().splitlines()
                        if line.startswith("apppot.guest ="))  # fmt: skip
    shipped = {n.strip() for n in package_data.split("=", 1)[1].split(",")}
    assert shipped == {p.name for p in (REPO / "apppot" / "guest").iterdir() if p.name != "__init__.py"}
    with pytest.raises(ApppotError, match="guest file no-such-file is missing"):
        build.read_guest_file("no-such-file")


def test_cpio_is_newc(tmp_path: Path) -> None:
    """What debian.cpio_newc writes, busybox cpio (as the kernel's initramfs reader, an independent
    one) extracts: names, directories, contents and modes, sizes that need padding included."""
    entries = [("bin", 0o40755, b""), ("bin/tool", 0o100755, b"#!/bin/sh\n"), ("a", 0o100644, b"xyz"),
               ("data", 0o40700, b""), ("data/empty", 0o100600, b"")]  # fmt: skip
    archive = tmp_path / "archive.cpio"
    archive.write_bytes(debian.cpio_newc(entries))
    out = tmp_path / "out"
    out.mkdir()
    listing = subprocess.run(["busybox", "cpio", "-i", "-d", "-v", "-F", archive], cwd=out, capture_output=True,
                             text=True, check=True)  # fmt: skip
    assert sorted(listing.stdout.split()) == sorted(name for name, _, _ in entries), listing.stdout
    for name, mode, data in entries:
        st = (out / name).lstat()
        assert st.st_mode == mode, (name, oct(st.st_mode))
        if not mode & 0o40000:
            assert (out / name).read_bytes() == data, name
