"""The UML kernel's lpj: measured on this host, cached, never a shipped constant."""

from __future__ import annotations

import json
from pathlib import Path

from apppot import kernel


def fake_kernel(tmp_path: Path, *lpjs: int) -> Path:
    """A "kernel" that prints the next of LPJS as UML does when it calibrates (none: prints nothing)."""
    (tmp_path / "readings").write_text("".join(f"{v}\n" for v in lpjs))
    k = tmp_path / "linux"
    k.write_text(f"""#!/bin/sh
v=$(head -n 1 {tmp_path}/readings); sed -i 1d {tmp_path}/readings
[ -n "$v" ] && echo "Calibrating delay loop... 4000.00 BogoMIPS (lpj=$v)"
echo "Kernel panic - not syncing: VFS: Unable to mount root fs"; exit 1
""")
    k.chmod(0o755)
    return k


def test_calibration_reads_the_kernels_own_measurement(tmp_path: Path) -> None:
    """The median of the kernel's own readings when they agree within 10 %, else None (a busy host).
    (The same against apppot's real kernel: tests/vm/test_kernel.py.)"""
    assert kernel.calibrate_lpj(fake_kernel(tmp_path, 1000000, 1050000, 980000)) == 1000000
    assert kernel.calibrate_lpj(fake_kernel(tmp_path, 1000000, 1300000, 1000000)) is None
    assert kernel.calibrate_lpj(fake_kernel(tmp_path, 1000000)) is None  # no reading at all


def test_lpj_is_cached_per_host_and_kernel(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "k").mkdir()
    k = fake_kernel(tmp_path / "k")  # only its path and stat matter: calibrate_lpj is replaced
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
