"""qemu and libvirt on a real host: `apppot check`, cleanup when apppot itself dies, a plugin-staged overlay.
(Their launch plan and domain XML: tests/unit/test_backends.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import run_plugin
from tests.vm.conftest import REPO, apppot, vm_processes


def test_check_lists_every_backend(job_dir, libvirtd, vm_boot_kit):
    """`apppot check` names each backend and, on this host (where every VM test runs), says ok for each."""
    res = apppot("check", cwd=job_dir)
    lines = res.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["uml", "qemu", "libvirt"], res.stdout
    assert [ln.split(None, 1)[1] for ln in lines] == ["ok"] * 3, res.stdout
    assert res.returncode == 0, res.stdout + res.stderr


def test_sigkill_of_the_libvirt_launcher_leaves_no_vm(tiny_image, vm_boot_kit, job_dir, libvirtd):
    """libvirtd, not apppot, owns the qemu process: if the launcher apppot supervises is SIGKILLed,
    AUTODESTROY still ends the domain when its connection drops."""
    vm_id = "sigkill-libvirt"
    argv = [sys.executable, "-m", "apppot", "run", "--backend", "libvirt", "--image", os.fspath(tiny_image),
            "--id", vm_id, "--", "sh", "-c", "echo started; sleep 100"]  # fmt: skip
    p = subprocess.Popen(argv, cwd=job_dir, env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == "started\n"
    assert vm_processes(vm_id) != []
    launchers = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and _cmdline(e.path).startswith(
        f"{sys.executable} -m apppot.backends.libvirt") and f"apppot-{vm_id}-" in _cmdline(e.path)]  # fmt: skip
    assert len(launchers) == 1
    os.kill(launchers[0], signal.SIGKILL)
    p.communicate(timeout=60)
    deadline = time.monotonic() + 15
    while vm_processes(vm_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vm_processes(vm_id) == []
    assert p.returncode == 255  # no guest status: the VM was destroyed


def _cmdline(proc_dir: str) -> str:
    try:
        return Path(proc_dir, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_plugin_staged_qcow2_overlay_runs_under_qemu(tiny_image, vm_boot_kit, job_dir, plugin_env):
    """The overlay the apppot:// plugin writes (run as HTCondor's starter runs it) boots under qemu."""
    env = {**plugin_env, "APPPOT_IMAGE_PATH": os.fspath(tiny_image.parent)}
    rc, ads, err = run_plugin(env, job_dir, [(f"apppot://{tiny_image.stem}", "disk.qcow2")])
    assert rc == 0 and ads[0]["TransferSuccess"] is True, (ads, err)
    overlay = job_dir / "disk.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", overlay], capture_output=True, text=True,
                                     check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2" and info["backing-filename"] == os.fspath(tiny_image), info
    res = apppot("run", "--backend", "qemu", "--image", overlay, "--", "sh", "-c", "echo kept > /root/x", cwd=job_dir)
    assert res.returncode == 0, res.stderr
    res = apppot("run", "--backend", "qemu", "--image", overlay, "--", "sh", "-c", "cat /root/x || echo absent",
                 cwd=job_dir)  # fmt: skip
    assert res.stdout == "absent\n", "a private layer over the given overlay: nothing persists"
