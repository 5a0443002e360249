"""What a job is (JobSpec) and how it ended (VmOutcome), shared by every backend."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

from apppot.contract import CONTROL_DIR  # inside the job dir: the host<->guest contract


class BackendKind(str, enum.Enum):
    UML = "uml"
    QEMU = "qemu"
    LIBVIRT = "libvirt"


class ExitCode(enum.IntEnum):
    """`apppot run`'s own statuses; otherwise it exits with the guest command's status."""

    WALLTIME = 124  # the job ran past --walltime; the VM was stopped
    APPPOT_FAILED = 125  # apppot could not run the job (bad input, missing kernel, ...)
    NO_STATUS = 255  # the VM ended without the guest reporting a status (crash, panic, killed)


@dataclasses.dataclass(frozen=True)
class Disk:
    """The job's root disk: a read-only base and the writable layer over it."""

    base: Path
    base_format: str  # "raw" | "qcow2"
    layer: Path | None  # UML COW file or qcow2 overlay, created if missing; None: a private one per run
    layer_format: str  # "uml-cow" | "qcow2"
    discard: bool  # delete the layer after the run (apppot created it, or --discard-disk)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    disk: Disk
    job_dir: Path
    command: tuple[str, ...] | None  # argv inside the guest, never a shell string
    backend: BackendKind = BackendKind.UML
    memory_mib: int = 256
    walltime_s: float | None = None
    grace_s: float = 20.0
    kernel: Path | None = None
    vm_id: str = "apppot"
    extra_args: tuple[str, ...] = ()
    changes: Path | None = None
    changes_force: bool = False
    interactive: bool = False
    uid: int = 0
    gid: int = 0

    @property
    def control_dir(self) -> Path:
        return self.job_dir / CONTROL_DIR


@dataclasses.dataclass(frozen=True)
class VmOutcome:
    guest_status: int | None  # None: the guest never reported one
    guest_message: str
    vm_returncode: int
    timed_out: bool
    interrupted: bool
    console_log: Path
    wall_s: float
    # Host clock (epoch s) at: boot (the VM process starts), status (the guest's status file was written,
    # its mtime), vm_exit (the VM process ended). For timing a job's phases (bench/condor.py).
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.timed_out:
            return ExitCode.WALLTIME
        if self.guest_status is None:
            return ExitCode.NO_STATUS
        return self.guest_status

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["console_log"] = str(self.console_log)
        d["exit_code"] = self.exit_code
        return json.dumps(d, indent=2) + "\n"
