"""VM tier: real boots. Images are built once per content of the builder and guest scripts, cached."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from apppot import build, kernel
from apppot.backends import get_backend
from tests.conftest import as_user

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("APPPOT_CACHE", "/var/cache/apppot")) / "test-images"
TEST_UID = 2345  # an unprivileged submitter


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run this VM test only on these backends")


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


def _prune(images: Iterable[Path], keep: Path) -> None:
    """Drop test images of older builder versions (a Debian one holds ~180 MB), once a day old: a test
    run from another checkout on this machine may still be booting one."""
    for old in images:
        with contextlib.suppress(FileNotFoundError):
            if old != keep and time.time() - old.stat().st_mtime > 86400:
                old.unlink()


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    """The tiny image, rebuilt only when the builder or the guest scripts change. World-readable,
    read-only to everyone: jobs must never write to a base."""
    key = _content_key(REPO / "apppot" / "build.py", REPO / "apppot" / "guest")
    img = CACHE / f"tiny-{key}.img"
    if not img.exists():
        build.build_tiny(img)
        _prune(CACHE.glob("tiny-*.img"), keep=img)
    img.chmod(0o444)
    for d in (CACHE, CACHE.parent):
        d.chmod(0o755)
    return img


@pytest.fixture(autouse=True)
def base_is_never_modified(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every VM test, each base image it used still has the same bytes."""
    images = [request.getfixturevalue(n) for n in ("tiny_image", "debian_image") if n in request.fixturenames]
    before = {img: sha256(img) for img in images}
    yield
    for img, digest in before.items():
        assert sha256(img) == digest, f"the base image {img} was modified"


ALL_BACKENDS = ("uml", "qemu", "libvirt")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test that takes `backend` runs on every backend, or on those its
    `@pytest.mark.backends(...)` names: tests are only generated where they apply, never skipped."""
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("backend", list(marker.args) if marker else list(ALL_BACKENDS), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """A backend usable on this host; a missing component is a failure, not a skip."""
    if request.param in ("qemu", "libvirt"):
        request.getfixturevalue("vm_boot_kit")  # a kernel for images without one (the tiny image)
    if request.param == "libvirt":
        request.getfixturevalue("libvirtd")
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
        argv = as_user(user, argv)
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
            named = f"umid={vm_id}" in cmd or re.search(rf"\bguest={re.escape(vm_id)}(,| |$)", cmd)  # UML | qemu
            if named and stat[stat.rindex(")") + 2] != "Z":
                found.append(f"{entry.name}: {cmd[:120]}")
    return found


@pytest.fixture(scope="session")
def uml_kernel() -> Path:
    return kernel.find_uml_kernel(notice=False)


@pytest.fixture(scope="session")
def debian_image() -> Path:
    """`apppot build --debian`, rebuilt only when the builders or the guest scripts change (~100 s)."""
    from apppot import debian

    key = _content_key(REPO / "apppot" / "debian.py", REPO / "apppot" / "build.py", REPO / "apppot" / "guest")
    img = CACHE / f"debian-bookworm-{key}.img"
    if not img.exists():
        debian.build_debian(img, suite="bookworm", size_mib=1024, mirror="http://deb.debian.org/debian")
        _prune(CACHE.glob("debian-bookworm-*.img"), keep=img)
    img.chmod(0o444)
    return img


@pytest.fixture(scope="session")
def vm_boot_kit(debian_image: Path) -> Iterator[tuple[Path, Path]]:
    """The Debian image's kernel + initramfs (taken out with debugfs, cached by image digest) as the
    default for images that carry none: one kernel boots the tiny and the Debian image alike."""
    from apppot import bootfiles
    from apppot.job import Disk

    with tempfile.TemporaryDirectory() as scratch:  # used only if no cache directory is writable
        boot = bootfiles.find_boot_files(Disk(debian_image, "raw", None, "qcow2", True), kernel=None, initrd=None,
                                    rundir=Path(scratch))  # fmt: skip
    assert boot.initrd is not None
    saved = {k: os.environ.get(k) for k in ("APPPOT_VM_KERNEL", "APPPOT_VM_INITRD")}
    os.environ.update(APPPOT_VM_KERNEL=os.fspath(boot.kernel), APPPOT_VM_INITRD=os.fspath(boot.initrd))
    yield boot.kernel, boot.initrd
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _libvirt_reachable(uri: str = "qemu:///system") -> bool:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        libvirt.open(uri).close()
        return True
    except libvirt.libvirtError:
        return False


def _kvm_device_as_udev_sets_it() -> None:
    """Without udev (this machine kind) /dev/kvm stays root-only 0600. libvirtd then finds KVM in
    its cached probe of qemu but not usable by its qemu user, drops the cache and probes qemu again
    before every domain start: ~1 min per libvirt run. udev's owner and mode (root:kvm 0660) end that."""
    import grp

    kvm = Path("/dev/kvm")
    with contextlib.suppress(KeyError, OSError):
        gid = grp.getgrnam("kvm").gr_gid
        st = kvm.stat()
        if os.geteuid() == 0 and (st.st_gid != gid or st.st_mode & 0o060 != 0o060):
            os.chown(kvm, -1, gid)
            kvm.chmod(0o660)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """libvirtd (and virtlogd) for the libvirt backend: started here if none answers (no systemd in
    the test machine), stopped at the end of the session only if this fixture started them."""
    _kvm_device_as_udev_sets_it()
    if _libvirt_reachable():
        yield
        return
    started = []
    for daemon in ("virtlogd", "libvirtd"):
        with open(CACHE.parent / f"{daemon}.test.log", "ab") as log:
            started.append(subprocess.Popen([f"/usr/sbin/{daemon}"], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, start_new_session=True))  # fmt: skip
    deadline = time.monotonic() + 30
    while not _libvirt_reachable():
        assert time.monotonic() < deadline, "libvirtd did not answer within 30 s"
        assert all(p.poll() is None for p in started), "libvirtd or virtlogd exited at start"
        time.sleep(0.1)
    yield
    for p in reversed(started):
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
