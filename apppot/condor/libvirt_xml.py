"""apppot's LIBVIRT_XML_SCRIPT: the libvirt domain for an HTCondor VM-universe job.

HTCondor's condor_vm-gahp runs this as root with the job ClassAd on stdin (old `Name = Value`
lines, plus VM_WORKING_DIR, VMPARAM_VM_NAME, VMPARAM_vm_Disk ...) and boots whatever domain XML it
prints. The stock script (libvirt_simple_script.awk) boots the disk's bootloader and offers a pty
console. This one makes a VM-universe job behave like an `apppot run`:

* disks from `vm_disk`: the format is read from each file's header, and a qcow2 overlay written by
  the apppot:// plugin gets an explicit <backingStore> with its base's format (libvirt does not
  probe backing formats);
* domain type 'kvm' only when KVM can run a real kernel here (probe below), else 'qemu' (TCG):
  the job still says vm_type = kvm, the VM is just slower;
* <features><acpi/>: apppot-init powers off, which the starter takes as the job's end;
* direct kernel boot (APPPOT_VM_KERNEL / APPPOT_VM_INITRD knobs, or the job's AppPotKernel /
  AppPotInitrd) with `APPPOT_JOBFS=9p` so /sbin/apppot-init runs the job;
* the job's scratch directory (VM_WORKING_DIR) shared into the guest over 9p (tag `job`), where
  apppot-init mounts it at /home/user/job; this script writes the host<->guest contract there
  (.apppot/params, .apppot/argv from the job's AppPotCommand) before the VM starts;
* the serial console goes to .apppot/console.log in the scratch directory.

Job attributes read (all optional): AppPotCommand (a shell-quoted command line, split with shlex),
AppPotChanges (a changes tarball among the job's input files), AppPotKernelArgs, AppPotKernel,
AppPotInitrd (a transferred file name, or a path inside the node's image directories).
Node knobs: APPPOT_VM_KERNEL, APPPOT_VM_INITRD, APPPOT_VM_DOMAIN_TYPE = auto|kvm|qemu (auto).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import struct
import sys
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path

from apppot.errors import ApppotError

CONTROL_DIR = ".apppot"  # as apppot.job.CONTROL_DIR; see apppot/guest/apppot-init
SHARE_TAG = "job"  # the 9p mount tag apppot-init mounts at /home/user/job
QCOW2_BACKING_FORMAT_EXT = 0xE2792ACA


# --- the job ad -----------------------------------------------------------------------------------


def parse_job_ad(text: str) -> dict[str, object]:
    """The old-format ad the vm-gahp writes, as a dict of Python values (classad2 when available)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import classad2

        ad = classad2.parseOne(text, classad2.ParserType.Old)
        out: dict[str, object] = {}
        for key in ad.keys():  # noqa: SIM118 -- a ClassAd, not a dict
            try:
                out[key] = ad.eval(key)
            except Exception:  # noqa: BLE001 -- an attribute that does not evaluate
                out[key] = None
        return {k: (None if type(v).__name__ == "Value" else v) for k, v in out.items()}
    except ImportError:
        return _parse_old_ad_plain(text)


def _parse_old_ad_plain(text: str) -> dict[str, object]:
    """Fallback without classad2: literals only (strings, numbers, booleans)."""
    out: dict[str, object] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            continue
        v = value.strip()
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            out[key.strip()] = re.sub(r'\\(.)', r"\1", v[1:-1])
        elif v.lower() in ("true", "false"):
            out[key.strip()] = v.lower() == "true"
        else:
            try:
                out[key.strip()] = int(v)
            except ValueError:
                try:
                    out[key.strip()] = float(v)
                except ValueError:
                    out[key.strip()] = None
    return out


def _get(ad: Mapping[str, object], name: str, default: object = None) -> object:
    """Case-insensitive lookup (ClassAd attribute names are case-insensitive)."""
    low = name.lower()
    for k, v in ad.items():
        if k.lower() == low and v is not None:
            return v
    return default


# --- node configuration ---------------------------------------------------------------------------


def condor_param(name: str) -> str | None:
    """An HTCondor config knob (the node's bindings), else the environment variable of that name."""
    value = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import htcondor2

        value = htcondor2.param.get(name)
    except Exception:  # noqa: BLE001 -- no bindings or no config: the environment decides
        value = None
    return value or os.environ.get(name) or None


def kvm_usable(cpuinfo: str | None = None, dev: str = "/dev/kvm") -> bool:
    """Can KVM boot a real kernel here? /dev/kvm must open and the CPU must advertise vmx or svm.

    The flag check matters: a paravirtual nested KVM (e.g. kvm-pvm) offers /dev/kvm without them
    and runs a BIOS, but dies with "KVM internal error ... emulation failure" in a Linux kernel's
    decompressor, so the job would fail instead of merely running slower under TCG.
    """
    try:
        os.close(os.open(dev, os.O_RDWR))
    except OSError:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"vmx", "svm"})


def domain_type(setting: str | None, probe: Callable[[], bool] = kvm_usable) -> str:
    setting = (setting or "auto").strip().lower()
    if setting in ("kvm", "qemu"):
        return setting
    if setting != "auto":
        raise ApppotError(f"APPPOT_VM_DOMAIN_TYPE = {setting}: expected auto, kvm or qemu")
    return "kvm" if probe() else "qemu"


# --- disks ----------------------------------------------------------------------------------------


def qcow2_backing(path: Path) -> tuple[str, str | None] | None:
    """(backing file, backing format or None) recorded in a qcow2 header; None if it has none."""
    with open(path, "rb") as f:
        head = f.read(65536)
    if not head.startswith(b"QFI\xfb"):
        return None
    version, bf_off, bf_size = struct.unpack(">IQI", head[4:20])
    if not bf_off:
        return None
    with open(path, "rb") as f:
        f.seek(bf_off)
        backing = f.read(bf_size).decode()
    fmt = None
    if version >= 3:
        (hdr_len,) = struct.unpack(">I", head[100:104])
        off = hdr_len
        while off + 8 <= len(head):
            ext, length = struct.unpack(">II", head[off : off + 8])
            if ext == 0:
                break
            if ext == QCOW2_BACKING_FORMAT_EXT:
                fmt = head[off + 8 : off + 8 + length].decode()
            off += 8 + (length + 7) // 8 * 8
    return backing, fmt


def disk_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def parse_vm_disks(spec: str, workdir: Path) -> list[tuple[Path, str, bool, str | None]]:
    """VMPARAM_vm_Disk `file:device:perm[:format], ...` -> (path, device, writable, format)."""
    disks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) < 3:
            raise ApppotError(f"vm_disk entry {item!r}: expected file:device:permission[:format]")
        path = Path(parts[0]) if parts[0].startswith("/") else workdir / parts[0]
        disks.append((path, parts[1], parts[2].lower() != "r", parts[3] if len(parts) > 3 else None))
    return disks


def _bus_for(device: str) -> str:
    return {"vd": "virtio", "hd": "ide", "sd": "sata"}.get(device[:2], "virtio")


def disk_element(path: Path, device: str, writable: bool, fmt: str | None) -> ET.Element:
    fmt = fmt or disk_format(path)
    cdrom = "iso" in path.name.lower()
    disk = ET.Element("disk", type="file", device="cdrom" if cdrom else "disk")
    ET.SubElement(disk, "driver", name="qemu", type=fmt)
    ET.SubElement(disk, "source", file=os.fspath(path))
    if fmt == "qcow2":
        backing = qcow2_backing(path)
        if backing is not None:
            base, base_fmt = backing
            base_path = Path(base) if base.startswith("/") else path.parent / base
            store = ET.SubElement(disk, "backingStore", type="file")
            ET.SubElement(store, "format", type=base_fmt or disk_format(base_path))
            ET.SubElement(store, "source", file=os.fspath(base_path))
            ET.SubElement(store, "backingStore")  # the base has no further backing
    ET.SubElement(disk, "target", dev=device, bus=_bus_for(device))
    if not writable or cdrom:
        ET.SubElement(disk, "readonly")
    return disk


# --- boot files and the guest contract ------------------------------------------------------------


def resolve_boot_file(value: object, knob: str, workdir: Path) -> Path | None:
    """A kernel/initrd named by the job (a transferred file, or a path in the image directories),
    else the node's knob."""
    if isinstance(value, str) and value:
        if not value.startswith("/"):
            path = workdir / value
            if ".." in Path(value).parts or not path.is_file():
                raise ApppotError(f"{value!r} is not among the job's transferred files")
            return path
        from apppot import store

        return store.resolve(value)  # refuses paths outside the image directories
    node = condor_param(knob)
    return Path(node) if node else None


def write_contract(workdir: Path, ad: Mapping[str, object]) -> None:
    """JOBDIR/.apppot/params and argv, as `apppot run` writes them, owned by the job's user."""
    st = workdir.stat()
    ctl = workdir / CONTROL_DIR
    ctl.mkdir(exist_ok=True)
    params = {"APPPOT_UID": st.st_uid, "APPPOT_GID": st.st_gid, "APPPOT_INTERACTIVE": 0}
    changes = _get(ad, "AppPotChanges")
    if isinstance(changes, str) and changes:
        params["APPPOT_CHANGES"] = changes
    files = {"params": "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in params.items())}
    command = _get(ad, "AppPotCommand")
    if isinstance(command, str) and command.strip():
        argv = shlex.split(command)
        files["argv"] = "set -- " + " ".join(shlex.quote(a) for a in argv) + "\n"
    for name in ("argv", "status", "stdout", "stderr", "console.log"):
        with contextlib.suppress(FileNotFoundError):
            (ctl / name).unlink()
    # console.log too: libvirt would create it 0600 root, and the job's user must be able to read it
    for name, text in {**files, "console.log": ""}.items():
        (ctl / name).write_text(text)
    for p in [ctl, *ctl.iterdir()]:
        os.chown(p, st.st_uid, st.st_gid)


def kernel_cmdline(root_device: str, extra: object) -> str:
    args = ["console=ttyS0", f"apppot.root=/dev/{root_device}", f"root=/dev/{root_device}", "rw",
            "APPPOT_JOBFS=9p", "quiet", "panic=-1"]  # fmt: skip
    if isinstance(extra, str) and extra.strip():
        args += shlex.split(extra)
    return " ".join(args)


# --- the domain -----------------------------------------------------------------------------------


def _memory_mib(ad: Mapping[str, object]) -> int:
    for name in ("JobVMMemory", "RequestMemory"):
        v = _get(ad, name)
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
    return 256


def build_domain(ad: Mapping[str, object], *, dtype: str, kernel: Path | None, initrd: Path | None) -> ET.Element:
    workdir = Path(str(_get(ad, "VM_WORKING_DIR", os.getcwd())))
    name = str(_get(ad, "VMPARAM_VM_NAME", "apppot"))
    disks = parse_vm_disks(str(_get(ad, "VMPARAM_vm_Disk", "")), workdir)
    if not disks:
        raise ApppotError("the job has no vm_disk", hint="vm_disk = NAME:vda:w:qcow2 with apppot://NAME in transfer_input_files")

    dom = ET.Element("domain", type=dtype)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(_memory_mib(ad))
    vcpus = _get(ad, "JobVM_VCPUS") or _get(ad, "RequestCpus") or 1
    ET.SubElement(dom, "vcpu").text = str(int(vcpus))  # type: ignore[call-overload]
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    if kernel is not None:
        ET.SubElement(os_el, "kernel").text = os.fspath(kernel)
        if initrd is not None:
            ET.SubElement(os_el, "initrd").text = os.fspath(initrd)
        ET.SubElement(os_el, "cmdline").text = kernel_cmdline(disks[0][1], _get(ad, "AppPotKernelArgs"))
    else:
        ET.SubElement(os_el, "boot", dev="hd")  # no kernel configured: the image's own bootloader
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if dtype == "kvm":
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"  # any end of the guest ends the job

    dev = ET.SubElement(dom, "devices")
    for disk in disks:
        dev.append(disk_element(*disk))
    fs = ET.SubElement(dev, "filesystem", type="mount", accessmode="passthrough")
    ET.SubElement(fs, "source", dir=os.fspath(workdir))
    ET.SubElement(fs, "target", dir=SHARE_TAG)
    serial = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(serial, "source", path=os.fspath(workdir / CONTROL_DIR / "console.log"), append="on")
    ET.SubElement(serial, "target", port="0")
    if _get(ad, "JobVMNetworking") is True:
        ntype = str(_get(ad, "JobVMNetworkingType", "nat"))
        if "nat" in ntype:
            iface = ET.SubElement(dev, "interface", type="network")
            ET.SubElement(iface, "source", network="default")
        else:
            iface = ET.SubElement(dev, "interface", type="bridge")
            bridge = _get(ad, "VMPARAM_Bridge_Interface")
            if bridge:
                ET.SubElement(iface, "source", bridge=str(bridge))
        mac = _get(ad, "JobVM_MACADDR")
        if mac:
            ET.SubElement(iface, "mac", address=str(mac))
        ET.SubElement(iface, "model", type="virtio")
    if _get(ad, "JobVMVNCConsole") is True:
        ET.SubElement(dev, "graphics", type="vnc", port="-1", autoport="yes")
    return dom


def generate(ad_text: str) -> str:
    ad = parse_job_ad(ad_text)
    workdir = Path(str(_get(ad, "VM_WORKING_DIR", os.getcwd())))
    kernel = resolve_boot_file(_get(ad, "AppPotKernel"), "APPPOT_VM_KERNEL", workdir)
    initrd = resolve_boot_file(_get(ad, "AppPotInitrd"), "APPPOT_VM_INITRD", workdir)
    dtype = domain_type(condor_param("APPPOT_VM_DOMAIN_TYPE"))
    dom = build_domain(ad, dtype=dtype, kernel=kernel, initrd=initrd)
    write_contract(workdir, ad)
    return ET.tostring(dom, encoding="unicode")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    text = sys.stdin.read()
    if args:  # LIBVIRT_XML_SCRIPT_ARGS = DEBUGFILE: keep the ad we were given, like the stock script
        with contextlib.suppress(OSError):
            Path(args[0]).write_text(text)
    try:
        print(generate(text))
    except (ApppotError, OSError) as e:
        print(f"apppot_libvirt_xml: error: {e}", file=sys.stderr)
        return 1
    return 0
