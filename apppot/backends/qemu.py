"""qemu: the image's own kernel (or --kernel/--initrd) booted directly, the job dir shared over 9p.

* Disk: the raw base stays read-only behind a qcow2 overlay (the plugin's, or a private one).
* Kernel: apppot.bootfiles (the image's /boot/apppot, unpacked to a PVH ELF, cached).
* Job dir: virtio-9p, security_model=none (files are created as the user running qemu, i.e. the
  submitter); qemu exports only that directory.
* Accelerator: apppot.accel (KVM when it can really run a kernel here, else TCG + a notice).
* Polite stop: ctrl-alt-del through QMP `send-key`; apppot-init turns it into SIGTERM for the job,
  exactly as under UML (mconsole `cad`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from apppot import accel, image, qmp
from apppot.backends import LaunchPlan
from apppot.bootfiles import BootFiles, find_boot_files
from apppot.domain import MACHINE, SHARE_TAG, kernel_cmdline
from apppot.errors import ApppotError
from apppot.job import BackendKind, Disk, JobSpec

QEMU = accel.QEMU


@dataclasses.dataclass(frozen=True)
class QemuBoot:
    """What prepare() found for plan(): the boot files and the accelerator."""

    files: BootFiles
    accel: str  # "kvm" | "tcg"


class QemuBackend:
    kind: ClassVar[BackendKind] = BackendKind.QEMU

    def __init__(self, qemu: Path | None = None, initrd: Path | None = None, accel: str | None = None) -> None:
        found = shutil.which(QEMU)
        self.qemu = qemu or (Path(found) if found else None)
        self.initrd = initrd
        self.accel = accel

    def unavailable_reason(self) -> str | None:
        if self.qemu is None:
            return f"{QEMU} is not installed (fix: apt-get install qemu-system-x86)"
        if shutil.which("debugfs") is None:
            return "debugfs is not installed; it reads the kernel out of images (fix: apt-get install e2fsprogs)"
        return None

    # --- checks and I/O before boot ----------------------------------------------------------------

    def prepare(self, spec: JobSpec, rundir: Path) -> QemuBoot:
        if (reason := self.unavailable_reason()) is not None:
            raise ApppotError(f"the qemu backend cannot run here: {reason}")
        prepare_qcow2_layer(spec.disk)
        files = find_boot_files(spec.disk, kernel=spec.kernel, initrd=self.initrd, rundir=rundir)
        return QemuBoot(files, self.accel or accel.choose_accel(files, notice=True))

    def plan(self, spec: JobSpec, rundir: Path, boot: QemuBoot) -> LaunchPlan:
        assert self.qemu is not None and spec.disk.layer is not None
        argv = [
            os.fspath(self.qemu),
            "-name", f"guest={spec.vm_id}",
            "-machine", f"{MACHINE},accel={boot.accel}",
            "-cpu", "host" if boot.accel == "kvm" else "max",
            "-m", str(spec.memory_mib),
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-serial", "stdio",
            "-qmp", f"unix:{qmp_path(rundir)},server=on,wait=off",
            "-kernel", os.fspath(boot.files.kernel),
            *(["-initrd", os.fspath(boot.files.initrd)] if boot.files.initrd else []),
            "-append", kernel_cmdline(extra=spec.extra_args),
            "-drive", f"file={qemu_opt(spec.disk.layer)},if=none,id=root,format=qcow2,discard=unmap",
            "-device", "virtio-blk-pci,drive=root",
            "-fsdev", f"local,id=job,path={qemu_opt(spec.job_dir)},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=job,mount_tag={SHARE_TAG}",
        ]  # fmt: skip
        return LaunchPlan(argv=tuple(argv))

    def polite_stop(self, spec: JobSpec, rundir: Path) -> Callable[[int], None]:
        return lambda pid: qmp.qmp_send_ctrl_alt_del(qmp_path(rundir))


# --- shared with the libvirt backend ---------------------------------------------------------------


def qemu_opt(path: Path) -> str:
    """A path inside a qemu -drive/-fsdev option: commas are escaped by doubling them."""
    return os.fspath(path).replace(",", ",,")


def qmp_path(rundir: Path) -> Path:
    return rundir / "qmp.sock"


def prepare_qcow2_layer(disk: Disk) -> None:
    assert disk.layer is not None
    if disk.layer_format != "qcow2":
        raise ApppotError(
            f"qemu cannot use the {disk.layer_format} layer {disk.layer}",
            hint="stage the disk for qemu with apppot://NAME (a qcow2 overlay), or pass the raw base image",
        )
    if not disk.layer.exists():
        image.create_qcow2_overlay(disk.layer, image.probe_image(disk.base))


