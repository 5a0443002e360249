"""qemu and libvirt specifics: the launch plan, the domain XML, cleanup when apppot itself dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from apppot import accel
from apppot.backends import libvirt as lv
from apppot.backends import qemu
from apppot.bootfiles import BootFiles
from apppot.job import BackendKind, Disk, JobSpec
from tests.vm.conftest import REPO, apppot, vm_processes


def spec_for(tmp_path: Path, backend: str) -> JobSpec:
    disk = Disk(Path("/images/base.img"), "raw", tmp_path / "root.qcow2", "qcow2", True)
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


def test_kvm_probe_is_cached_and_explains_itself():
    ok, why = accel.kvm_probe()
    assert isinstance(ok, bool) and why
    assert accel.kvm_probe() == (ok, why)


def test_check_lists_every_backend(job_dir, libvirtd):
    res = apppot("check", cwd=job_dir)
    lines = res.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["uml", "qemu", "libvirt"], res.stdout


def test_sigkill_of_the_libvirt_launcher_leaves_no_vm(tiny_image, vm_boot_kit, job_dir, libvirtd):
    """libvirtd, not apppot, owns the qemu process: if the launcher apppot supervises is SIGKILLed,
    AUTODESTROY still ends the domain when its connection drops."""
    vm_id = "sigkill-libvirt"
    argv = [sys.executable, "-m", "apppot", "run", "--backend", "libvirt", "--image", os.fspath(tiny_image),
            "--id", vm_id, "--", "sh", "-c", "echo started; sleep 100"]  # fmt: skip
    p = subprocess.Popen(argv, cwd=job_dir, env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == "started\n"
    assert vm_processes(vm_id) != []
    launchers = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and _cmdline(e.path).startswith(
        f"{sys.executable} -m apppot.backends.libvirt") and f"apppot-{vm_id}-" in _cmdline(e.path)]  # fmt: skip
    assert len(launchers) == 1
    os.kill(launchers[0], signal.SIGKILL)
    p.communicate(timeout=60)
    deadline = time.monotonic() + 15
    while vm_processes(vm_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vm_processes(vm_id) == []
    assert p.returncode == 255  # no guest status: the VM was destroyed


def _cmdline(proc_dir: str) -> str:
    try:
        return Path(proc_dir, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_plugin_staged_qcow2_overlay_runs_under_qemu(tiny_image, vm_boot_kit, job_dir):
    overlay = job_dir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", tiny_image, overlay], check=True)
    res = apppot("run", "--backend", "qemu", "--image", overlay, "--", "sh", "-c", "echo kept > /root/x", cwd=job_dir)
    assert res.returncode == 0, res.stderr
    res = apppot("run", "--backend", "qemu", "--image", overlay, "--", "sh", "-c", "cat /root/x || echo absent",
                 cwd=job_dir)  # fmt: skip
    assert res.stdout == "absent\n", "a private layer over the given overlay: nothing persists"
