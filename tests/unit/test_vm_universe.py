"""The VM universe's root-run LIBVIRT_XML_SCRIPT and the PostCmd, fed crafted ads and sandboxes.

The script runs as HTCondor's condor_vm-gahp runs it: a process in the job's scratch directory with
the ad on stdin. As root (as on an execute node) the sandbox belongs to JOB_UID, like a job's.
Every attack from docs/security.md gets the same checks: the script exits 0 with a domain that only
powers off (no disk, no share), the reason is in .apppot/status for apppot_vm_post, and a canary
outside the sandbox keeps its owner, mode and content.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from apppot import accel, image
from apppot.condor import libvirt_xml, vm_post
from apppot.submit import condor_arguments
from tests.conftest import REPO

SCRIPT = REPO / "plugins" / "apppot_libvirt_xml"
ROOT = os.geteuid() == 0
JOB_UID = 4243 if ROOT else os.getuid()  # the job's user; as root, not us


@pytest.fixture
def node(open_tmp: Path) -> dict[str, Path]:
    """An execute node: an image directory with a raw base, a boot kit, a canary file and directory
    that belong to root (as the node's own files do), and a scratch dir owned by the job's user."""
    images = open_tmp / "images"
    images.mkdir(mode=0o755)
    base = images / "tiny.img"
    base.write_bytes(os.urandom(4096) * 256)
    (open_tmp / "vmlinuz").write_bytes(b"kernel")
    (open_tmp / "initrd.img").write_bytes(b"initrd")
    canary = open_tmp / "canary"
    canary.write_text("the node's secret\n")
    canary.chmod(0o600)
    canary_dir = open_tmp / "canary.d"
    canary_dir.mkdir(mode=0o755)
    scratch = open_tmp / "dir_4711"
    scratch.mkdir(mode=0o755)
    image.create_qcow2_overlay(scratch / "tiny", image.probe_image(base))
    os.chown(scratch, JOB_UID, JOB_UID)
    os.chown(scratch / "tiny", JOB_UID, JOB_UID)
    return {"images": images, "base": base, "scratch": scratch, "canary": canary, "canary_dir": canary_dir,
            "kernel": open_tmp / "vmlinuz", "initrd": open_tmp / "initrd.img"}  # fmt: skip


def job_file(node: dict[str, Path], name: str, data: bytes = b"") -> Path:
    p = node["scratch"] / name
    p.write_bytes(data)
    os.chown(p, JOB_UID, JOB_UID)
    return p


def job_symlink(node: dict[str, Path], name: str, target: Path) -> None:
    p = node["scratch"] / name
    p.symlink_to(target)
    os.chown(p, JOB_UID, JOB_UID, follow_symlinks=False)


def fingerprint(p: Path) -> tuple[int, int, int, str]:
    st = p.lstat()
    digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else sorted(os.listdir(p)).__repr__()
    return st.st_uid, st.st_gid, st.st_mode, digest


def run_script(node: dict[str, Path], *, env: dict[str, str] | None = None, **attrs: str) -> tuple[int, str, str]:
    """The script as the vm-gahp runs it; returns (exit code, XML, stderr)."""
    ad = {"VMPARAM_VM_NAME": '"tester_vm_7.0"', "JobVMType": '"kvm"', "VMPARAM_vm_Disk": '"tiny:vda:w:qcow2"',
          "JobVMMemory": "384", "RequestCpus": "1", "JobVMNetworking": "false", **attrs}  # fmt: skip
    full_env = {**os.environ, "CONDOR_CONFIG": "/dev/null", "APPPOT_IMAGE_PATH": os.fspath(node["images"]),
                "APPPOT_VM_KERNEL": os.fspath(node["kernel"]), "APPPOT_VM_INITRD": os.fspath(node["initrd"]),
                "APPPOT_VM_DOMAIN_TYPE": "qemu", "PYTHONPATH": os.fspath(REPO), **(env or {})}  # fmt: skip
    proc = subprocess.run([sys.executable, SCRIPT], input="".join(f"{k} = {v}\n" for k, v in ad.items()),
                          cwd=node["scratch"], env=full_env, capture_output=True, text=True, timeout=60)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def status_of(node: dict[str, Path]) -> list[str]:
    return (node["scratch"] / ".apppot" / "status").read_text().splitlines()


def assert_refused(node: dict[str, Path], result: tuple[int, str, str], reason: str) -> None:
    """A VM that can only power off, and the reason where apppot_vm_post finds it."""
    rc, xml, err = result
    assert rc == 0, err  # never a script failure: the startd would take the VM universe offline
    dom = ET.fromstring(xml)
    assert dom.find("devices/disk") is None and dom.find("devices/filesystem") is None, xml
    assert dom.findtext("os/kernel") == os.fspath(node["kernel"])
    assert "apppot.refused" in dom.findtext("os/cmdline")
    assert dom.findtext("seclabel/label") != "+0:+0"
    status = status_of(node)
    assert status[0] == "125" and reason in status[1], status
    assert reason in (node["scratch"] / ".apppot" / "stderr").read_text()


def test_domain_for_a_good_job(node) -> None:
    rc, xml, err = run_script(node, AppPotCommand="\"sh -c 'echo \\\"hi\\\"; exit 3'\"",
                              AppPotKernelArgs='"loglevel=3"')  # fmt: skip
    assert rc == 0, err
    dom = ET.fromstring(xml)
    scratch = node["scratch"]
    assert dom.get("type") == "qemu"
    assert dom.findtext("name") == "tester_vm_7.0"
    assert dom.find("memory").text == "384" and dom.find("memory").get("unit") == "MiB"
    assert dom.find("features/acpi") is not None
    assert dom.findtext("os/kernel") == os.fspath(node["kernel"])
    assert dom.findtext("os/initrd") == os.fspath(node["initrd"])
    cmdline = dom.findtext("os/cmdline")
    assert "APPPOT_JOBFS=9p" in cmdline and "root=/dev/vda" in cmdline and cmdline.endswith("loglevel=3")
    disk = dom.find("devices/disk")
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("source").get("file") == os.fspath(scratch / "tiny")
    assert disk.find("backingStore/format").get("type") == "raw"
    assert disk.find("backingStore/source").get("file") == os.fspath(node["base"])
    assert disk.find("backingStore/backingStore") is not None and len(disk.find("backingStore/backingStore")) == 0
    assert disk.find("target").get("dev") == "vda" and disk.find("target").get("bus") == "virtio"
    # qemu runs as the job's user, libvirt chowns nothing, guest root cannot make host setuid files
    sec = dom.find("seclabel")
    assert (sec.get("model"), sec.get("relabel"), sec.findtext("label")) == ("dac", "no", f"+{JOB_UID}:+{JOB_UID}")
    fs = dom.find("devices/filesystem")
    assert fs.get("accessmode") == "mapped"
    assert fs.find("source").get("dir") == os.fspath(scratch) and fs.find("target").get("dir") == "job"
    assert dom.find("devices/serial").get("type") == "pty"  # libvirt opens no file in the sandbox
    assert dom.find("devices/interface") is None
    # the guest contract, as `apppot run` writes it, by the job's user
    ctl = scratch / ".apppot"
    assert (ctl / "argv").read_text() == "set -- sh -c 'echo \"hi\"; exit 3'\n"
    assert f"APPPOT_UID={JOB_UID}" in (ctl / "params").read_text()
    assert {p.stat().st_uid for p in (ctl, ctl / "argv", ctl / "params")} == {JOB_UID}


def test_vm_working_dir_from_the_ad_is_ignored(node) -> None:
    before = fingerprint(node["canary_dir"])
    rc, xml, err = run_script(node, VM_WORKING_DIR=f'"{node["canary_dir"]}"')
    assert rc == 0, err
    assert ET.fromstring(xml).find("devices/filesystem/source").get("dir") == os.fspath(node["scratch"])
    assert fingerprint(node["canary_dir"]) == before
    assert (node["scratch"] / ".apppot" / "params").exists()


def chained_base(n: dict[str, Path]) -> dict[str, str]:
    """A base in the image directory that itself builds on a file outside them; the job's layer over it."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", n["canary"],
                    n["images"] / "chained.qcow2", "1M"], check=True)  # fmt: skip
    image.create_qcow2_overlay(n["scratch"] / "tiny", image.probe_image(n["images"] / "chained.qcow2"))
    os.chown(n["scratch"] / "tiny", JOB_UID, JOB_UID)
    return {}


ATTACKS = {
    # name: (setup(node) -> ad attributes, reason the job is given)
    "host device as vm_disk": (lambda n: (job_file(n, "sda"), {"VMPARAM_vm_Disk": '"/dev/sda:vda:w:raw"'})[1],
                               "must be the name of a file in the job's sandbox"),
    "node base writable": (lambda n: {"VMPARAM_vm_Disk": f'"{n["base"]}:vda:w:raw"'}, "must be the name of a file"),
    "dot-dot vm_disk": (lambda n: {"VMPARAM_vm_Disk": '"../dir_4711/tiny:vda:w:qcow2"'}, "must be the name of a file"),
    "symlinked vm_disk": (lambda n: (job_symlink(n, "evil", n["canary"]), {"VMPARAM_vm_Disk": '"evil:vda:w:raw"'})[1],
                          "is a symlink"),
    "fifo vm_disk": (lambda n: (os.mkfifo(n["scratch"] / "fifo"), os.chown(n["scratch"] / "fifo", JOB_UID, JOB_UID),
                                {"VMPARAM_vm_Disk": '"fifo:vda:w:raw"'})[2], "is not a regular file"),
    "qcow2 backed by a host file": (
        lambda n: (subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", n["canary"],
                                   n["scratch"] / "evil.qcow2", "1M"], check=True),
                   os.chown(n["scratch"] / "evil.qcow2", JOB_UID, JOB_UID),
                   {"VMPARAM_vm_Disk": '"evil.qcow2:vda:w:qcow2"'})[2],
        "outside this node's image directories"),
    "base whose chain leaves the image dirs": (lambda n: chained_base(n), "outside this node's image directories"),
    "symlinked kernel": (lambda n: (job_symlink(n, "k", n["canary"]), {"AppPotKernel": '"k"'})[1], "is a symlink"),
    "kernel outside the image dirs": (lambda n: {"AppPotKernel": f'"{n["canary"]}"'}, "outside this node's image"),
    "unbalanced quote": (lambda n: {"AppPotCommand": "\"sh -c 'echo\""}, "cannot be split into words"),
    "kernel args unbalanced": (lambda n: {"AppPotKernelArgs": "\"a='b\""}, "cannot be split into words"),
    "non-string command": (lambda n: {"AppPotCommand": "42"}, "must be a string"),
    "no vm_disk": (lambda n: {"VMPARAM_vm_Disk": '""'}, "the job has no vm_disk"),
    "bad device": (lambda n: {"VMPARAM_vm_Disk": '"tiny:../../x:w"'}, "expected FILE:DEVICE"),
}  # fmt: skip
if ROOT:
    ATTACKS["disk owned by another user"] = (
        lambda n: (os.chown(n["scratch"] / "tiny", 0, 0), os.chmod(n["scratch"] / "tiny", 0o644), {})[2],
        "is not owned by the job's user")
    ATTACKS["disk unreadable by the job"] = (lambda n: (os.chown(n["scratch"] / "tiny", 0, 0), {})[1],
                                             "cannot be opened: Permission denied")


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_fails_the_job_not_the_node(node, attack) -> None:
    setup, reason = ATTACKS[attack]
    attrs = setup(node)
    before = fingerprint(node["canary"]), fingerprint(node["base"])
    result = run_script(node, **attrs)
    assert_refused(node, result, reason)
    assert (fingerprint(node["canary"]), fingerprint(node["base"])) == before
    assert os.fspath(node["canary"]) not in result[1]


def test_planted_symlinks_in_control_dir_are_replaced_not_followed(node) -> None:
    ctl = node["scratch"] / ".apppot"
    ctl.mkdir()
    os.chown(ctl, JOB_UID, JOB_UID)
    for name in ("params", "argv", "status", "stdout"):
        (ctl / name).symlink_to(node["canary"])
    before = fingerprint(node["canary"])
    rc, _, err = run_script(node, AppPotCommand='"true"')
    assert rc == 0, err
    assert fingerprint(node["canary"]) == before
    assert not (ctl / "params").is_symlink() and "APPPOT_UID" in (ctl / "params").read_text()
    assert not (ctl / "status").exists()  # stale guest answers are gone


def test_symlinked_control_dir_is_refused_and_replaced(node) -> None:
    (node["scratch"] / ".apppot").symlink_to(node["canary_dir"])
    os.chown(node["scratch"] / ".apppot", JOB_UID, JOB_UID, follow_symlinks=False)
    before = fingerprint(node["canary_dir"])
    result = run_script(node)
    assert_refused(node, result, "is a symlink or not a directory")
    assert fingerprint(node["canary_dir"]) == before
    assert not (node["scratch"] / ".apppot").is_symlink()


def test_node_without_kernel_is_a_node_error(node) -> None:
    rc, _, err = run_script(node, env={"APPPOT_VM_KERNEL": ""}, AppPotCommand="\"'\"")
    assert rc == 1 and "APPPOT_VM_KERNEL is not set" in err


def test_kvm_probe_needs_vmx_or_svm(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    assert accel.kvm_offered("flags\t: fpu sse2 vmx\n", os.fspath(dev))[0]
    assert not accel.kvm_offered("flags\t: fpu sse2 hypervisor\n", os.fspath(dev))[0]  # e.g. kvm-pvm
    assert not accel.kvm_offered("flags\t: vmx\n", os.fspath(tmp_path / "missing"))[0]
    assert libvirt_xml.domain_type("kvm", lambda: False) == "kvm"
    assert libvirt_xml.domain_type("auto", lambda: True) == "kvm"
    assert libvirt_xml.domain_type("auto", lambda: False) == "qemu"


# --- apppot_vm_post (the PostCmd, as the job's user) --------------------------------------------------


@pytest.fixture
def finished(tmp_path: Path, monkeypatch) -> Path:
    """A sandbox after the VM stopped: the guest's answers in .apppot, the plugin's layer, a results disk."""
    ctl = tmp_path / ".apppot"
    ctl.mkdir()
    (ctl / "status").write_text("42\n\n")
    (ctl / "stdout").write_text("out\n")
    (ctl / "stderr").write_text("err\n")
    (tmp_path / "tiny").write_bytes(b"QFI\xfb")
    (tmp_path / "results.img").write_bytes(b"\0" * 512)
    job_ad = tmp_path / ".job.ad"
    job_ad.write_text('VMPARAM_vm_Disk = "tiny:vda:w:qcow2,results.img:vdb:w:raw,../x:vdc:r"\n'
                      'TransferInput = "apppot://tiny,results.img,data.txt"\n')  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("_CONDOR_JOB_AD", os.fspath(job_ad))
    return tmp_path


def test_vm_post_returns_status_and_drops_only_the_staged_layer(finished: Path, monkeypatch) -> None:
    chirped = {}
    monkeypatch.setattr(vm_post, "set_job_attrs", lambda attrs: chirped.update(attrs))
    assert vm_post.main([]) == 0
    assert (finished / "apppot.out").read_text() == "out\n"
    assert (finished / "apppot.err").read_text() == "err\n"
    assert (finished / "apppot.status").read_text().splitlines()[0] == "42"
    assert chirped == {"AppPotExitCode": 42}
    assert not (finished / "tiny").exists()  # the plugin's layer
    assert (finished / "results.img").exists()  # a disk the job brought is an output


def test_vm_post_follows_no_symlink(finished: Path, monkeypatch, open_tmp: Path) -> None:
    canary = open_tmp / "canary"
    canary.write_text("keep\n")
    ctl = finished / ".apppot"
    (ctl / "status").unlink()
    (ctl / "status").symlink_to("/dev/zero")  # read naively, this never ends
    (ctl / "stdout").unlink()
    (ctl / "stdout").symlink_to(canary)
    (finished / "apppot.status").symlink_to(canary)
    (finished / "tiny").unlink()
    (finished / "tiny").symlink_to(canary)
    chirped = {}
    monkeypatch.setattr(vm_post, "set_job_attrs", lambda attrs: chirped.update(attrs))
    assert vm_post.main([]) == 0
    assert canary.read_text() == "keep\n"
    assert not (finished / "apppot.out").exists()
    assert not (finished / "apppot.status").is_symlink()
    assert (finished / "apppot.status").read_text().splitlines()[0] == "255"
    assert chirped["AppPotExitCode"] == 255
    assert (finished / "tiny").is_symlink()  # not a layer the plugin wrote: left alone


def test_vm_post_reports_a_refused_job(finished: Path, monkeypatch) -> None:
    (finished / ".apppot" / "status").write_text("125\nAppPotCommand cannot be split into words\n")
    chirped = {}
    monkeypatch.setattr(vm_post, "set_job_attrs", lambda attrs: chirped.update(attrs))
    vm_post.main([])
    assert chirped == {"AppPotExitCode": 125, "AppPotExitMessage": "AppPotCommand cannot be split into words"}


def test_job_attributes_reach_condor_chirp_as_classad_literals(tmp_path: Path, monkeypatch) -> None:
    import classad2

    chirp = tmp_path / "condor_chirp"
    chirp.write_text(f'#!/bin/sh\nprintf "%s\\0%s\\0" "$2" "$3" >> {tmp_path}/calls\n')
    chirp.chmod(0o755)
    monkeypatch.setattr(vm_post, "chirp_binary", lambda: os.fspath(chirp))
    message = 'base image "naïve café.img" \\ not found\tat all'
    assert vm_post.set_job_attrs({"AppPotExitCode": 125, "AppPotExitMessage": message}) is None
    name1, expr1, name2, expr2, _ = (tmp_path / "calls").read_text().split("\0")
    assert (name1, classad2.ExprTree(expr1).eval()) == ("AppPotExitCode", 125)
    assert (name2, classad2.ExprTree(expr2).eval()) == ("AppPotExitMessage", message)


def test_staged_layers_are_the_apppot_urls(tmp_path: Path) -> None:
    ad = tmp_path / ".job.ad"
    ad.write_text('TransferInput = "apppot://tiny?format=uml-cow, in.txt,apppot:///var/lib/apppot/images/deb.img?sha256=00,'
                  'apppot://../../etc,http://x/y"\n')  # fmt: skip
    assert vm_post.staged_layers(os.fspath(ad)) == ["tiny", "deb.img", "etc"]
    assert vm_post.staged_layers(None) == []
    # the whole job ad as the starter writes it (old syntax, any case), with look-alikes around
    ad.write_text('MyType = "Job"\nTransferInputSizeMB = 1\nArguments = "TransferInput = apppot://x"\n'
                  'transferinput = "apppot://tiny,data.txt"\nEnvironment = "A=apppot://y"\n')  # fmt: skip
    assert vm_post.staged_layers(os.fspath(ad)) == ["tiny"]
    ad.write_text('MyType = "Job"\n')  # no input files at all
    assert vm_post.staged_layers(os.fspath(ad)) == []
    ad.write_text("TransferInput = [[[\n")  # not a ClassAd: remove nothing
    assert vm_post.staged_layers(os.fspath(ad)) == []


# --- submit descriptions ------------------------------------------------------------------------


def test_condor_arguments_quoting() -> None:
    assert condor_arguments(["run", "--", "sh", "-c", "echo 'a b' \"c\""]) == \
        '"run -- sh -c \'echo \'\'a b\'\' ""c""\'"'  # fmt: skip
    assert condor_arguments(["x", ""]) == "\"x ''\""


def test_mode_of_a_layer_is_private(tmp_path: Path) -> None:
    base = tmp_path / "b.img"
    base.write_bytes(b"\0" * 4096)
    image.create_qcow2_overlay(tmp_path / "o", image.probe_image(base))
    image.create_uml_cow(tmp_path / "c", image.probe_image(base))
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o600
