"""Tests that need root but boot no VM: they change file owners or mount a file system.

The unit tier must also pass as an ordinary user, so these run in the vm tier, which runs as root
(`make test`); each would be meaningless without root's powers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import PREALLOCATED, run_plugin
from tests.unit.test_plugin import sandbox_files
from tests.unit import test_vm_universe as vmu

node = vmu.node  # the execute-node fixture of the unit tests


def test_build_tiny_records_a_base(tmp_path: Path) -> None:
    assert shutil.which("debugfs") and shutil.which("mke2fs"), "e2fsprogs is not installed"
    from apppot import build

    img = build.build_tiny(tmp_path / "tiny.img")
    out = subprocess.run(["debugfs", "-R", "cat /var/lib/apppot/snap.id", os.fspath(img)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.startswith("id=") and "label=apppot-tiny" in out
    state = subprocess.run(["debugfs", "-R", "cat /var/lib/apppot/snap.state", os.fspath(img)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    owners = {line.split(" ", 10)[10]: line.split(" ")[2:4] for line in state.splitlines() if not line.startswith(">")}
    assert owners["home/user"] == ["1000", "1000"] and owners["bin/busybox"] == ["0", "0"]
    assert "usr/share/apppot/README" in owners and "etc/apppot/snap.exclude" in owners


def test_disk_full(plugin_env, images, tmp_path):
    sb = tmp_path / "full"
    sb.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=28k", "tmpfs", sb], check=True)
    try:
        # Pre-allocating the outfile is what lets the plugin report a full disk at all.
        (sb / ".apppot_plugin.out").write_bytes(b" " * PREALLOCATED)
        (sb / ".apppot_plugin.in").write_text(f'[ Url = "apppot://base"; LocalFileName = "{sb}/disk" ]')
        filler = sb / "filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        rc, ads, _ = run_plugin(plugin_env, sb, [("apppot://base", "disk")])
        assert rc == 1
        assert ads[0]["TransferErrorData"][0]["FailureType"] == "NoSpace"
        assert "full" in ads[0]["TransferError"] or "space" in ads[0]["TransferError"]
        assert sandbox_files(sb) == {"filler"}
    finally:
        subprocess.run(["umount", sb], check=True)


def test_root_owned_sandbox_never_runs_qemu_as_root(node) -> None:
    os.chown(node["scratch"], 0, 0)
    rc, xml, err = vmu.run_script(node)
    assert rc == 0, err
    dom = ET.fromstring(xml)
    assert dom.findtext("seclabel/label") == "+65534:+65534" and dom.find("devices/disk") is None
