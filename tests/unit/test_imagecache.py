"""The image cache's bookkeeping (apppot/imagecache.py) on a tmp dir: budgets, LRU eviction, holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apppot import fetchd, imagecache
from apppot.errors import ApppotError


@pytest.mark.parametrize(("text", "size"), [("20G", 20 << 30), ("512M", 512 << 20), ("1048576", 1 << 20)])
def test_parse_budget(text, size):
    assert imagecache.parse_budget(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", "0"])
def test_parse_budget_refuses_nonsense(text):
    with pytest.raises(ApppotError, match="APPPOT_CACHE_BUDGET"):
        imagecache.parse_budget(text)


def make_entry(root: Path, n: int, size: int, last_use: float) -> str:
    digest = f"{n:064x}"
    for sub in ("sha256", "meta"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "sha256" / digest).write_bytes(b"x" * size)
    imagecache.write_meta(os.fspath(root), digest, name=f"img{n}", last_use=last_use)
    return digest


def test_evict_lru_idle_until_under_budget_skipping_held_and_recent(tmp_path):
    root = os.fspath(tmp_path)
    old, held, mid, recent = (make_entry(tmp_path, n, 100, t) for n, t in ((1, 1000), (2, 1100), (3, 1200), (4, 1950)))
    fd = imagecache.hold(imagecache.entry_path(root, held))
    try:
        # 400 bytes + 150 needed, budget 300: old goes, held is skipped, mid goes; recent is in its grace
        removed = imagecache.evict(root, 300, need=150, grace=100, now=2000)
        assert imagecache.in_use(imagecache.entry_path(root, held))
    finally:
        os.close(fd)
    assert removed == [old, mid]
    assert {e["sha256"] for e in imagecache.entries(root)} == {held, recent}
    assert not Path(imagecache.meta_path(root, old)).exists()
    assert not imagecache.in_use(imagecache.entry_path(root, held))


def test_interrupted_downloads_nobody_resumed_go_first(tmp_path):
    """partial/HEX.part is outside the budget's count: one nobody resumed within the grace goes at the
    next eviction, even under budget; a recent one (its service restarting) and one being downloaded stay."""
    root = os.fspath(tmp_path)
    (tmp_path / "partial").mkdir()
    stale, recent, active = (f"{n:064x}" for n in (7, 8, 9))
    for digest, mtime in ((stale, 1000), (recent, 1950), (active, 1000)):
        part = Path(imagecache.part_path(root, digest))
        part.write_bytes(b"x" * 10)
        os.utime(part, (mtime, mtime))
    (tmp_path / "partial" / "notes.txt").write_text("not ours")
    kept = make_entry(tmp_path, 1, 100, 0)
    logged: list[str] = []
    assert imagecache.evict(root, 1000, grace=100, now=2000, downloading={active}, log=logged.append) == []
    assert sorted(os.listdir(tmp_path / "partial")) == sorted([f"{recent}.part", f"{active}.part", "notes.txt"])
    assert [e["sha256"] for e in imagecache.entries(root)] == [kept]
    assert len(logged) == 1 and stale in logged[0]


def test_nothing_evicted_under_budget(tmp_path):
    make_entry(tmp_path, 1, 100, 0)
    assert imagecache.evict(os.fspath(tmp_path), 1000, need=900, grace=0) == []


def test_digest_of_entry(tmp_path):
    assert imagecache.digest_of_entry(f"/c/sha256/{'a' * 64}") == "a" * 64
    assert imagecache.digest_of_entry(f"/c/images/{'a' * 64}") is None
    assert imagecache.digest_of_entry("/c/sha256/debian.img") is None


def test_request_without_a_service_says_how_to_start_it(tmp_path):
    with pytest.raises(ApppotError) as e:
        fetchd.request("list", socket=os.fspath(tmp_path / "none.sock"), timeout=1)
    assert "not running" in str(e.value) and "APPPOT_FETCHD" in str(e.value)


def test_request_to_a_dead_services_socket_retries_until_its_timeout(tmp_path):
    """A killed service leaves its socket behind (connections refused) until condor_master starts the next
    one: the client asks again until its timeout, then fails saying so."""
    import socket
    import time

    path = os.fspath(tmp_path / "fetchd.sock")
    socket.socket(socket.AF_UNIX).bind(path)  # bound, never listening: what a dead service leaves
    started = time.monotonic()
    with pytest.raises(ApppotError, match=r"stopped answering and was not back within 1\.5 s \(\d+ tries"):
        fetchd.request("list", socket=path, timeout=1.5)
    assert 1.0 < time.monotonic() - started < 3


def test_the_drop_in_as_htcondor_reads_it(tmp_path):
    """make install puts 55-apppot-cache.conf next to 50-apppot.conf; HTCondor's own config parser sees the
    fetch service in DAEMON_LIST at its installed path, and the plugin's knobs in the startd's environment."""
    import subprocess
    import sys

    from tests.conftest import REPO

    dest = tmp_path / "dest"
    subprocess.run(["make", "-s", "-C", REPO, "install", f"DESTDIR={dest}", "PREFIX=/opt/x", "CACHE_DIR=/srv/c"],
                   check=True, capture_output=True)  # fmt: skip
    assert os.access(dest / "opt/x/libexec/apppot/apppot_fetchd", os.X_OK)
    conf = tmp_path / "condor_config"
    conf.write_text(f"LOG = /var/log/condor\nDAEMON_LIST = MASTER, STARTD\nSTARTD_ENVIRONMENT = A=1\n"
                    f"LOCAL_CONFIG_DIR = {dest}/etc/condor/config.d\n")  # fmt: skip
    code = ("import htcondor2 as h; print('|'.join(h.param[k] for k in ('DAEMON_LIST', 'APPPOT_FETCHD', "
            "'APPPOT_FETCHD_SOCKET', 'STARTD_ENVIRONMENT', 'APPPOT_FETCHD_LOG', 'APPPOT_CACHE_BUDGET')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CONDOR_CONFIG": os.fspath(conf)},
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    daemons, fetchd_path, sock, startd_env, log, budget = out.split("|")
    assert "APPPOT_FETCHD" in daemons.replace(",", " ").split() and "STARTD" in daemons
    assert fetchd_path == "/opt/x/libexec/apppot/apppot_fetchd"
    assert sock == "/srv/c/fetchd.sock" and log == "/var/log/condor/ApppotFetchdLog"
    assert "APPPOT_CACHE_DIR=/srv/c" in startd_env and "APPPOT_FETCHD_SOCKET=/srv/c/fetchd.sock" in startd_env
    assert "A=1" in startd_env and imagecache.parse_budget(budget) == 20 << 30
