"""qemu and libvirt without a VM: the launch plan, the domain XML, the cached KVM probe."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from apppot import accel, cache
from apppot.backends import libvirt as lv
from apppot.backends import qemu
from apppot.bootfiles import BootFiles
from apppot.job import BackendKind, Disk, JobSpec


def spec_for(tmp_path: Path, backend: str) -> JobSpec:
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * 65536)  # a raw base (the libvirt XML reads its backing chain)
    disk = Disk(base, "raw", tmp_path / "root.qcow2", "qcow2", True)
    return JobSpec(disk=disk, job_dir=tmp_path, command=("true",), backend=BackendKind(backend), vm_id="t1")


def test_qemu_plan(tmp_path):
    b = qemu.QemuBackend(qemu=Path("/usr/bin/qemu-system-x86_64"))
    boot = qemu.QemuBoot(BootFiles(Path("/k/vmlinux"), Path("/k/initrd.img"), "test"), "tcg")
    argv = b.plan(spec_for(tmp_path, "qemu"), tmp_path, boot).argv
    assert argv[argv.index("-machine") + 1] == "q35,accel=tcg"
    assert "-no-reboot" in argv and "panic=-1" in argv[argv.index("-append") + 1]
    assert f"local,id=job,path={tmp_path},security_model=none" in argv
    assert any(a.startswith("file=") and "format=qcow2" in a for a in argv)  # never the raw base itself


def test_libvirt_domain_xml(tmp_path):
    boot = qemu.QemuBoot(BootFiles(Path("/k/vmlinux"), Path("/k/initrd.img"), "test"), "tcg")
    xml = lv.domain_xml(spec_for(tmp_path, "libvirt"), tmp_path, boot=boot, emulator=None)
    d = ET.fromstring(xml)
    assert d.get("type") == "qemu" and d.find("features/acpi") is not None
    assert d.find("devices/disk/backingStore/format").get("type") == "raw"
    assert d.find("devices/filesystem/target").get("dir") == "job"
    assert d.find("seclabel").get("relabel") == "no"  # libvirt must not chown the base
    assert {d.find(e).text for e in ("on_poweroff", "on_reboot", "on_crash")} == {"destroy"}


def test_kvm_probe_is_cached_and_explains_itself(tmp_path, monkeypatch):
    """A final answer (negative, or positive after a real boot) is probed once and then read from the
    cache; a positive answer without a boot is not final, so it is probed again. Each has a reason."""
    usable, why = accel._probe_kvm_uncached(None)  # the real probe, without a boot: an answer and why
    assert isinstance(usable, bool) and why
    monkeypatch.setattr(cache, "cache_dirs", lambda sub: [tmp_path])  # not the host's real memo
    monkeypatch.setattr(cache, "writable_cache_dir", lambda sub: tmp_path)
    probes = []

    def probe(answer):
        def fake(boot):
            probes.append(boot)
            return answer

        return fake

    monkeypatch.setattr(accel, "_probe_kvm_uncached", probe((False, "/dev/kvm: No such file or directory")))
    assert accel.kvm_probe() == (False, "/dev/kvm: No such file or directory")
    assert accel.kvm_probe() == (False, "/dev/kvm: No such file or directory") and len(probes) == 1
    assert len(list(tmp_path.glob("kvm-probe-*.json"))) == 1

    for memo in tmp_path.glob("kvm-probe-*.json"):
        memo.unlink()
    monkeypatch.setattr(accel, "_probe_kvm_uncached", probe((True, "vmx/svm present")))
    probes.clear()
    assert accel.kvm_probe() == accel.kvm_probe() == (True, "vmx/svm present") and len(probes) == 2
    assert list(tmp_path.glob("kvm-probe-*.json")) == []
