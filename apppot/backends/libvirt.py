"""libvirt: the qemu backend's VM, described as domain XML and started through libvirt-python.

libvirtd, not apppot, starts qemu, so the process apppot supervises is a small launcher (`python -m
apppot.backends.libvirt DOMAIN.xml`, below) that:
* creates the domain transient and with VIR_DOMAIN_START_AUTODESTROY: libvirtd destroys it when the
  launcher's connection closes, so even a SIGKILLed launcher leaves no VM behind;
* waits until the domain is gone (it powers itself off; on_poweroff/on_reboot/on_crash = destroy);
* turns SIGUSR1 (apppot's polite stop) into ctrl-alt-del (virDomainSendKey), which apppot-init
  turns into SIGTERM for the job, and SIGTERM/SIGINT into virDomainDestroy;
* copies the serial console (a file libvirt writes) to its stdout, i.e. the job's console.log.

The connection URI is $APPPOT_LIBVIRT_URI, default qemu:///system as root and qemu:///session
otherwise. qemu runs with the caller's uid/gid (DAC label, no relabelling): libvirt never chowns the
base image or the job dir, and files the guest writes over 9p belong to the submitter.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from apppot.backends import LaunchPlan
from apppot import accel, domain, store
from apppot.backends.qemu import QemuBackend, QemuBoot, prepare_qcow2_layer
from apppot.bootfiles import find_boot_files
from apppot.errors import ApppotError
from apppot.job import BackendKind, JobSpec

KEY_LEFTCTRL, KEY_LEFTALT, KEY_DELETE = 29, 56, 111  # linux input codes (VIR_KEYCODE_SET_LINUX)


def default_uri() -> str:
    return os.environ.get("APPPOT_LIBVIRT_URI") or ("qemu:///system" if os.geteuid() == 0 else "qemu:///session")


class LibvirtBackend:
    kind: ClassVar[BackendKind] = BackendKind.LIBVIRT

    def __init__(self, uri: str | None = None, initrd: Path | None = None) -> None:
        self.uri = uri or default_uri()
        self.initrd = initrd
        self.qemu = QemuBackend()

    def unavailable_reason(self) -> str | None:
        try:
            import libvirt
        except ImportError:
            return "libvirt-python is not installed (fix: pip install libvirt-python, or apt-get install python3-libvirt)"
        if (reason := self.qemu.unavailable_reason()) is not None:
            return reason
        try:
            conn = open_connection(self.uri)
        except ApppotError as e:
            return f"{e.message} ({e.hint})" if e.hint else e.message
        try:
            caps = conn.getCapabilities()
        finally:
            conn.close()
        if "<domain type='qemu'" not in caps and "<domain type='kvm'" not in caps:
            return f"libvirt at {self.uri} offers no qemu domains (fix: apt-get install libvirt-daemon-driver-qemu)"
        del libvirt
        return None

    def prepare(self, spec: JobSpec, rundir: Path) -> QemuBoot:
        if spec.interactive:
            raise ApppotError("interactive sessions are not supported with --backend libvirt",
                              hint="give a command to run, or use --backend qemu or uml")  # fmt: skip
        prepare_qcow2_layer(spec.disk)
        files = find_boot_files(spec.disk, kernel=spec.kernel, initrd=self.initrd, rundir=rundir)
        os.chmod(rundir, 0o755)  # qemu (as the caller) writes the console file there
        return QemuBoot(files, accel.choose_accel(files, notice=True))

    def plan(self, spec: JobSpec, rundir: Path, boot: QemuBoot) -> LaunchPlan:
        xml_path = rundir / "domain.xml"
        xml = domain_xml(spec, rundir, boot=boot, emulator=self.qemu.qemu)
        argv = [sys.executable, "-m", "apppot.backends.libvirt", "--uri", self.uri, "--serial",
                os.fspath(serial_path(rundir)), os.fspath(xml_path)]  # fmt: skip
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))}
        return LaunchPlan(argv=tuple(argv), env=env, files=((xml_path, xml),))

    def polite_stop(self, spec: JobSpec, rundir: Path) -> Callable[[int], None]:
        return lambda pid: os.kill(pid, signal.SIGUSR1)  # the launcher sends ctrl-alt-del


def _package_root() -> str:
    return os.fspath(Path(__file__).resolve().parents[2])


def serial_path(rundir: Path) -> Path:
    return rundir / "serial.log"


def domain_xml(spec: JobSpec, rundir: Path, *, boot: QemuBoot, emulator: Path | None) -> str:
    assert spec.disk.layer is not None
    chain = [(spec.disk.base, spec.disk.base_format)]
    if spec.disk.base_format == "qcow2":  # a raw base ends the chain
        chain += store.backing_chain(spec.disk.base, confine=False)
    return domain.domain_xml(domain.Domain(
        name=spec.vm_id, domain_type="kvm" if boot.accel == "kvm" else "qemu", memory_mib=spec.memory_mib,
        run_as=(os.getuid(), os.getgid()), kernel=boot.files.kernel, initrd=boot.files.initrd,
        cmdline=domain.kernel_cmdline(extra=spec.extra_args), disks=(domain.DomainDisk(spec.disk.layer, "qcow2", backing=tuple(chain)),),
        share_dir=spec.job_dir, share_mode="squash",  # qemu is the submitter: files are theirs, modes as the guest set
        serial_file=serial_path(rundir), emulator=emulator,
    ))  # fmt: skip


def open_connection(uri: str):  # type: ignore[no-untyped-def]
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors come as exceptions; no stderr noise
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        hint = ("start it: libvirtd -d (and virtlogd -d), or apt-get install libvirt-daemon-system"
                if uri.endswith("/system") else "check that libvirtd can be started for this user (qemu:///session)")
        raise ApppotError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}", hint=hint) from None


# --- the launcher: `python -m apppot.backends.libvirt DOMAIN.xml` ----------------------------------


def launch(xml_path: Path, *, uri: str, serial: Path) -> int:
    """Create the domain, wait for its end, destroy it on every way out. Returns 0, or 1 if it
    had to be destroyed."""
    import libvirt

    stop_requests: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requests.append(signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    conn = open_connection(uri)
    dom = None
    copied = 0
    try:
        dom = conn.createXML(xml_path.read_text(), libvirt.VIR_DOMAIN_START_AUTODESTROY)
        while True:
            copied = copy_new(serial, copied)
            while stop_requests:
                signum = stop_requests.pop(0)
                if signum == signal.SIGUSR1:
                    dom.sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 100, [KEY_LEFTCTRL, KEY_LEFTALT, KEY_DELETE], 3, 0)
                else:
                    raise KeyboardInterrupt
            try:
                if not dom.isActive():
                    break
            except libvirt.libvirtError:
                break  # a transient domain disappears when it stops
            time.sleep(0.05)
        return 0
    except KeyboardInterrupt:
        return 1
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone
        conn.close()  # AUTODESTROY: had anything survived, closing the connection ends it
        copy_new(serial, copied)


def copy_new(path: Path, pos: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except OSError:
        return pos
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return pos + len(data)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apppot.backends.libvirt", description=launch.__doc__)
    p.add_argument("--uri", default=default_uri())
    p.add_argument("--serial", type=Path, required=True, help="the console file named in the domain XML")
    p.add_argument("xml", type=Path)
    args = p.parse_args(argv)
    try:
        return launch(args.xml, uri=args.uri, serial=args.serial)
    except ApppotError as e:
        print(f"apppot: error: {e.message}" + (f" ({e.hint})" if e.hint else ""), file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main())
