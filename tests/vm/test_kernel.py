"""The UML kernel's lpj, measured by booting apppot's kernel on this host (it panics at once: no root)."""

from __future__ import annotations

import re

from apppot import kernel, proc


def test_calibration_reads_the_kernels_own_measurement(monkeypatch) -> None:
    k = kernel.find_uml_kernel(notice=False)
    assert k != kernel.PACKAGED, "apppot's kernel is not installed: `make uml-kernel`"
    outputs = []
    real_run = proc.run

    def recording_run(*args, **kwargs):
        rc, out = real_run(*args, **kwargs)
        outputs.append(out)
        return rc, out

    monkeypatch.setattr(proc, "run", recording_run)
    lpj = kernel.calibrate_lpj(k, boots=1)  # one reading: nothing to disagree with on a busy host
    (printed,) = [int(v) for out in outputs for v in re.findall(r"BogoMIPS \(lpj=([0-9]+)\)", out)]
    assert lpj == printed and 10**5 < printed < 10**9, outputs
