"""`apppot build --debian`: one image file that boots under UML, qemu and libvirt."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


from apppot import debian
from apppot import bootfiles
from tests.vm.conftest import apppot


def debugfs(img: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, img], capture_output=True, text=True, check=True).stdout


def test_image_layout(debian_image):
    """ext4, user `user` with sudo, the guest tools, and the qemu kernel + initramfs in /boot/apppot."""
    assert "Filesystem features:" in (info := subprocess.run(["dumpe2fs", "-h", debian_image], capture_output=True,
                                                             text=True, check=True).stdout)  # fmt: skip
    assert "extent" in info  # ext4
    listing = debugfs(debian_image, "ls -l /boot/apppot")
    for name in ("vmlinuz", "initrd.img", "version", "config"):
        assert name in listing
    assert "apppot-init" in debugfs(debian_image, "ls -l /usr/sbin")  # /sbin -> usr/sbin (merged /usr)
    assert "user" in debugfs(debian_image, "cat /etc/sudoers.d/apppot")


def test_initramfs_has_the_modules_in_dependency_order(debian_image, tmp_path):
    initrd = tmp_path / "initrd.img"
    assert bootfiles.debugfs_dump(debian_image, "/boot/apppot/initrd.img", initrd)
    names = [n.decode() for n in re.findall(rb"modules/([\w-]+)\.ko\0", initrd.read_bytes())]
    assert len(names) == 16, names
    for first, then in (("virtio", "virtio_pci"), ("jbd2", "ext4"), ("9pnet", "9pnet_virtio"), ("netfs", "9p")):
        assert names.index(first) < names.index(then), names


def test_kernel_is_booted_through_pvh(debian_image, tmp_path):
    """The XZ bzImage is unpacked on the host: TCG never runs the decompressor."""
    k = tmp_path / "vmlinuz"
    assert bootfiles.debugfs_dump(debian_image, "/boot/apppot/vmlinuz", k)
    elf = bootfiles.pvh_kernel(k.read_bytes())
    assert elf[:4] == b"\x7fELF" and bootfiles._has_pvh_note(elf)


def test_same_image_runs_dpkg_everywhere(backend, debian_image, job_dir):
    res = apppot("run", "--backend", backend, "--image", debian_image, "--", "sh", "-c",
                 "dpkg -l | grep -c '^ii'; sudo -n id -u; echo done > out.txt; exit 42", cwd=job_dir)  # fmt: skip
    assert res.returncode == 42, res.stderr
    count, sudo_uid = res.stdout.split()[:2]
    assert int(count) > 80 and sudo_uid == "0"
    assert (job_dir / "out.txt").read_text() == "done\n"


def test_cpio_is_newc():
    data = debian.cpio_newc([("a", 0o100644, b"xyz")])
    assert data.startswith(b"070701") and data.rstrip(b"\0").endswith(b"TRAILER!!!")
