"""What `apppot run` does before the job's first instruction, without a VM (issue 15)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from apppot.backends import uml
from apppot.job import BackendKind, Disk, JobSpec

REPO = Path(__file__).resolve().parents[2]

INIT = REPO / "apppot" / "guest" / "apppot-init"


def uml_argv(tmp_path: Path) -> tuple[str, ...]:
    disk = Disk(tmp_path / "base.img", "raw", tmp_path / "root.cow", "uml-cow", True)
    spec = JobSpec(disk=disk, job_dir=tmp_path, command=("true",), backend=BackendKind.UML, vm_id="t1")
    return uml.UmlBackend().plan(spec, tmp_path, uml.UmlBoot(Path("/k/linux"))).argv


def test_the_kernel_mounts_the_job_dir_and_measures_its_own_delay_loop(tmp_path: Path) -> None:
    """apppot's kernel is asked to mount /proc and the job dir itself (kernel/patches/0005), where
    apppot-init expects it; no lpj= is passed: the kernel measures it in ~3 ms (0004), nothing is
    calibrated or cached by apppot."""
    argv = uml_argv(tmp_path)
    assert "apppot.jobmount=/home/user/job" in argv
    assert re.search(r"^JOB=/home/user/job$", INIT.read_text(), re.M)  # the same place
    assert f"hostfs={tmp_path}" in argv  # what the kernel mounts is still confined to the job dir
    assert not [a for a in argv if a.startswith("lpj=")]


def _is_mounted() -> str:
    """apppot-init's is_mounted function, as text."""
    m = re.search(r"^is_mounted\(\) \{.*?^\}$", INIT.read_text(), re.M | re.S)
    assert m, "apppot-init has no is_mounted()"
    return m.group(0)


def test_apppot_init_mounts_only_what_is_not_mounted(tmp_path: Path) -> None:
    """Under a kernel that premounted the job dir apppot-init must not mount it again (a second hostfs
    on top, and a ~35 ms fork+exec of mount); under Debian's kernel or qemu it must mount it."""
    table = tmp_path / "mounts"
    table.write_text("/dev/root / ext2 rw 0 0\nproc /proc proc rw 0 0\nnone /home/user/job hostfs rw 0 0\n")

    def is_mounted(path: str, mounts: Path) -> bool:
        script = f'{_is_mounted()}\nis_mounted "$1" "$2"'
        return subprocess.run(["busybox", "sh", "-c", script, "sh", path, mounts]).returncode == 0

    assert is_mounted("/home/user/job", table)
    assert is_mounted("/proc", table)
    assert not is_mounted("/home/user", table)  # a prefix is not a mount point
    assert not is_mounted("/home/user/job/sub", table)
    assert not is_mounted("/home/user/job", tmp_path / "no-such-table")  # no /proc yet: mount it
    table.write_text("/dev/root / ext2 rw 0 0\n")
    assert not is_mounted("/home/user/job", table)


def test_the_run_path_imports_nothing_it_does_not_need() -> None:
    """socket (only to stop a VM), hashlib (only for digests) and logging (~3 ms; `--debug` prints
    through proc.debug) stay out of every launch."""
    code = "import sys, apppot.cli, apppot.run, apppot.backends.uml; print(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert "apppot.backends.uml" in loaded
    assert not {"socket", "hashlib", "logging"} & set(loaded)
