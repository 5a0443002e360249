"""The startd cron job `apppot_images` (apppot/condor/slot_images.py): its output is read by the startd
as `Attr = value` lines, and image names are arbitrary file names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import classad2

REPO = Path(__file__).resolve().parents[2]


def run_cron(image_path: str) -> str:
    env = {**os.environ, "APPPOT_IMAGE_PATH": image_path}
    return subprocess.run([sys.executable, REPO / "plugins" / "apppot_images"], env=env, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


def test_lists_the_images_as_a_classad(tmp_path):
    for name in ("b.img", "a b.raw", 'we"ird.qcow2', "back\\slash", "com,ma.img", "tab\tbed", ".hidden.img"):
        (tmp_path / name).write_bytes(b"\0" * 512)
    out = run_cron(os.fspath(tmp_path))
    ad = classad2.parseOne(out)
    assert ad["HasAppPot"] is True
    assert ad["AppPotImages"].split(",") == ["a b", "b"]  # names the list cannot carry are left out
    assert out.count("\n") == 2  # nothing else: every line becomes a slot attribute


def test_no_images_says_so(tmp_path):
    ad = classad2.parseOne(run_cron(os.fspath(tmp_path / "missing")))
    assert ad["HasAppPot"] is False and ad["AppPotImages"] == ""
