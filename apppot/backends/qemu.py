"""qemu: the image's own kernel (or --kernel/--initrd) booted directly, the job dir shared over 9p.

* Disk: the raw base stays read-only behind a qcow2 overlay (the plugin's, or a private one).
* Kernel: taken out of the image's /boot/apppot without mounting it (debugfs), cached by the image's
  digest. A compressed bzImage is unpacked once on the host and booted as an ELF through PVH: the
  in-guest XZ decompressor alone costs ~3 s per boot under TCG (docs/performance.md "## Boot").
* Job dir: virtio-9p, security_model=none (files are created as the user running qemu, i.e. the
  submitter); qemu exports only that directory.
* Accelerator: KVM when it can really run a kernel here (probed once, cached), else TCG + a notice.
* Polite stop: ctrl-alt-del through QMP `send-key`; apppot-init turns it into SIGTERM for the job,
  exactly as under UML (mconsole `cad`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import lzma
import os
import platform
import re
import shutil
import socket
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from apppot import image, proc, store
from apppot.domain import MACHINE, SHARE_TAG
from apppot.backends import LaunchPlan
from apppot.errors import ApppotError
from apppot.job import BackendKind, Disk, JobSpec

QEMU = "qemu-system-x86_64"
IMAGE_BOOT_DIR = "/boot/apppot"  # where `apppot build --debian` puts vmlinuz and initrd.img
KVM_PROBE_TIMEOUT_S = 20.0


@dataclasses.dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path | None
    origin: str  # for messages: "the image", "--kernel", "$APPPOT_VM_KERNEL"


class QemuBackend:
    kind: ClassVar[BackendKind] = BackendKind.QEMU

    def __init__(self, qemu: Path | None = None, initrd: Path | None = None, accel: str | None = None) -> None:
        found = shutil.which(QEMU)
        self.qemu = qemu or (Path(found) if found else None)
        self.initrd = initrd
        self.accel = accel
        self.boot: BootFiles | None = None

    def unavailable_reason(self) -> str | None:
        if self.qemu is None:
            return f"{QEMU} is not installed (fix: apt-get install qemu-system-x86)"
        if shutil.which("debugfs") is None:
            return "debugfs is not installed; it reads the kernel out of images (fix: apt-get install e2fsprogs)"
        return None

    # --- checks and I/O before boot ----------------------------------------------------------------

    def prepare(self, spec: JobSpec, rundir: Path) -> None:
        if (reason := self.unavailable_reason()) is not None:
            raise ApppotError(f"the qemu backend cannot run here: {reason}")
        prepare_qcow2_layer(spec.disk)
        self.boot = find_boot_files(spec.disk, kernel=spec.kernel, initrd=self.initrd, rundir=rundir)
        if self.accel is None:
            self.accel = choose_accel(self.boot, notice=True)

    def plan(self, spec: JobSpec, rundir: Path) -> LaunchPlan:
        assert self.qemu is not None and self.boot is not None and spec.disk.layer is not None
        accel = self.accel or "tcg"
        argv = [
            os.fspath(self.qemu),
            "-name", f"guest={spec.vm_id}",
            "-machine", f"{MACHINE},accel={accel}",
            "-cpu", "host" if accel == "kvm" else "max",
            "-m", str(spec.memory_mib),
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-serial", "stdio",
            "-qmp", f"unix:{qmp_path(rundir)},server=on,wait=off",
            "-kernel", os.fspath(self.boot.kernel),
            *(["-initrd", os.fspath(self.boot.initrd)] if self.boot.initrd else []),
            "-append", kernel_cmdline(spec),
            "-drive", f"file={qemu_opt(spec.disk.layer)},if=none,id=root,format=qcow2,discard=unmap",
            "-device", "virtio-blk-pci,drive=root",
            "-fsdev", f"local,id=job,path={qemu_opt(spec.job_dir)},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=job,mount_tag={SHARE_TAG}",
        ]  # fmt: skip
        return LaunchPlan(argv=tuple(argv))

    def polite_stop(self, spec: JobSpec, rundir: Path) -> Callable[[int], None]:
        return lambda pid: qmp_send_ctrl_alt_del(qmp_path(rundir))


# --- shared with the libvirt backend ---------------------------------------------------------------


def kernel_cmdline(spec: JobSpec) -> str:
    # root/init are read by the initramfs (guest/apppot-initrd); APPPOT_JOBFS reaches apppot-init
    # as environment. panic=-1 + -no-reboot (on_reboot=destroy): a guest panic ends the VM.
    args = ["console=ttyS0", "quiet", "panic=-1", "root=/dev/vda", "rw", "init=/sbin/apppot-init",
            "APPPOT_JOBFS=9p", *spec.extra_args]  # fmt: skip
    return " ".join(args)


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


def qmp_send_ctrl_alt_del(sock_path: Path, *, timeout_s: float = 2.0) -> None:
    keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
    qmp_command(sock_path, "send-key", {"keys": keys}, timeout_s=timeout_s)


def qmp_command(sock_path: Path, command: str, arguments: dict[str, object] | None = None, *,
                timeout_s: float = 2.0) -> dict[str, object]:  # fmt: skip
    """One QMP command (after the capabilities handshake); return its `return` value."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(os.fspath(sock_path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments or {}}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise ApppotError(f"QMP {cmd['execute']} failed: {reply['error'].get('desc')}")
                break
    return dict(reply.get("return") or {})


# --- the kernel and initramfs ---------------------------------------------------------------------


def cache_dirs() -> list[Path]:
    """Where extracted boot files are looked up, in order; the first writable one gets new entries."""
    dirs = []
    if os.environ.get("APPPOT_CACHE"):
        dirs.append(Path(os.environ["APPPOT_CACHE"]) / "boot")
    dirs.append(Path("/var/cache/apppot/boot"))
    home = os.environ.get("XDG_CACHE_HOME") or (os.path.expanduser("~/.cache") if "HOME" in os.environ else "")
    if home:
        dirs.append(Path(home) / "apppot" / "boot")
    return list(dict.fromkeys(dirs))


def writable_cache_dir(fallback: Path) -> Path:
    for d in cache_dirs():
        with contextlib.suppress(OSError):
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK | os.X_OK):
                return d
    return fallback  # nobody can cache: extract per run (about a second)


def raw_base_of(disk: Disk) -> Path | None:
    """The raw file system image at the bottom of the disk's chain (debugfs reads only raw)."""
    if disk.base_format == "raw":
        return disk.base
    if disk.base_format != "qcow2":
        return None
    with contextlib.suppress(ApppotError, OSError):
        chain = store.backing_chain(disk.base, confine=False)
        if chain and chain[-1][1] == "raw":
            return chain[-1][0]
    return None


def image_digest(path: Path, cache: Path | None) -> str:
    """sha256 of the image, memoised per (device, inode, size, mtime) so it is read only once."""
    st = path.stat()
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
    memo_name = f"digest-{key.hexdigest()[:32]}"
    for d in cache_dirs():
        with contextlib.suppress(OSError):
            return (d / memo_name).read_text().strip()
    digest = image.sha256_of(path)
    if cache is not None:
        with contextlib.suppress(OSError):
            image.write_atomically(cache / memo_name, digest.encode())
    return digest


def debugfs_dump(img: Path, src: str, dest: Path) -> bool:
    """Copy one file out of an ext2/3/4 image without mounting it; False if it is not there."""
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    proc.capture(["debugfs", "-R", f"dump {src} {dest}", os.fspath(img)])  # read-only: no -w
    return dest.is_file() and dest.stat().st_size > 0


def find_boot_files(disk: Disk, *, kernel: Path | None, initrd: Path | None, rundir: Path) -> BootFiles:
    """--kernel/--initrd, else the image's /boot/apppot, else $APPPOT_VM_KERNEL/$APPPOT_VM_INITRD."""
    cache = writable_cache_dir(rundir)
    if kernel is not None:
        return BootFiles(bootable_kernel(kernel, cache), _checked(initrd), "--kernel")
    base = raw_base_of(disk)
    if base is not None:
        found = boot_files_from_image(base, cache, rundir)
        if found is not None:
            return BootFiles(found.kernel, _checked(initrd) or found.initrd, found.origin)
    env_k = os.environ.get("APPPOT_VM_KERNEL")
    if env_k:
        env_i = os.environ.get("APPPOT_VM_INITRD")
        return BootFiles(bootable_kernel(Path(env_k), cache), _checked(initrd or (Path(env_i) if env_i else None)),
                         "$APPPOT_VM_KERNEL")  # fmt: skip
    raise ApppotError(
        f"the image {disk.base} has no kernel for qemu/libvirt (no {IMAGE_BOOT_DIR}/vmlinuz)",
        hint="build it with `apppot build --debian`, or pass --kernel K --initrd I (a Debian image's: "
        "debugfs -R 'dump /boot/apppot/vmlinuz K' IMG, same for initrd.img), or set APPPOT_VM_KERNEL/APPPOT_VM_INITRD",
    )


def _is_file(p: Path) -> bool:
    try:
        return p.is_file() and os.access(p, os.R_OK)
    except OSError:  # e.g. another user's ~/.cache
        return False


def _checked(p: Path | None) -> Path | None:
    if p is not None and not (p.is_file() and os.access(p, os.R_OK)):
        raise ApppotError(f"initrd {p} not found or not readable")
    return p


def boot_files_from_image(base: Path, cache: Path, rundir: Path) -> BootFiles | None:
    """Kernel + initrd from the image's /boot/apppot, extracted once per image digest."""
    digest = image_digest(base, cache if cache != rundir else None)
    for d in [*cache_dirs(), cache]:
        entry = d / digest
        if _is_file(entry / "vmlinux") and _is_file(entry / "initrd.img"):
            return BootFiles(entry / "vmlinux", entry / "initrd.img", f"the image ({entry})")
    work = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        if not debugfs_dump(base, f"{IMAGE_BOOT_DIR}/vmlinuz", work / "vmlinuz"):
            return None
        if not debugfs_dump(base, f"{IMAGE_BOOT_DIR}/initrd.img", work / "initrd.img"):
            raise ApppotError(f"{base} has {IMAGE_BOOT_DIR}/vmlinuz but no initrd.img beside it")
        (work / "vmlinux").write_bytes(pvh_kernel((work / "vmlinuz").read_bytes()))
        (work / "vmlinuz").unlink()
        for f in work.iterdir():
            f.chmod(0o644)
        work.chmod(0o755)
        entry = cache / digest
        try:
            work.rename(entry)
        except OSError:  # another run extracted it at the same time
            if not (entry / "vmlinux").is_file():
                raise
        return BootFiles(entry / "vmlinux", entry / "initrd.img", f"the image ({entry})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bootable_kernel(kernel: Path, cache: Path) -> Path:
    """A given kernel, as an uncompressed PVH ELF when it is a compressed bzImage (cached by digest)."""
    try:
        with open(kernel, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return kernel  # already what PVH boots
        data = kernel.read_bytes()
    except OSError as e:
        raise ApppotError(f"kernel {kernel}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    for d in [*cache_dirs(), cache]:
        if _is_file(d / f"vmlinux-{digest}"):
            return d / f"vmlinux-{digest}"
    elf = pvh_kernel(data)
    if elf is data:
        return kernel
    dest = cache / f"vmlinux-{digest}"
    image.write_atomically(dest, elf)
    return dest


def pvh_kernel(bzimage: bytes) -> bytes:
    """The uncompressed vmlinux ELF inside a bzImage, if it has a PVH entry; else the bzImage itself."""
    if bzimage[:4] == b"\x7fELF" or bzimage[0x202:0x206] != b"HdrS":
        return bzimage
    payload = bzimage[0x200 + bzimage[0x1F1] * 0x200 :] if bzimage[0x1F1] else bzimage
    elf = b""
    for magic, unpack in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip)):
        at = payload.find(magic)
        if at >= 0:
            with contextlib.suppress(Exception):
                elf = unpack(payload[at:])
            if elf[:4] == b"\x7fELF":
                break
    # qemu boots an ELF through PVH only if it carries XEN_ELFNOTE_PHYS32_ENTRY (CONFIG_PVH=y).
    if elf[:4] != b"\x7fELF" or not _has_pvh_note(elf):
        return bzimage
    return elf


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _has_pvh_note(elf: bytes) -> bool:
    """Scan the ELF64 PT_NOTE segments for a "Xen" note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + -(-namesz // 4) * 4 + -(-descsz // 4) * 4
    return False


# --- KVM or TCG -----------------------------------------------------------------------------------


def choose_accel(boot: BootFiles | None = None, *, notice: bool = False) -> str:
    """"kvm" if KVM really runs a kernel here, else "tcg". APPPOT_ACCEL=kvm|tcg overrides the probe."""
    forced = os.environ.get("APPPOT_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    ok, why = kvm_probe(boot)
    if not ok and notice:
        print(f"apppot: notice: KVM is not usable here ({why}); qemu emulates the CPU (TCG), which is slower",
              file=sys.stderr)  # fmt: skip
    return "kvm" if ok else "tcg"


def kvm_probe(boot: BootFiles | None = None) -> tuple[bool, str]:
    """(usable, reason), cached per host boot: /dev/kvm must open, the CPU must offer vmx/svm
    (a paravirtual nested KVM such as kvm-pvm offers /dev/kvm without them and fails in a real
    kernel), and, when a kernel is at hand, a real boot under KVM must reach the kernel's panic."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    memo = f"kvm-probe-{platform.release()}-{boot_id}.json"
    for d in cache_dirs():
        with contextlib.suppress(OSError, ValueError, KeyError):
            cached = json.loads((d / memo).read_text())
            return bool(cached["usable"]), str(cached["reason"])
    usable, reason = _probe_kvm_uncached(boot)
    if boot is not None or not usable:  # a positive answer without a real boot is not final
        with contextlib.suppress(OSError):
            cache = writable_cache_dir(Path(tempfile.gettempdir()))
            image.write_atomically(cache / memo, json.dumps({"usable": usable, "reason": reason}).encode())
    return usable, reason


def _probe_kvm_uncached(boot: BootFiles | None) -> tuple[bool, str]:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror}"
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    except OSError:
        flags = set()
    if not flags & {"vmx", "svm"}:
        return False, "/dev/kvm exists but the CPU has no vmx/svm: a paravirtual nested KVM cannot boot Linux"
    if boot is None:
        return True, "vmx/svm present"
    qemu = shutil.which(QEMU)
    if qemu is None:
        return False, f"{QEMU} is not installed"
    with tempfile.TemporaryDirectory(prefix="apppot-kvm-probe-") as tmp:
        log = Path(tmp) / "log"
        argv = [qemu, "-machine", f"{MACHINE},accel=kvm", "-cpu", "host", "-m", "128", "-nodefaults",
                "-no-user-config", "-no-reboot", "-display", "none", "-serial", "stdio",
                "-kernel", os.fspath(boot.kernel), "-append", "console=ttyS0 panic=-1 rdinit=/nonexistent"]  # fmt: skip
        rc, timed_out, _ = proc.supervise(argv, log_path=log, walltime_s=KVM_PROBE_TIMEOUT_S,
                                          polite_stop=lambda pid: None, grace_s=0)  # fmt: skip
        text = log.read_text(errors="replace")
    if re.search(r"Kernel panic|No working init", text):
        return True, "a kernel booted under KVM"
    if timed_out:
        return False, f"a kernel did not boot within {KVM_PROBE_TIMEOUT_S:.0f} s under KVM"
    last = (text.strip().splitlines() or ["no output"])[-1]
    return False, f"KVM failed to run a kernel (qemu exit {rc}: {last[:100]})"
