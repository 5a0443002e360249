"""The host <-> guest contract files (apppot/contract.py) against a hostile job directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apppot import contract
from apppot.errors import ApppotError


@pytest.fixture
def ctl(tmp_path: Path):
    fd = contract.open_control_dir(tmp_path)
    yield tmp_path / ".apppot", fd
    os.close(fd)


def test_contract_round_trip(ctl) -> None:
    path, fd = ctl
    contract.write_contract(fd, uid=1, gid=2, command=["sh", "-c", "echo 'a b'"], changes="c.tar.gz")
    assert (path / "argv").read_text() == "set -- sh -c 'echo '\"'\"'a b'\"'\"''\n"
    assert (path / "params").read_text() == "APPPOT_UID=1\nAPPPOT_GID=2\nAPPPOT_INTERACTIVE=0\nAPPPOT_CHANGES=c.tar.gz\n"
    (path / "status").write_text("42\nmessage\n")
    assert contract.read_status(fd) == (42, "message")
    contract.write_failure(fd, "bad input")
    assert contract.read_status(fd) == (125, "bad input")


def test_status_that_is_not_a_regular_file_or_too_big(ctl, tmp_path) -> None:
    path, fd = ctl
    (path / "status").symlink_to("/dev/zero")
    assert contract.read_status(fd) == (None, "")
    (path / "status").unlink()
    os.mkfifo(path / "status")  # an open without O_NONBLOCK would wait for a writer forever
    assert contract.read_status(fd) == (None, "")
    (path / "status").unlink()
    with open(path / "status", "wb") as f:
        f.truncate(1 << 40)  # a terabyte of zeros: only the first 64 KiB are read
    assert contract.read_status(fd) == (None, "")
    assert contract.read_file(fd, "status", limit=contract.STATUS_LIMIT) == b"\0" * contract.STATUS_LIMIT


def test_writes_replace_a_planted_symlink(ctl, tmp_path) -> None:
    path, fd = ctl
    canary = tmp_path / "canary"
    canary.write_text("keep\n")
    (path / "params").symlink_to(canary)
    contract.write_contract(fd, uid=0, gid=0, command=None)
    assert canary.read_text() == "keep\n" and not (path / "params").is_symlink()


def test_symlinked_control_dir_is_refused(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = tmp_path / "job"
    job.mkdir()
    (job / ".apppot").symlink_to(elsewhere)
    with pytest.raises(ApppotError, match="is a symlink or not a directory"):
        contract.open_control_dir(job)
    fd = contract.open_control_dir(job, replace_bad=True)  # unlinks the symlink, never its target
    os.close(fd)
    assert (job / ".apppot").is_dir() and not (job / ".apppot").is_symlink() and elsewhere.is_dir()


def test_control_dir_of_another_owner_is_refused(tmp_path) -> None:
    with pytest.raises(ApppotError, match="not owned by the job's user"):
        contract.open_control_dir(tmp_path, owner=os.getuid() + 1)
