"""User-Mode Linux: the guest kernel is an ordinary host process. No root, no hypervisor."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, ClassVar

from apppot import image, kernel
from apppot.backends import LaunchPlan
from apppot.errors import ApppotError
from apppot.job import BackendKind, JobSpec

MCONSOLE_MAGIC, MCONSOLE_VERSION = 0xCAFEBABE, 2
GUEST_JOB_DIR = "/home/user/job"  # where apppot-init expects the job dir (JOB= there)
PAGE = 4096


@dataclasses.dataclass(frozen=True)
class UmlBoot:
    """What prepare() found for plan()."""

    kernel: Path


class UmlBackend:
    kind: ClassVar[BackendKind] = BackendKind.UML

    def __init__(self, kernel_path: Path | None = None) -> None:
        self.kernel_path = kernel_path

    def unavailable_reason(self) -> str | None:
        try:
            kernel.find_uml_kernel(self.kernel_path, notice=False)
        except ApppotError as e:
            return str(e)
        return None

    # --- checks and I/O before boot ----------------------------------------------------------------

    def prepare(self, spec: JobSpec, rundir: Path) -> UmlBoot:
        kernel_path = kernel.find_uml_kernel(spec.kernel or self.kernel_path)
        boot = UmlBoot(kernel_path)
        assert spec.disk.layer is not None
        if spec.disk.layer_format != "uml-cow":
            raise ApppotError(
                f"UML cannot use the {spec.disk.layer_format} overlay {spec.disk.layer}",
                hint="stage the disk for UML with apppot://NAME?format=uml-cow (a UML COW file), or pass the raw base image",
            )
        if not spec.disk.layer.exists():
            image.create_uml_cow(spec.disk.layer, image.probe_image(spec.disk.base))
        check_memory(spec.memory_mib, memory_dir(spec.memory_mib, rundir))
        return boot

    def plan(self, spec: JobSpec, rundir: Path, boot: UmlBoot) -> LaunchPlan:
        ubd = f"{spec.disk.layer},{spec.disk.base}"
        argv = [
            os.fspath(boot.kernel),
            f"umid={spec.vm_id}", f"uml_dir={rundir}",
            f"mem={spec.memory_mib}M",
            f"ubd0={ubd}", "root=/dev/ubda", "rw",
            "init=/sbin/apppot-init",
            f"hostfs={spec.job_dir}",  # the guest's hostfs root IS the job dir: nothing else is reachable
            "con=null", "ssl=null",
            "con0=fd:0,fd:1" if spec.interactive else "con0=null,fd:1",
            "quiet", "panic=-1",
            # apppot's kernel mounts /proc and the job dir before init (kernel/patches/0005): two
            # fork+execs of mount(8) less in the guest; other kernels ignore it, apppot-init mounts
            f"apppot.jobmount={GUEST_JOB_DIR}",
            "APPPOT_JOBFS=hostfs",
            *spec.extra_args,
        ]  # fmt: skip
        return LaunchPlan(argv=tuple(argv), env={"TMPDIR": os.fspath(memory_dir(spec.memory_mib, rundir))})

    def polite_stop(self, spec: JobSpec, rundir: Path) -> Callable[[int], None]:
        sock = rundir / spec.vm_id / "mconsole"
        return lambda pid: mconsole(sock, "cad")  # ctrl-alt-del: apppot-init gets SIGINT


# --- helpers ---------------------------------------------------------------------------------------


def memory_dir(memory_mib: int, rundir: Path) -> Path:
    """Where UML's RAM file goes: /dev/shm when it has room (fast, tmpfs), else the run dir."""
    need = memory_mib << 20
    for d in (Path(os.environ.get("APPPOT_MEMDIR", "/dev/shm")), rundir):
        with contextlib.suppress(OSError):
            if d.is_dir() and os.access(d, os.W_OK) and shutil.disk_usage(d).free >= need:
                return d
    return rundir


def check_memory(memory_mib: int, memdir: Path) -> None:
    free = shutil.disk_usage(memdir).free
    if free < memory_mib << 20:
        raise ApppotError(
            f"--mem {memory_mib}M does not fit: UML keeps guest RAM in a file in {memdir}, "
            f"which has {free >> 20} MiB free",
            hint="lower --mem, or point APPPOT_MEMDIR (or TMPDIR) at a tmpfs with room",
        )
    with contextlib.suppress(OSError, ValueError):
        max_maps = int(Path("/proc/sys/vm/max_map_count").read_text())
        # Each guest page a process touches can become a separate host mapping of the RAM file; past
        # vm.max_map_count the host refuses it and UML kills the guest process ("Failed to flush
        # page"). The guest kernel itself holds >= 32 MiB, which no process can map.
        need = ((memory_mib - 32) << 20) // PAGE
        if need > max_maps:
            most = (max_maps * PAGE >> 20) + 32
            raise ApppotError(
                f"--mem {memory_mib}M needs vm.max_map_count >= {need} on this host; it is {max_maps}",
                hint=f"use --mem {most}M or less, or ask the admin: sysctl -w vm.max_map_count=262144",
            )


def mconsole(sock_path: Path, command: str, *, timeout_s: float = 2.0) -> str:
    """Send one command to a UML instance's management console and return its reply."""
    import socket  # only to stop a VM: not on every launch's import path

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0apppot-mconsole-" + os.urandom(6).hex())  # abstract address: nothing to clean up
        s.settimeout(timeout_s)
        data = command.encode()
        s.sendto(struct.pack("=III512s", MCONSOLE_MAGIC, MCONSOLE_VERSION, len(data), data), os.fspath(sock_path))
        reply = s.recv(4 + 4 + 4 + 512)
    err, _more, length = struct.unpack("=III", reply[:12])
    text = reply[12 : 12 + length].decode(errors="replace")
    if err:
        raise ApppotError(f"UML mconsole refused {command!r}: {text}")
    return text
