"""Base + changes through real boots: customise an image, ship the changes, merge them into a fresh job."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from apppot import build
from tests.vm.conftest import TEST_UID, apppot

pytestmark = pytest.mark.vm

CUSTOMISE = r"""
set -e
mkdir -p /usr/local/bin
printf '#!/bin/sh\necho "hello from the changes, args: $*"\n' > /usr/local/bin/hello
chmod 755 /usr/local/bin/hello
rm /usr/share/apppot/README
echo /bin/ash >> /etc/shells
chmod 700 /root
apppot-snap diff
"""

EXPECTED_DIFF = {
    "A usr/local", "A usr/local/bin", "A usr/local/bin/hello", "M usr",
    "D usr/share/apppot/README", "M usr/share/apppot", "M etc/shells", "M root",
}  # fmt: skip
# A directory's mtime is recorded in seconds: when the cached image was built in the same second
# as the customisation (a fresh cache), its parents' "M" lines are rightly absent.
DIR_MTIMES = {"M usr", "M usr/share/apppot"}


def check_diff(lines: set[str]) -> None:
    assert EXPECTED_DIFF - DIR_MTIMES <= lines <= EXPECTED_DIFF, sorted(lines)


def own(d: Path, uid: int) -> Path:
    os.chown(d, uid, uid)
    return d


def test_changes_made_in_an_image_reach_a_fresh_job(tiny_image: Path, job_dir: Path, backend: str) -> None:
    work = job_dir / "work"
    work.mkdir()
    cow = work / "work.cow"
    # 1. The user customises the image in a persistent COW layer (as root in the guest).
    r = apppot("run", "--backend", backend, "--mem", "128M", "--apppot", f"{cow},{tiny_image}", "--",
               "sh", "-c", CUSTOMISE, cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    diff = set(r.stdout.splitlines())
    check_diff(diff)
    # 2. One host command boots the COW and writes the changes tarball.
    tarball = work / "my.changes.tar.gz"
    r = apppot("snap", "changes", "--backend", backend, "--mem", "128M", "--apppot", f"{cow},{tiny_image}",
               "-o", tarball, cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert tarball.is_file() and re.search(r"3 added, [24] modified, 1 deleted", r.stderr), r.stderr
    assert not list(work.glob(".apppot-snap-*")), "the private job dir was left behind"
    # 3. A fresh job on the pristine base, as an unprivileged submitter, with --changes: the
    #    command uses the changes (merged before the uid fix-up, as root).
    # (libvirt as an unprivileged user means qemu:///session, which needs a passwd entry: see test_run.py)
    submitter = TEST_UID if backend != "libvirt" else 0
    fresh = job_dir / "fresh"
    fresh.mkdir()
    own(fresh, submitter)
    shutil.copy(tarball, fresh / "changes.tar.gz")
    os.chown(fresh / "changes.tar.gz", submitter, submitter)
    r = apppot("run", "--backend", backend, "--mem", "128M", "--image", tiny_image, "--changes", "changes.tar.gz",
               "--", "sh", "-c", "hello a 'b c'; id -u; grep -x /bin/ash /etc/shells; "
               "test -e /usr/share/apppot/README || echo README gone",
               cwd=fresh, user=submitter or None)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["hello from the changes, args: a b c", str(submitter), "/bin/ash", "README gone"]
    # 4. ... and the merged guest differs from its base by exactly those changes.
    r = apppot("run", "--backend", backend, "--mem", "128M", "--image", tiny_image, "--changes", tarball,
               "--", "apppot-snap", "diff", cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.splitlines()) == diff


def test_changes_for_another_base_are_refused(tiny_image: Path, job_dir: Path, backend: str) -> None:
    cow = job_dir / "work.cow"
    r = apppot("run", "--backend", backend, "--mem", "128M", "--apppot", f"{cow},{tiny_image}", "--",
               "sh", "-c", "echo changed > /etc/motd", cwd=job_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr
    tarball = job_dir / "c.tar.gz"
    r = apppot("snap", "changes", "--backend", backend, "--mem", "128M", "--apppot", f"{cow},{tiny_image}",
               "-o", tarball, cwd=job_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr
    other = build.build_tiny(job_dir / "other.img")  # same contents, but a new base id
    r = apppot("run", "--backend", backend, "--mem", "128M", "--image", other, "--changes", tarball,
               "--", "cat", "/etc/motd", cwd=job_dir)  # fmt: skip
    assert r.returncode == 125, r.stdout + r.stderr
    assert "made against base" in r.stderr and "this image's base is" in r.stderr and "--force" in r.stderr
    assert r.stdout == ""
    r = apppot("run", "--backend", backend, "--mem", "128M", "--image", other, "--changes", tarball,
               "--force-changes", "--", "cat", "/etc/motd", cwd=job_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == "changed\n"
