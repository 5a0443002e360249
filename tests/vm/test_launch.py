"""apppot's UML kernel and apppot-init before the job's first instruction, in real boots (issue 15)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from apppot import kernel, proc
from tests.vm.conftest import apppot

MOUNTS_AND_LOG = ["sh", "-c", "cat /proc/mounts; dmesg; echo written > from-guest"]


def test_the_kernel_measures_its_delay_loop_against_the_host_clock(uml_kernel: Path) -> None:
    """kernel/patches/0004: no ~50 ms calibration and no lpj= from apppot; the kernel's own
    measurement (it boots without a root here and panics at once)."""
    assert uml_kernel != kernel.PACKAGED, "apppot's kernel is not installed: `make uml-kernel`"
    with tempfile.TemporaryDirectory() as d:
        _, out = proc.run([os.fspath(uml_kernel), "mem=32M", f"umid=lpj{os.getpid()}", f"uml_dir={d}", "con=null",
                           "con0=null,fd:1", "ssl=null", "panic=-1", "root=/dev/apppot-none"], cwd=d, timeout_s=30)  # fmt: skip
    m = re.search(r"Measuring delay loop against the host clock\.\.\. [0-9.]+ BogoMIPS \(lpj=([0-9]+)\)", out)
    assert m, out
    assert 10**5 < int(m.group(1)) < 10**9, out


def _job_mounts(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.split()[1:3] == ["/home/user/job", "hostfs"]]


def test_the_kernel_mounts_the_job_dir_and_init_leaves_it(tiny_image: Path, job_dir: Path) -> None:
    """kernel/patches/0005: /proc and the job dir are mounted before init, and apppot-init does not
    mount the job dir a second time (that would be a fork+exec of mount, ~35 ms under UML)."""
    res = apppot("run", "--backend", "uml", "--image", tiny_image, "--", *MOUNTS_AND_LOG, cwd=job_dir)
    assert res.returncode == 0, res.stderr
    assert "apppot: mounted /proc and hostfs on /home/user/job" in res.stdout
    assert len(_job_mounts(res.stdout)) == 1, res.stdout
    assert (job_dir / "from-guest").read_text() == "written\n"


def test_a_kernel_without_the_premount_still_gets_the_job_dir(tiny_image: Path, job_dir: Path) -> None:
    """Debian's packaged kernel ignores apppot.jobmount=: apppot-init mounts /proc and the job dir."""
    assert kernel.PACKAGED.exists(), f"{kernel.PACKAGED} missing: `make deps` installs Debian's user-mode-linux"
    res = apppot("run", "--backend", "uml", "--kernel", kernel.PACKAGED, "--image", tiny_image, "--",
                 *MOUNTS_AND_LOG, cwd=job_dir)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "apppot: mounted" not in res.stdout
    assert len(_job_mounts(res.stdout)) == 1, res.stdout
    assert (job_dir / "from-guest").read_text() == "written\n"
