"""Boot soak (issue 7): 300 consecutive boots of the tiny image through apppot's own run path,
each with a fresh UML COW layer exactly as `apppot run` makes it, each within a deadline."""

from __future__ import annotations

import io
import os
import statistics
import sys
import time
from pathlib import Path

import pytest

from apppot import job, kernel, run
from apppot.backends.uml import UmlBackend
from tests.vm.conftest import vm_processes

pytestmark = pytest.mark.soak  # minutes of boots: `make test` runs it, `make test-unit` and `-m "not soak"` do not

BOOTS = int(os.environ.get("APPPOT_SOAK_BOOTS", "300"))
DEADLINE_S = 10.0  # a healthy boot+job+poweroff takes ~0.2-0.5 s; a livelocked one never ends


def test_300_boots_without_a_hang(tiny_image: Path, job_dir: Path, monkeypatch) -> None:
    k = kernel.find_uml_kernel(notice=False)
    assert k != kernel.PACKAGED, "the soak is about apppot's own kernel: run `make uml-kernel`"
    sink = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(sink))  # the jobs' output is checked in the file
    failures, walls = [], []
    for i in range(BOOTS):
        spec = job.JobSpec(
            disk=job.Disk(tiny_image, "raw", None, "uml-cow", True),
            job_dir=job_dir,
            command=("sh", "-c", f"echo boot {i} > boot.txt; exit {i % 200}"),
            memory_mib=128,
            walltime_s=DEADLINE_S,
            grace_s=1,
            vm_id=f"soak-{os.getpid()}-{i}",
        )
        t0 = time.monotonic()
        outcome = run.run_job(spec, UmlBackend())
        walls.append(time.monotonic() - t0)
        ok = (outcome.exit_code == i % 200 and not outcome.timed_out
              and (job_dir / "boot.txt").read_text() == f"boot {i}\n")  # fmt: skip
        if not ok:
            failures.append((i, outcome, (job_dir / ".apppot" / "console.log").read_text()[-500:]))
        assert vm_processes(spec.vm_id) == []
    walls.sort()
    print(f"\n{BOOTS} boots: median {statistics.median(walls):.3f} s, p95 {walls[int(0.95 * len(walls))]:.3f} s, "
          f"max {walls[-1]:.3f} s", file=sys.__stdout__)  # fmt: skip
    assert failures == [], f"{len(failures)} of {BOOTS} boots failed or hung: {failures[:3]}"
