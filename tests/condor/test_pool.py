"""Smoke tests of the personal HTCondor pool itself (scripts/personal-pool + fixtures)."""

import os
import pathlib
import time

import pytest

pytestmark = pytest.mark.condor


def test_vanilla_echo_job(pool):
    ad = pool.submit_and_wait({
        "executable": "/bin/echo",
        "arguments": "hello from the apppot pool",
        "transfer_executable": "false",
        "should_transfer_files": "YES",
        "output": "out", "error": "err", "log": "log",
    }, timeout=60)
    assert ad["ExitCode"] == 0, ad
    # the job dir lives under the shared dir: same path on the host and in the pool
    assert (pathlib.Path(ad["Iwd"]) / "out").read_text() == "hello from the apppot pool\n"


def test_spooled_job(pool, tmp_path):
    """No shared filesystem: input spooled from a host dir, output retrieved back into it."""
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho \"got: $(cat in.txt)\"\n")
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / "in.txt").write_text("spooled input\n")
    ad = pool.submit_and_wait({
        "executable": str(tmp_path / "run.sh"),
        "initialdir": str(tmp_path),
        "transfer_input_files": "in.txt",
        "should_transfer_files": "YES",
        "when_to_transfer_output": "ON_EXIT",
        "output": "out", "error": "err", "log": "log",
    }, timeout=60, spool=True)
    assert ad["ExitCode"] == 0, ad
    assert (tmp_path / "out").read_text() == "got: spooled input\n"


def test_in_pool_runs_as_test_user(pool):
    out = pool.in_pool("id", "-u").stdout.strip()
    assert out == str(pool.test_uid)
    assert "Total for all users" in pool.in_pool("condor_q", "-allusers", "-totals").stdout


def _startd_ad(pool, attrs, predicate, timeout=30):
    """The partitionable slot's ad, once predicate(ad) holds (the startd re-advertises every few s)."""
    deadline = time.monotonic() + timeout
    while True:
        ads = [a for a in pool.startd_ads(["Name", "SlotType", *attrs]) if a.get("SlotType") != "Dynamic"]
        if ads and predicate(ads[0]):
            return ads[0]
        if time.monotonic() > deadline:
            pytest.fail(f"startd ad never satisfied the check within {timeout}s: "
                        f"{[dict(a) for a in ads]}; {pool.logs_hint()}")
        time.sleep(1)


def test_startd_advertises_apppot_plugin(pool):
    """Needs the project's `make install`: 50-apppot.conf adds the apppot:// plugin."""
    ad = _startd_ad(pool, ["HasFileTransferPluginMethods"],
                    lambda a: "apppot" in str(a.get("HasFileTransferPluginMethods", "")).split(","))
    assert "apppot" in ad["HasFileTransferPluginMethods"].split(",")
    # the same through condor_status inside the pool
    out = pool.in_pool("condor_status", "-af", "HasFileTransferPluginMethods").stdout
    assert "apppot" in out


def test_startd_has_vm_universe(pool):
    """Needs the project's 60-apppot-vm.conf (VM_TYPE ...) and libvirtd running in the pool."""
    ad = _startd_ad(pool, ["HasVM", "VM_Type"], lambda a: a.get("HasVM") is True)
    assert ad["HasVM"] is True
    assert ad.get("VM_Type") == "kvm"


def test_startd_hands_the_image_path_to_its_plugins(pool):
    """50-apppot.conf puts APPPOT_IMAGE_PATH into STARTD_ENVIRONMENT: the startd (and so its starters and
    the plugin) carries the knob's value, and the plugin needs no HTCondor bindings to read it. In the
    chroot pool each of the two startds carries its own node's value (70-apppot-two-nodes.conf)."""
    root = os.path.realpath(pool.root)
    environs = {}  # local name ("" without one) -> the startd's environment
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (pathlib.Path(f"/proc/{pid}/comm").read_text().strip() == "condor_startd"
                    and os.path.realpath(f"/proc/{pid}/root") == root):  # fmt: skip
                argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                local = argv[argv.index("-local-name") + 1] if "-local-name" in argv else ""
                environs[local] = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
    if not environs:
        pytest.fail(f"no condor_startd running in {root}")
    if pool.mode == "chroot":
        assert sorted(environs) == [n.upper() for n in sorted(pool.nodes)]
    for local, environ in environs.items():
        ctx = ["-subsystem", "STARTD", "-local-name", local] if local else []
        knob = pool.in_pool("condor_config_val", *ctx, "APPPOT_IMAGE_PATH").stdout.strip()
        assert knob
        if local:
            assert knob == "/" + os.fspath(pool.nodes[local.lower()].image_dir.relative_to(pool.root))
        assert f"APPPOT_IMAGE_PATH={knob}".encode() in environ, (local, environ)


def test_installed_package_is_byte_compiled_for_the_nodes_python(pool):
    """The plugin runs as job users, who cannot write __pycache__ under PREFIX: without .pyc files made at
    install time it would compile its modules on every job (tens of ms)."""
    code = ("import importlib.util as u, pathlib as p, sys\n"
            "for f in p.Path(sys.argv[1]).rglob('*.py'):\n"
            "    if not p.Path(u.cache_from_source(f)).is_file(): print(f)")  # fmt: skip
    missing = pool.in_pool("python3", "-c", code, "/opt/apppot/lib/apppot/apppot").stdout.split()
    assert missing == []
