"""The UML kernel's lpj: measured on this host, cached, never a shipped constant."""

from __future__ import annotations

import json
from pathlib import Path

from apppot import kernel


def test_calibration_reads_the_kernels_own_measurement() -> None:
    k = kernel.find_uml_kernel(notice=False)
    assert k != kernel.PACKAGED, "apppot's kernel is not installed: `make uml-kernel`"
    lpj = kernel.calibrate_lpj(k)
    assert lpj is None or 10**5 < lpj < 10**9  # None only if the readings disagreed on a busy host


def test_lpj_is_cached_per_host_and_kernel(tmp_path: Path, monkeypatch) -> None:
    k = kernel.find_uml_kernel(notice=False)
    monkeypatch.setenv("APPPOT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(kernel, "calibrate_lpj", lambda path: calls.append(path) or 12345678)
    assert kernel.lpj_for(k) == 12345678
    assert kernel.lpj_for(k) == 12345678 and len(calls) == 1  # the second run reads the cache
    (entry,) = json.loads((tmp_path / "lpj" / "lpj.json").read_text()).values()
    entry["when"] -= kernel.LPJ_MAX_AGE_S + 1  # a day later (the VM may have migrated): measure again
    (tmp_path / "lpj" / "lpj.json").write_text(json.dumps({kernel._host_key(k): entry}))
    assert kernel.lpj_for(k) == 12345678 and len(calls) == 2
    assert kernel.lpj_for(kernel.PACKAGED) is None  # Debian's kernel: left to calibrate itself
