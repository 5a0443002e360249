"""libvirt domain XML for an AppPot guest: one builder for `apppot run --backend libvirt` and for the
VM universe's LIBVIRT_XML_SCRIPT (apppot/condor/libvirt_xml.py).

Whatever libvirt itself runs as, the domain makes qemu run as an ordinary user (a static DAC
seclabel, no relabelling: libvirt chowns nothing), so the files it names are opened with that user's
rights only. Disks name their whole backing chain explicitly (libvirt neither probes backing formats
nor follows what an image header says beyond the chain given here).
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from pathlib import Path

MACHINE = "q35"  # measured against pc and microvm in docs/performance.md; libvirt knows it well
SHARE_TAG = "job"  # the 9p mount tag apppot-init mounts at /home/user/job


def kernel_cmdline(root_device: str = "vda", extra: tuple[str, ...] | list[str] = ()) -> str:
    """The guest kernel's command line for a direct kernel boot into apppot-init (qemu, libvirt, the VM
    universe). root/init are read by the initramfs (guest/apppot-initrd); APPPOT_JOBFS reaches
    apppot-init as environment. panic=-1 with on_reboot=destroy (-no-reboot): a panic ends the VM."""
    return " ".join(["console=ttyS0", "quiet", "panic=-1", f"root=/dev/{root_device}", "rw",
                     "init=/sbin/apppot-init", "APPPOT_JOBFS=9p", *extra])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DomainDisk:
    path: Path
    format: str  # "raw" | "qcow2", from the file's header
    target: str = "vda"
    writable: bool = True
    backing: tuple[tuple[Path, str], ...] = ()  # (path, format), nearest first; checked by store.backing_chain


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    domain_type: str  # "kvm" | "qemu" (TCG)
    memory_mib: int
    run_as: tuple[int, int]  # qemu's uid and gid
    kernel: Path | None  # None: the image's own bootloader (then no cmdline reaches the guest)
    initrd: Path | None
    cmdline: str
    disks: tuple[DomainDisk, ...] = ()
    # The job dir over 9p. "squash" (qemu security_model=none): files are created as qemu's user with
    # the guest's modes, right for `apppot run`, where qemu is the submitter. "mapped": guest owners and
    # modes live in xattrs, host files are plain 0600/0700 files of qemu's user: guest root can create
    # neither setuid files nor device nodes on the host (the VM universe).
    share_dir: Path | None = None
    share_mode: str = "squash"
    serial_file: Path | None = None  # None: a pty nobody reads (no host file for libvirt to open as root)
    vcpus: int = 1
    emulator: Path | None = None
    interface: tuple[str, str, str | None] | None = None  # (network|bridge, its name, MAC or None)
    vnc: bool = False


def _bus_for(device: str) -> str:
    return {"vd": "virtio", "hd": "ide", "sd": "sata"}.get(device[:2], "virtio")


def _disk(parent: ET.Element, disk: DomainDisk) -> None:
    el = ET.SubElement(parent, "disk", type="file", device="disk")
    ET.SubElement(el, "driver", name="qemu", type=disk.format, discard="unmap")
    ET.SubElement(el, "source", file=os.fspath(disk.path))
    store = el
    for path, fmt in disk.backing:
        store = ET.SubElement(store, "backingStore", type="file")
        ET.SubElement(store, "format", type=fmt)
        ET.SubElement(store, "source", file=os.fspath(path))
    if disk.format == "qcow2":
        ET.SubElement(store, "backingStore")  # the chain ends here: libvirt probes nothing further
    ET.SubElement(el, "target", dev=disk.target, bus=_bus_for(disk.target))
    if not disk.writable:
        ET.SubElement(el, "readonly")


def domain_xml(d: Domain) -> str:
    dom = ET.Element("domain", type=d.domain_type)
    ET.SubElement(dom, "name").text = d.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(d.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(d.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine=MACHINE).text = "hvm"
    if d.kernel is not None:
        ET.SubElement(os_el, "kernel").text = os.fspath(d.kernel)
        if d.initrd is not None:
            ET.SubElement(os_el, "initrd").text = os.fspath(d.initrd)
        ET.SubElement(os_el, "cmdline").text = d.cmdline
    else:
        ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")  # apppot-init's poweroff ends the domain
    ET.SubElement(dom, "cpu", mode="host-passthrough" if d.domain_type == "kvm" else "maximum")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"  # panic=-1 reboots: that, too, ends the job
    dev = ET.SubElement(dom, "devices")
    if d.emulator is not None:
        ET.SubElement(dev, "emulator").text = os.fspath(d.emulator)
    for disk in d.disks:
        _disk(dev, disk)
    if d.share_dir is not None:
        fs = ET.SubElement(dev, "filesystem", type="mount", accessmode=d.share_mode)
        ET.SubElement(fs, "source", dir=os.fspath(d.share_dir))
        ET.SubElement(fs, "target", dir=SHARE_TAG)
    if d.serial_file is not None:
        serial = ET.SubElement(dev, "serial", type="file")
        ET.SubElement(serial, "source", path=os.fspath(d.serial_file))
    else:
        serial = ET.SubElement(dev, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    if d.interface is not None:
        kind, source, mac = d.interface
        iface = ET.SubElement(dev, "interface", type=kind)
        ET.SubElement(iface, "source", **{kind: source})
        if mac:
            ET.SubElement(iface, "mac", address=mac)
        ET.SubElement(iface, "model", type="virtio")
    if d.vnc:
        ET.SubElement(dev, "graphics", type="vnc", port="-1", autoport="yes", listen="127.0.0.1")
    ET.SubElement(dev, "memballoon", model="none")
    # qemu runs as run_as, and libvirt relabels (chowns) nothing: not the base, not the job dir.
    sec = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(sec, "label").text = f"+{d.run_as[0]}:+{d.run_as[1]}"
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"
