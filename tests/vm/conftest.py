"""VM tier: real boots. Images are built once per content of the builder and guest scripts, cached."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from apppot import build, kernel
from apppot.backends import get_backend

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("APPPOT_CACHE", "/var/cache/apppot")) / "test-images"
TEST_UID = 2345  # an unprivileged submitter


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)


def _content_key(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    """The tiny image, rebuilt only when the builder or the guest scripts change. World-readable,
    read-only to everyone: jobs must never write to a base."""
    key = _content_key(REPO / "apppot" / "build.py", REPO / "apppot" / "guest")
    img = CACHE / f"tiny-{key}.img"
    if not img.exists():
        build.build_tiny(img)
    img.chmod(0o444)
    for d in (CACHE, CACHE.parent):
        d.chmod(0o755)
    return img


@pytest.fixture(autouse=True)
def base_is_never_modified(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every VM test, each base image it used still has the same bytes."""
    images = [request.getfixturevalue(n) for n in ("tiny_image",) if n in request.fixturenames]
    before = {img: sha256(img) for img in images}
    yield
    for img, digest in before.items():
        assert sha256(img) == digest, f"the base image {img} was modified"


@pytest.fixture(params=["uml"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each test runs on every backend; a missing component is a failure, not a skip."""
    reason = get_backend(request.param).unavailable_reason()
    assert reason is None, f"backend {request.param} cannot run here: {reason} (make test installs it)"
    return str(request.param)


@pytest.fixture
def job_dir() -> Iterator[Path]:
    """A job directory an unprivileged user can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="apppot-job-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def apppot(*args: str | os.PathLike[str], cwd: Path, timeout: float = 120, user: int | None = None,
           **kw: object) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run the apppot CLI as a user would (a separate process, own session)."""
    argv = [sys.executable, "-m", "apppot", *map(os.fspath, args)]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    env = kw.pop("env", None) or {**os.environ, "PYTHONPATH": os.fspath(REPO)}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]  # fmt: skip


def vm_processes(vm_id: str) -> list[str]:
    """Host processes whose command line mentions this VM's id (UML names every process after it)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if f"umid={vm_id}" in cmd and stat[stat.rindex(")") + 2] != "Z":
                found.append(f"{entry.name}: {cmd[:120]}")
    return found


@pytest.fixture(scope="session")
def uml_kernel() -> Path:
    return kernel.find_uml_kernel(notice=False)
