"""What differs between HTCondor series, checked on whichever pool this session runs: the 23.x one
(`make test-condor`) or the 25.x one (`make test-condor-25`, CONDOR_SUITE=sid). docs/condor.md,
"Supported HTCondor versions", lists the differences.

The slot ad learns the node's images two ways (condor_config.d/50-apppot.conf): from the plugin's
`-classad` answer (StartdAttrs, passed on by a starter of HTCondor 23.7 or later) and from the
startd cron job `apppot_images` (every series). Each test shows one of them on its own."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

pytestmark = pytest.mark.condor

IMAGE = "tiny"


def slot_images(pool, node: str = "nodea") -> list[str]:
    ads = [a for a in pool.startd_ads(["SlotType", "PoolNode", "AppPotImages"])
           if a.get("SlotType") != "Dynamic" and a.get("PoolNode") == node]  # fmt: skip
    return str(ads[0].get("AppPotImages", "")).split(",") if ads else []


def wait_for(pool, what: str, cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s (AppPotImages={slot_images(pool)}); {pool.logs_hint()}")
        time.sleep(0.5)


def test_plugin_startd_attrs_reach_the_starter_ad(pool):
    """What the startd reads at start-up and on reconfig: `condor_starter -classad`, which runs every
    plugin's -classad and copies the attributes a plugin names in StartdAttrs (HTCondor >= 23.7)."""
    # as the startd runs it: as root (the test user may not write the starter's log)
    cmd = ["condor_starter", "-classad"]
    if pool.mode == "chroot":
        cmd = ["chroot", str(pool.root), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    m = re.search(r'^AppPotImages\s*=\s*"([^"]*)"\s*$', out, re.MULTILINE)
    assert m, f"the starter's ad has no AppPotImages from the plugin:\n{out}"
    assert IMAGE in m.group(1).split(",")
    assert re.search(r"^HasAppPot\s*=\s*true\s*$", out, re.MULTILINE | re.IGNORECASE), out


def test_startd_cron_advertises_images_added_later(pool):
    """An image dropped into the image directory shows up in the slot ad without condor_reconfig, so
    not through the plugin (asked only at start-up and reconfig): the startd cron job published it.
    That is the path a 23.0 LTS node, whose starter drops plugin StartdAttrs, relies on. Node A's image
    directory: node B's ad never lists it (each node's cron job lists its own directory)."""
    name = f"cronprobe{os.getpid()}"
    probe = pool.image_dir / f"{name}.img"
    wait_for(pool, f"{IMAGE} in the slot ad", lambda: IMAGE in slot_images(pool), timeout=60)
    assert name not in slot_images(pool)
    probe.write_bytes(b"\0" * 4096)
    probe.chmod(0o644)
    try:
        wait_for(pool, f"the new image {name} in the slot ad", lambda: name in slot_images(pool))
        assert IMAGE in slot_images(pool)
        time.sleep(4)  # a cron period (APPPOT_IMAGES_PERIOD = 3 in the pool)
        assert IMAGE in slot_images(pool, "nodeb") and name not in slot_images(pool, "nodeb")
    finally:
        probe.unlink()
    wait_for(pool, f"the removed image {name} gone from the slot ad", lambda: name not in slot_images(pool))
