"""apppot's LIBVIRT_XML_SCRIPT: the libvirt domain for an HTCondor VM-universe job.

HTCondor's condor_vm-gahp runs this as root, in the job's scratch directory, with the job ClassAd on
stdin (old `Name = Value` lines, plus VMPARAM_VM_NAME, VMPARAM_vm_Disk ... that the gahp assigns),
and boots whatever domain XML it prints. This one makes a VM-universe job behave like `apppot run`:
direct kernel boot (node knobs APPPOT_VM_KERNEL / APPPOT_VM_INITRD, or the job's AppPotKernel /
AppPotInitrd) into apppot-init, the scratch directory shared over 9p at /home/user/job, the host <->
guest contract (.apppot/params, argv from AppPotCommand) written before boot, ACPI so apppot-init's
poweroff ends the job, TCG when KVM cannot run a real kernel here.

Everything the job controls is hostile (docs/security.md): its ad, every file in the sandbox, and
whatever the guest writes there. So:
* the sandbox is this process's working directory, never a path from the ad (VM_WORKING_DIR);
* everything that touches the sandbox runs in a child process as the sandbox's owner (the job's
  user): vm_disk and kernel/initrd files are bare names there, opened with O_NOFOLLOW and accepted
  only as regular files owned by that user; .apppot is written through a descriptor, by rename;
* a qcow2 disk's backing chain must stay inside the node's image directories (store.backing_chain,
  the rule the transfer plugin applies too) and is named explicitly in the XML;
* qemu runs as the job's user (a static DAC label), shares the sandbox with accessmode="mapped" (no
  host setuid files or device nodes from guest root), and its console is a pty: libvirt, as root,
  opens no file in the sandbox;
* a bad ad value or sandbox file never makes this script fail (the startd would take the node's VM
  universe offline for everyone): the job gets a VM that powers off at once, status 125 and the reason
  in .apppot/status, which apppot_vm_post turns into apppot.err / AppPotExitCode (the submit template
  holds the job with that reason). Only node problems (no kernel configured) exit non-zero.

Job attributes read (all optional): AppPotCommand (a shell-quoted command line), AppPotChanges (a
changes tarball among the job's input files), AppPotKernelArgs, AppPotKernel, AppPotInitrd (a
transferred file name, or a path inside the node's image directories).
Node knobs: APPPOT_VM_KERNEL, APPPOT_VM_INITRD, APPPOT_VM_DOMAIN_TYPE = auto|kvm|qemu (auto).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from apppot import accel, contract, domain, image, proc, store
from apppot.errors import ApppotError
from apppot.knobs import bindings, condor_param

FAILURE_MEMORY_MIB = 128
NOBODY = 65534  # qemu's user for the failure VM when the sandbox belongs to root


class JobError(ApppotError):
    """Something the job controls is unusable: the job fails with status 125, the node stays up."""


# --- the job ad -----------------------------------------------------------------------------------


def parse_job_ad(text: str) -> dict[str, object]:
    """The old-format ad the vm-gahp writes, as a dict of Python values (None where one does not evaluate)."""
    classad2 = bindings()[1]  # no bindings on a VM-universe node: the node's problem (exit 1)
    ad = classad2.parseOne(text, classad2.ParserType.Old)
    out: dict[str, object] = {}
    for key in ad.keys():  # noqa: SIM118 -- a ClassAd, not a dict
        try:
            out[key] = ad.eval(key)
        except Exception:  # noqa: BLE001 -- an attribute that does not evaluate
            out[key] = None
    return {k: (None if type(v).__name__ == "Value" else v) for k, v in out.items()}


def _get(ad: Mapping[str, object], name: str, default: object = None) -> object:
    """Case-insensitive lookup (ClassAd attribute names are case-insensitive)."""
    low = name.lower()
    for k, v in ad.items():
        if k.lower() == low and v is not None:
            return v
    return default


def _get_str(ad: Mapping[str, object], name: str) -> str:
    value = _get(ad, name, "")
    if not isinstance(value, str):
        raise JobError(f"job attribute {name} must be a string, not {value!r}")
    return value


def _get_int(ad: Mapping[str, object], names: tuple[str, ...], default: int, lo: int, hi: int) -> int:
    for name in names:
        value = _get(ad, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi:
            return int(value)
    return default


# --- node configuration ---------------------------------------------------------------------------


def domain_type(setting: str | None, probe: Callable[[], bool] | None = None) -> str:
    setting = (setting or "auto").strip().lower()
    if setting in ("kvm", "qemu"):
        return setting
    if setting != "auto":
        raise ApppotError(f"APPPOT_VM_DOMAIN_TYPE = {setting}: expected auto, kvm or qemu")
    return "kvm" if (probe or (lambda: accel.kvm_probe()[0]))() else "qemu"


# --- the sandbox, seen as the job's user ------------------------------------------------------------


def open_sandbox_file(name: str, uid: int, what: str) -> int:
    """A descriptor of NAME in the working directory (the sandbox): a bare name, not a symlink, a
    regular file owned by the job's user. Raises JobError naming the problem otherwise."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise JobError(f"{what} {name!r} must be the name of a file in the job's sandbox (no '/', no '..')",
                       hint="name a file listed in transfer_input_files, e.g. vm_disk = tiny:vda:w:qcow2")  # fmt: skip
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise JobError(f"{what} {name!r} is not among the job's input files",
                       hint="add it to transfer_input_files (apppot://NAME for a base the node holds)") from None  # fmt: skip
    except OSError as e:
        why = ("is a symlink; apppot only uses files the job transferred" if e.errno == errno.ELOOP
               else f"cannot be opened: {os.strerror(e.errno or 0)}")  # fmt: skip
        raise JobError(f"{what} {name!r} {why}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
        os.close(fd)
        why = "is not a regular file" if not stat.S_ISREG(st.st_mode) else f"is not owned by the job's user (uid {uid})"
        raise JobError(f"{what} {name!r} {why}")
    return fd


DEVICE = re.compile(r"(vd|hd|sd)[a-z]")


def sandbox_disks(spec: str, uid: int, sandbox: Path) -> list[domain.DomainDisk]:
    """vm_disk `file:device:perm[:format], ...`: each file a regular file in the sandbox, its format read
    from its header (never taken from the ad), a qcow2 backing chain inside the image directories."""
    disks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or not DEVICE.fullmatch(parts[1]) or parts[2].lower() not in ("r", "w"):
            raise JobError(f"vm_disk entry {item!r}: expected FILE:DEVICE:r|w[:FORMAT] with DEVICE like vda",
                           hint="vm_disk = tiny:vda:w:qcow2 with apppot://tiny in transfer_input_files")  # fmt: skip
        fd = open_sandbox_file(parts[0], uid, "vm_disk file")
        with os.fdopen(fd, "rb") as f:
            try:
                header = image.parse_qcow2_header(f.read(65536))
            except ApppotError as e:
                raise JobError(f"vm_disk file {parts[0]!r}: {e.message}") from None
        path = sandbox / parts[0]
        backing: tuple[tuple[Path, str], ...] = ()
        if header is not None:
            try:
                backing = tuple(store.backing_chain(path))
            except ApppotError as e:
                raise JobError(e.message, hint=e.hint) from None
        disks.append(domain.DomainDisk(path, "qcow2" if header else "raw", parts[1], parts[2].lower() == "w", backing))
    if not disks:
        raise JobError("the job has no vm_disk", hint="vm_disk = NAME:vda:w:qcow2 with apppot://NAME in transfer_input_files")
    return disks


def job_boot_file(value: str, uid: int, sandbox: Path, what: str) -> Path:
    """A kernel/initrd the job names: a file it transferred, or a path inside the image directories."""
    if value.startswith("/"):
        try:
            return store.resolve(value)  # refuses paths outside the image directories
        except ApppotError as e:
            raise JobError(f"{what}: {e.message}", hint=e.hint) from None
    os.close(open_sandbox_file(value, uid, what))
    return sandbox / value


def prepare_sandbox(ad: Mapping[str, object], sandbox: Path, uid: int, gid: int) -> dict[str, Any]:
    """As the job's user: check the sandbox files the domain will name, write the guest contract.
    Returns what the domain needs (JSON-able), or {"error": message} after reporting it to the job."""
    try:
        disks = sandbox_disks(_get_str(ad, "VMPARAM_vm_Disk"), uid, sandbox)
        boot = {}
        for attr in ("AppPotKernel", "AppPotInitrd"):
            value = _get_str(ad, attr)
            boot[attr] = os.fspath(job_boot_file(value, uid, sandbox, attr)) if value else None
        try:
            command = shlex.split(_get_str(ad, "AppPotCommand"))
            extra = shlex.split(_get_str(ad, "AppPotKernelArgs"))
        except ValueError as e:
            raise JobError(f"AppPotCommand or AppPotKernelArgs cannot be split into words: {e}",
                           hint="check the quotes: the value is a shell-quoted command line") from None  # fmt: skip
        changes = _get_str(ad, "AppPotChanges")
        if changes and ("/" in changes or changes in (".", "..")):
            raise JobError(f"AppPotChanges {changes!r} must be the name of a tarball among the job's input files")
        ctl_fd = contract.open_control_dir(".", owner=uid)
        try:
            contract.write_contract(ctl_fd, uid=uid, gid=gid, command=command or None, changes=changes or None)
        finally:
            os.close(ctl_fd)
        return {"disks": [[os.fspath(d.path), d.format, d.target, d.writable, [[os.fspath(p), f] for p, f in d.backing]]
                          for d in disks], "kernel": boot["AppPotKernel"], "initrd": boot["AppPotInitrd"],
                "extra": extra}  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- whatever it is, the job fails and the node stays up
        message = e.message if isinstance(e, ApppotError) else f"internal error in apppot_libvirt_xml: {type(e).__name__}: {e}"
        if isinstance(e, ApppotError) and e.hint:
            message += f" ({e.hint})"
        with contextlib.suppress(Exception):
            ctl_fd = contract.open_control_dir(".", owner=uid, replace_bad=True)
            try:
                contract.write_failure(ctl_fd, message)
            finally:
                os.close(ctl_fd)
        return {"error": message}


# --- the domain -----------------------------------------------------------------------------------


def _interface(ad: Mapping[str, object]) -> tuple[str, str, str | None] | None:
    if _get(ad, "JobVMNetworking") is not True:
        return None
    mac = _get(ad, "JobVM_MACADDR")
    mac = mac if isinstance(mac, str) and re.fullmatch(r"([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", mac) else None
    if "nat" in str(_get(ad, "JobVMNetworkingType", "nat")).lower():
        return "network", "default", mac
    bridge = str(_get(ad, "VMPARAM_Bridge_Interface", ""))  # the node's VM_BRIDGE_INTERFACE, via the gahp
    return ("bridge", bridge, mac) if re.fullmatch(r"[A-Za-z0-9_.-]+", bridge) else None


def generate(ad_text: str) -> str:
    ad = parse_job_ad(ad_text)
    name = _get(ad, "VMPARAM_VM_NAME")
    if not isinstance(name, str) or not name:
        raise ApppotError("the ad from condor_vm-gahp has no VMPARAM_VM_NAME")
    node_kernel, node_initrd = condor_param("APPPOT_VM_KERNEL"), condor_param("APPPOT_VM_INITRD")
    dtype = domain_type(condor_param("APPPOT_VM_DOMAIN_TYPE"))
    sandbox = Path(os.getcwd())
    st = os.stat(".")
    uid, gid = st.st_uid, st.st_gid
    if uid == 0:
        result = {"error": "the job's scratch directory belongs to root; apppot does not run VM jobs as root"}
    else:
        result = proc.run_as_user(uid, gid, lambda: prepare_sandbox(ad, sandbox, uid, gid))
    if "error" in result:
        if not node_kernel:
            raise ApppotError(f"cannot give the job a VM that reports its failure ({result['error']}): "
                              "APPPOT_VM_KERNEL is not set")  # fmt: skip
        # No disk, no share: the initramfs finds no root disk and powers off; the status is already there.
        failed = domain.Domain(name=name, domain_type=dtype, memory_mib=FAILURE_MEMORY_MIB, run_as=(uid or NOBODY, gid or NOBODY),
                               kernel=Path(node_kernel), initrd=Path(node_initrd) if node_initrd else None,
                               cmdline="console=ttyS0 quiet panic=-1 apppot.refused")  # fmt: skip
        return domain.domain_xml(failed)
    disks = tuple(domain.DomainDisk(Path(p), f, t, w, tuple((Path(b), bf) for b, bf in chain))
                  for p, f, t, w, chain in result["disks"])  # fmt: skip
    kernel = result["kernel"] or node_kernel
    initrd = result["initrd"] or node_initrd
    dom = domain.Domain(
        name=name, domain_type=dtype, run_as=(uid, gid),
        memory_mib=_get_int(ad, ("JobVMMemory", "RequestMemory"), 256, 16, 1 << 20),
        vcpus=_get_int(ad, ("JobVM_VCPUS", "RequestCpus"), 1, 1, 256),
        kernel=Path(kernel) if kernel else None, initrd=Path(initrd) if initrd else None,
        cmdline=domain.kernel_cmdline(disks[0].target, result["extra"]), disks=disks,
        share_dir=sandbox, share_mode="mapped", interface=_interface(ad), vnc=_get(ad, "JobVMVNCConsole") is True,
    )  # fmt: skip
    return domain.domain_xml(dom)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    text = sys.stdin.read()
    if args:  # LIBVIRT_XML_SCRIPT_ARGS = DEBUGFILE (an admin's path): keep the ad we were given
        with contextlib.suppress(OSError):
            Path(args[0]).write_text(text)
    try:
        print(generate(text), end="")
    except (ApppotError, OSError) as e:  # the node's problem, not the job's: the startd should know
        print(f"apppot_libvirt_xml: error: {e}", file=sys.stderr)
        return 1
    return 0
