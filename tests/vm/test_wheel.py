"""apppot as a packager ships it: a wheel built from the source tree, installed into a fresh virtualenv,
builds the tiny image and runs a job with nothing from the checkout on its path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.vm.conftest import REPO


def run(argv: list[str | os.PathLike[str]], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300, **kw)  # type: ignore[call-overload]  # fmt: skip


def test_wheel_in_a_fresh_venv_builds_and_runs(tmp_path: Path, uml_kernel: Path) -> None:
    # A clean copy of the tree: a setuptools build writes build/ and *.egg-info beside its sources, and
    # a stale build/lib would slip files into the wheel that the tree no longer has.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache"))  # fmt: skip
    # no build isolation: the test venv has setuptools and wheel, so no network is needed
    res = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
               tmp_path / "dist", src])  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("apppot-*.whl")

    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", venv]).returncode == 0
    res = run([venv / "bin/pip", "install", "-q", "--no-deps", "--no-index", wheel])
    assert res.returncode == 0, res.stdout + res.stderr

    # nothing of the checkout on the path: a fresh cwd, no PYTHONPATH
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["APPPOT_KERNEL"] = os.fspath(uml_kernel)
    where = run([venv / "bin/python", "-c", "import apppot, pathlib; print(pathlib.Path(apppot.__file__).parent)"],
                cwd=tmp_path, env=env)  # fmt: skip
    pkg = Path(where.stdout.strip())
    assert pkg.is_relative_to(venv), where.stdout + where.stderr
    assert not (pkg / "demo.py").exists() and not (pkg / "pool.py").exists()  # dev helpers stay in scripts/
    assert os.access(pkg / "guest" / "apppot-init", os.X_OK)

    img = tmp_path / "tiny.img"
    res = run([venv / "bin/apppot", "build", "--tiny", img], cwd=tmp_path, env=env)
    assert res.returncode == 0 and img.is_file(), res.stderr
    job = tmp_path / "job"
    job.mkdir()
    res = run([venv / "bin/apppot", "run", "--image", img, "--", "sh", "-c", "echo hi; exit 3"], cwd=job, env=env)
    assert res.returncode == 3, res.stderr
    assert res.stdout == "hi\n"
