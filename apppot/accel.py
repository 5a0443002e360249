"""KVM or TCG: whether KVM can really run a Linux kernel on this host (one probe, cached per host boot).

A paravirtual nested KVM (e.g. kvm-pvm on this CI machine kind) offers /dev/kvm without vmx/svm; it
runs a BIOS but dies with "KVM internal error ... emulation failure" in a Linux kernel's
decompressor. So: /dev/kvm must open, the CPU must advertise vmx or svm, and, when a kernel is at
hand, a real boot under KVM must reach that kernel's panic. Used by the qemu and libvirt backends
and by the VM universe's domain generator.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from apppot import cache, image, proc
from apppot.domain import MACHINE

if TYPE_CHECKING:
    from apppot.bootfiles import BootFiles

QEMU = "qemu-system-x86_64"
KVM_PROBE_TIMEOUT_S = 20.0


def kvm_offered(cpuinfo: str | None = None, dev: str = "/dev/kvm") -> tuple[bool, str]:
    """(usable so far, reason): /dev/kvm opens and the CPU advertises vmx or svm."""
    try:
        os.close(os.open(dev, os.O_RDWR))
    except OSError as e:
        return False, f"{dev}: {e.strerror}"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    if not flags & {"vmx", "svm"}:
        return False, f"{dev} exists but the CPU has no vmx/svm: a paravirtual nested KVM cannot boot Linux"
    return True, "vmx/svm present"


def choose_accel(boot: BootFiles | None = None, *, notice: bool = False) -> str:
    """"kvm" if KVM really runs a kernel here, else "tcg". APPPOT_ACCEL=kvm|tcg overrides the probe."""
    forced = os.environ.get("APPPOT_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    ok, why = kvm_probe(boot)
    if not ok and notice:
        print(f"apppot: notice: KVM is not usable here ({why}); qemu emulates the CPU (TCG), which is slower",
              file=sys.stderr)  # fmt: skip
    return "kvm" if ok else "tcg"


def kvm_probe(boot: BootFiles | None = None) -> tuple[bool, str]:
    """(usable, reason), cached per host boot: /dev/kvm must open, the CPU must offer vmx/svm
    (a paravirtual nested KVM such as kvm-pvm offers /dev/kvm without them and fails in a real
    kernel), and, when a kernel is at hand, a real boot under KVM must reach the kernel's panic."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    memo = f"kvm-probe-{platform.release()}-{boot_id}.json"
    for d in cache.cache_dirs("boot"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            cached = json.loads((d / memo).read_text())
            return bool(cached["usable"]), str(cached["reason"])
    usable, reason = _probe_kvm_uncached(boot)
    if boot is not None or not usable:  # a positive answer without a real boot is not final
        with contextlib.suppress(OSError):
            d = cache.writable_cache_dir("boot")
            if d is not None:
                image.write_atomically(d / memo, json.dumps({"usable": usable, "reason": reason}).encode())
    return usable, reason


def _probe_kvm_uncached(boot: BootFiles | None) -> tuple[bool, str]:
    ok, why = kvm_offered()
    if not ok or boot is None:
        return ok, why
    qemu = shutil.which(QEMU)
    if qemu is None:
        return False, f"{QEMU} is not installed"
    with tempfile.TemporaryDirectory(prefix="apppot-kvm-probe-") as tmp:
        log = Path(tmp) / "log"
        argv = [qemu, "-machine", f"{MACHINE},accel=kvm", "-cpu", "host", "-m", "128", "-nodefaults",
                "-no-user-config", "-no-reboot", "-display", "none", "-serial", "stdio",
                "-kernel", os.fspath(boot.kernel), "-append", "console=ttyS0 panic=-1 rdinit=/nonexistent"]  # fmt: skip
        rc, timed_out, _ = proc.supervise(argv, log_path=log, walltime_s=KVM_PROBE_TIMEOUT_S,
                                          polite_stop=lambda pid: None, grace_s=0)  # fmt: skip
        text = log.read_text(errors="replace")
    if re.search(r"Kernel panic|No working init", text):
        return True, "a kernel booted under KVM"
    if timed_out:
        return False, f"a kernel did not boot within {KVM_PROBE_TIMEOUT_S:.0f} s under KVM"
    last = (text.strip().splitlines() or ["no output"])[-1]
    return False, f"KVM failed to run a kernel (qemu exit {rc}: {last[:100]})"
