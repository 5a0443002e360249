"""Fixtures shared by every tier: the repo, the plugin as HTCondor runs it, small real images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugins" / "apppot_plugin"


def as_user(uid: int, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """argv run as uid and gid `uid`, without supplementary groups: an ordinary user, like a job's on
    an execute node. setpriv needs root but no user namespaces, so it works in a chroot too."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *map(os.fspath, argv)]


def pytest_report_header(config: pytest.Config) -> list[str]:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "missing"

    return [f"qemu-img: {version(['qemu-img', '--version'])}",
            f"qemu: {version(['qemu-system-x86_64', '--version'])}"]  # fmt: skip


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory that other users can traverse (pytest's tmp_path is root-only), for
    tests that run the plugin or a VM as an unprivileged user."""
    d = Path(tempfile.mkdtemp(prefix="apppot-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def plugin_env(open_tmp: Path) -> dict[str, str]:
    """The environment the starter gives the plugin: ours, with a Python that has classad2 first on
    PATH (the plugin's #! is `env python3`) and an image directory of its own."""
    images = open_tmp / "images"
    images.mkdir()
    images.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["APPPOT_IMAGE_PATH"] = os.fspath(images)
    env["PYTHONPATH"] = os.fspath(REPO)
    env["CONDOR_CONFIG"] = "/dev/null"  # no node config: the plugin falls back to the environment
    return env


@pytest.fixture
def images(plugin_env: dict[str, str]) -> Path:
    """An image directory with a raw base (4 MiB, distinctive bytes) and a qcow2 copy of it."""
    d = Path(plugin_env["APPPOT_IMAGE_PATH"])
    raw = d / "base.img"
    with open(raw, "wb") as f:
        f.truncate(4 << 20)
        for off in (0, 1 << 20, (4 << 20) - 4096):
            f.seek(off)
            f.write(os.urandom(4096))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, d / "qbase.qcow2"], check=True)
    return d
