"""`apppot build --debian`: one image file that boots under UML, qemu and libvirt."""

from __future__ import annotations

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
    sudoers = debugfs(debian_image, "cat /etc/sudoers.d/apppot")
    rules = [ln.split() for ln in sudoers.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert rules == [["user", "ALL=(ALL)", "NOPASSWD:ALL"]], sudoers  # a rule, not a comment naming the user


def test_initramfs_has_the_modules_in_dependency_order(debian_image, tmp_path):
    """The initramfs (read by busybox cpio, not by our writer) loads, from /modules.list, every module
    it carries and nothing else, each after all it depends on, the virtio/ext4/9p stack included."""
    initrd = tmp_path / "initrd.img"
    assert bootfiles.debugfs_dump(debian_image, "/boot/apppot/initrd.img", initrd)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["busybox", "cpio", "-i", "-d", "-F", initrd], cwd=root, check=True, capture_output=True)
    names = (root / "modules.list").read_text().split()
    assert len(names) == len(set(names)) and sorted(names) == sorted(p.stem for p in (root / "modules").glob("*.ko"))
    for i, name in enumerate(names):
        missing = [d for d in debian.module_depends(root / "modules" / f"{name}.ko") if d not in names[:i]]
        assert missing == [], f"{name} is loaded before {missing}: {names}"
    for first, then in (("virtio", "virtio_pci"), ("jbd2", "ext4"), ("9pnet", "9pnet_virtio"), ("netfs", "9p")):
        assert names.index(first) < names.index(then), names
    assert (root / "init").stat().st_mode & 0o111 and (root / "bin/busybox").stat().st_size > 0


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
