"""Backends boot a JobSpec's disk with the job dir shared in; one module per hypervisor."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, ClassVar, Protocol

from apppot.errors import ApppotError
from apppot.job import BackendKind, JobSpec


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    argv: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the launcher's environment
    files: tuple[tuple[Path, str], ...] = ()  # written before start, e.g. libvirt domain XML


class Backend(Protocol):
    kind: ClassVar[BackendKind]

    def unavailable_reason(self) -> str | None: ...  # None = usable on this host

    def prepare(self, spec: JobSpec, rundir: Path) -> None: ...  # checks + I/O before boot

    def plan(self, spec: JobSpec, rundir: Path) -> LaunchPlan: ...  # pure; unit-tested

    def polite_stop(self, spec: JobSpec, rundir: Path) -> Callable[[int], None]: ...


def get_backend(kind: BackendKind | str, *, initrd: Path | None = None) -> Backend:
    from apppot.backends.libvirt import LibvirtBackend
    from apppot.backends.qemu import QemuBackend
    from apppot.backends.uml import UmlBackend

    backends: dict[BackendKind, Callable[[], Backend]] = {
        BackendKind.UML: UmlBackend,
        BackendKind.QEMU: lambda: QemuBackend(initrd=initrd),
        BackendKind.LIBVIRT: lambda: LibvirtBackend(initrd=initrd),
    }
    try:
        kind = BackendKind(kind)
        return backends[kind]()
    except (ValueError, KeyError):
        choices = ", ".join(k.value for k in backends)
        raise ApppotError(f"unknown or unavailable backend {kind!r}", hint=f"choose one of: {choices}") from None
