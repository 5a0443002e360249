"""apppot's LIBVIRT_XML_SCRIPT, PostCmd and submit description, without a pool (fast; in the condor
tier because they are HTCondor integration code)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from apppot import image
from apppot.condor import libvirt_xml, vm_post
from apppot.errors import ApppotError
from apppot.submit import build_submit, condor_arguments


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    base = tmp_path / "images" / "tiny.img"
    base.parent.mkdir()
    base.write_bytes(b"\0" * (1 << 20))
    work = tmp_path / "dir_123"
    work.mkdir()
    image.create_qcow2_overlay(work / "tiny", image.probe_image(base))
    (work / "vmlinuz").write_bytes(b"k")
    return work


def ad_text(work: Path, **extra: str) -> str:
    attrs = {"VM_WORKING_DIR": f'"{work}"', "VMPARAM_VM_NAME": '"tester_vm_7.0"', "JobVMType": '"kvm"',
             "VMPARAM_vm_Disk": '"tiny:vda:w:qcow2"', "JobVMMemory": "384", "RequestCpus": "1",
             "JobVMNetworking": "false", **extra}  # fmt: skip
    return "".join(f"{k} = {v}\n" for k, v in attrs.items())


def test_domain_from_job_ad(scratch: Path, monkeypatch) -> None:
    monkeypatch.setenv("APPPOT_VM_DOMAIN_TYPE", "auto")
    monkeypatch.setattr(libvirt_xml, "kvm_usable", lambda: False)
    monkeypatch.setattr(libvirt_xml, "condor_param", lambda name: {"APPPOT_VM_DOMAIN_TYPE": "auto"}.get(name))
    xml = libvirt_xml.generate(ad_text(scratch, AppPotCommand="\"sh -c 'echo \\\"hi\\\"; exit 3'\"",
                                       AppPotKernel='"vmlinuz"', AppPotKernelArgs='"loglevel=3"'))  # fmt: skip
    dom = ET.fromstring(xml)
    assert dom.get("type") == "qemu"  # no usable KVM: TCG
    assert dom.findtext("name") == "tester_vm_7.0"
    assert dom.find("memory").text == "384" and dom.find("memory").get("unit") == "MiB"
    assert dom.find("features/acpi") is not None
    assert dom.findtext("os/kernel") == os.fspath(scratch / "vmlinuz")
    cmdline = dom.findtext("os/cmdline")
    assert "APPPOT_JOBFS=9p" in cmdline and "root=/dev/vda" in cmdline and cmdline.endswith("loglevel=3")
    disk = dom.find("devices/disk")
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("source").get("file") == os.fspath(scratch / "tiny")
    assert disk.find("backingStore/format").get("type") == "raw"
    assert disk.find("backingStore/source").get("file").endswith("images/tiny.img")
    assert disk.find("target").get("dev") == "vda" and disk.find("target").get("bus") == "virtio"
    fs = dom.find("devices/filesystem")
    assert fs.get("accessmode") == "passthrough"
    assert fs.find("source").get("dir") == os.fspath(scratch) and fs.find("target").get("dir") == "job"
    assert dom.find("devices/serial/source").get("path") == os.fspath(scratch / ".apppot/console.log")
    assert dom.find("devices/interface") is None
    # the guest contract, as `apppot run` writes it
    assert (scratch / ".apppot/argv").read_text() == "set -- sh -c 'echo \"hi\"; exit 3'\n"
    assert f"APPPOT_UID={os.getuid()}" in (scratch / ".apppot/params").read_text()


def test_kernel_named_by_job_must_be_a_transferred_file(scratch: Path, monkeypatch) -> None:
    monkeypatch.setattr(libvirt_xml, "condor_param", lambda name: None)
    with pytest.raises(ApppotError):
        libvirt_xml.generate(ad_text(scratch, AppPotKernel='"../../etc/shadow"'))


def test_kvm_probe_needs_vmx_or_svm(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    assert libvirt_xml.kvm_usable("flags\t: fpu sse2 vmx\n", os.fspath(dev))
    assert not libvirt_xml.kvm_usable("flags\t: fpu sse2 hypervisor\n", os.fspath(dev))  # e.g. kvm-pvm
    assert not libvirt_xml.kvm_usable("flags\t: vmx\n", os.fspath(tmp_path / "missing"))
    assert libvirt_xml.domain_type("kvm", lambda: False) == "kvm"
    assert libvirt_xml.domain_type(None, lambda: True) == "kvm"


def test_vm_post_returns_status_and_drops_disk(tmp_path: Path, monkeypatch) -> None:
    ctl = tmp_path / ".apppot"
    ctl.mkdir()
    (ctl / "status").write_text("42\n\n")
    (ctl / "stdout").write_text("out\n")
    (ctl / "stderr").write_text("err\n")
    (tmp_path / "tiny").write_bytes(b"QFI\xfb")
    job_ad = tmp_path / ".job.ad"
    job_ad.write_text('VMPARAM_vm_Disk = "tiny:vda:w:qcow2"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("_CONDOR_JOB_AD", os.fspath(job_ad))
    chirped = {}
    monkeypatch.setattr(vm_post, "set_job_attrs", lambda attrs: chirped.update(attrs))
    assert vm_post.main([]) == 0
    assert (tmp_path / "apppot.out").read_text() == "out\n"
    assert (tmp_path / "apppot.err").read_text() == "err\n"
    assert (tmp_path / "apppot.status").read_text().splitlines()[0] == "42"
    assert chirped == {"AppPotExitCode": 42}
    assert not (tmp_path / "tiny").exists()


def test_condor_arguments_quoting() -> None:
    assert condor_arguments(["run", "--", "sh", "-c", "echo 'a b' \"c\""]) == \
        '"run -- sh -c \'echo \'\'a b\'\' ""c""\'"'  # fmt: skip
    assert condor_arguments(["x", ""]) == "\"x ''\""


def test_build_submit_vanilla(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    d = build_submit(image="tiny", command=["./run", "a b"], universe="vanilla", memory_mib=300,
                     inputs=["in.txt"], changes=None, job_dir=tmp_path)  # fmt: skip
    assert d["executable"] == "$$(APPPOT_LAUNCHER)" and d["transfer_executable"] == "false"
    assert d["transfer_input_files"] == "apppot://tiny?format=uml, in.txt"
    assert d["arguments"] == "\"run --image tiny --discard-disk --mem 300M -- ./run 'a b'\""
    assert d["request_memory"] == "364"
    assert 'stringListMember("tiny", AppPotImages)' in d["requirements"]
    with pytest.raises(ApppotError):
        build_submit(image="tiny", command=[], universe="vanilla", memory_mib=256, inputs=["nope"],
                     changes=None, job_dir=tmp_path)  # fmt: skip
