"""The startd cron job `apppot_images` (apppot/condor/slot_images.py): its output is read by the startd
as `Attr = value` lines, and image names are arbitrary file names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import classad2

REPO = Path(__file__).resolve().parents[2]


def run_cron(image_path: str, env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "APPPOT_IMAGE_PATH": image_path, "APPPOT_CACHE_DIR": image_path + "/no-cache", **(env or {})}
    return subprocess.run([sys.executable, REPO / "plugins" / "apppot_images"], env=env, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


def test_lists_the_images_as_a_classad(tmp_path):
    for name in ("b.img", "a b.raw", 'we"ird.qcow2', "back\\slash", "com,ma.img", "tab\tbed", ".hidden.img"):
        (tmp_path / name).write_bytes(b"\0" * 512)
    out = run_cron(os.fspath(tmp_path))
    ad = classad2.parseOne(out)
    assert ad["HasAppPot"] is True
    assert ad["AppPotImages"].split(",") == ["a b", "b"]  # names the list cannot carry are left out
    assert out.count("\n") == 3  # nothing else: every line becomes a slot attribute
    assert ad["AppPotCachedImages"] == ""


def test_no_images_says_so(tmp_path):
    ad = classad2.parseOne(run_cron(os.fspath(tmp_path / "missing")))
    assert ad["HasAppPot"] is False and ad["AppPotImages"] == ""


def test_cached_digests_from_the_cache_listing(tmp_path):
    """AppPotCachedImages: the complete entries of the node's cache (APPPOT_CACHE_DIR/sha256/HEX), as
    "sha256:HEX"; partial downloads, odd names, symlinks and directories there are not entries."""
    cache = tmp_path / "cache"
    (cache / "sha256").mkdir(parents=True)
    (cache / "partial").mkdir()
    a, b, c = "a" * 64, "0123456789abcdef" * 4, "c" * 64
    for name in (a, b):
        (cache / "sha256" / name).write_bytes(b"x")
    (cache / "partial" / f"{c}.part").write_bytes(b"x")
    (cache / "sha256" / ("d" * 64)).symlink_to(cache / "sha256" / a)
    (cache / "sha256" / ("e" * 64)).mkdir()
    for odd in ("A" * 64, "f" * 63, 'x",y', "f" * 64 + ".tmp"):
        (cache / "sha256" / odd).write_bytes(b"x")
    env = {"APPPOT_CACHE_DIR": os.fspath(cache)}
    ad = classad2.parseOne(run_cron(os.fspath(tmp_path / "images"), env))
    assert ad["AppPotCachedImages"].split(",") == [f"sha256:{b}", f"sha256:{a}"]
    assert ad["HasAppPot"] is False  # the resident images alone: a cache holds no named image


def test_no_cache_lists_nothing(tmp_path):
    ad = classad2.parseOne(run_cron(os.fspath(tmp_path), {"APPPOT_CACHE_DIR": os.fspath(tmp_path / "missing")}))
    assert ad["AppPotCachedImages"] == ""
