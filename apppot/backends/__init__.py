"""Backends boot a JobSpec's disk with the job dir shared in; one module per hypervisor."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

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

    # Checks and I/O before boot; returns what plan() needs (kernel, accelerator ...), so the backend
    # object itself keeps no state between the two.
    def prepare(self, spec: JobSpec, rundir: Path) -> Any: ...

    def plan(self, spec: JobSpec, rundir: Path, prepared: Any) -> LaunchPlan: ...  # pure; unit-tested

    def polite_stop(self, spec: JobSpec, rundir: Path) -> Callable[[int], None]: ...


def get_backend(kind: BackendKind | str, *, initrd: Path | None = None) -> Backend:
    # Each backend's module is imported only when chosen: every job pays `apppot run`'s start-up.
    def uml() -> Backend:
        from apppot.backends.uml import UmlBackend

        return UmlBackend()

    def qemu() -> Backend:
        from apppot.backends.qemu import QemuBackend

        return QemuBackend(initrd=initrd)

    def libvirt() -> Backend:
        from apppot.backends.libvirt import LibvirtBackend

        return LibvirtBackend(initrd=initrd)

    backends: dict[BackendKind, Callable[[], Backend]] = {BackendKind.UML: uml, BackendKind.QEMU: qemu,
                                                          BackendKind.LIBVIRT: libvirt}  # fmt: skip
    try:
        kind = BackendKind(kind)
        return backends[kind]()
    except (ValueError, KeyError):
        choices = ", ".join(k.value for k in backends)
        raise ApppotError(f"unknown or unavailable backend {kind!r}", hint=f"choose one of: {choices}") from None
