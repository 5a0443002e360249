"""AppPot jobs through a real HTCondor pool: the apppot:// plugin, `apppot run` as a vanilla job, the
VM universe with apppot's LIBVIRT_XML_SCRIPT, `apppot submit`, and the submit templates.

The pool (scripts/personal-pool) installs this checkout like an admin would (`make install`), with
the tiny image in the node's image directory and the VM boot kit (apppot.condor.vmboot).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from apppot import submit as apppot_submit

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from pool import suggested_plugin_line  # noqa: E402  (scripts/pool.py: shared with bench/condor.py)

REPO = pathlib.Path(__file__).resolve().parents[2]
TEMPLATES = sorted((REPO / "submit_templates").glob("*.sub"))
IMAGE = "tiny"
VM_TIMEOUT = 300  # a VM-universe job needs >= ~65 s however fast the guest (VM_STATUS_INTERVAL >= 30 s)

RUN_SH = """#!/bin/sh
# the job's command: prove argv, stdin-free output, files and the exit status all come back
echo "hello from $(uname -s) $(uname -r) as uid $(id -u)"
echo "argv: $# [$1] [$2]"
tr ' ' '\\n' < data.txt | sort -n > sorted.txt
echo "to stderr" >&2
exit "$3"
"""


@pytest.fixture(scope="module")
def apppot_pool(pool):
    """The pool, once its startd advertises the tiny image (the plugin's -classad answer) and the paths of
    THIS install: a job matched against the ad of an earlier one gets that one's $$(APPPOT_*) paths."""
    prefix = pool.env["APPPOT_PREFIX"]
    deadline = time.monotonic() + 60
    while True:
        ads = [a for a in pool.startd_ads(["SlotType", "HasAppPot", "AppPotImages", "HasAppPotVM", "APPPOT_LAUNCHER",
                                           "APPPOT_VM_POST"]) if a.get("SlotType") != "Dynamic"]  # fmt: skip
        # every node: a job may land on either
        if (len(ads) >= (len(pool.nodes) if pool.mode == "chroot" else 1)
                and all(a.get("HasAppPot") is True and IMAGE in str(a.get("AppPotImages", "")).split(",")
                        and a.get("APPPOT_LAUNCHER") == f"{prefix}/bin/apppot"
                        and a.get("APPPOT_VM_POST") == f"{prefix}/libexec/apppot/apppot_vm_post" for a in ads)):  # fmt: skip
            return pool
        if time.monotonic() > deadline:
            pytest.fail(f"the startd never advertised AppPotImages with {IMAGE!r} and apppot under {prefix}: "
                        f"{[dict(a) for a in ads]}; is {pool.image_dir}/{IMAGE}.img there? {pool.logs_hint()}")  # fmt: skip
        time.sleep(1)


def job_dir_with_script(pool, name: str) -> pathlib.Path:
    d = pool.job_dir(name)
    (d / "run.sh").write_text(RUN_SH)
    (d / "run.sh").chmod(0o755)
    (d / "data.txt").write_text("3 1 2\n")
    for p in d.iterdir():
        os.chown(p, pool.test_uid, pool.test_uid)
    return d


def history_ad(pool, cluster: int):
    for _ in range(40):
        hist = list(pool.schedd.history(f"ClusterId == {cluster}", [], 1))
        if hist:
            return hist[0]
        time.sleep(0.25)
    pytest.fail(f"job {cluster} is not in the history")


# --- the VM-universe job is slow (~80 s): submit it first, collect it in the last test -------------


def submit_template(pool, template: str, name: str) -> tuple[int, pathlib.Path]:
    """condor_submit of submit_templates/TEMPLATE inside the pool, running ./run.sh with awkward
    arguments and status 42 on the tiny image; returns (cluster, job dir)."""
    d = job_dir_with_script(pool, name)
    (d / template).write_bytes((REPO / "submit_templates" / template).read_bytes())
    proc = pool.in_pool("condor_submit", "-terse", "image=" + IMAGE, "inputs=run.sh,data.txt",
                        "cmd=./run.sh 'a b' 'it s' 42", template, cwd=d)  # fmt: skip
    return int(proc.stdout.strip().split(".")[0]), d


@pytest.fixture(scope="module")
def vm_job(apppot_pool):
    """A VM-universe job from submit_templates/apppot-vm.sub, submitted with condor_submit in the pool."""
    cluster, d = submit_template(apppot_pool, "apppot-vm.sub", "vm")
    return apppot_pool, cluster, d


@pytest.fixture(scope="module", autouse=True)
def _start_vm_job_early(request, apppot_pool):
    if any("vm_universe" in item.name for item in request.session.items):
        request.getfixturevalue("vm_job")


# --- vanilla universe -----------------------------------------------------------------------------


def test_vanilla_job_through_plugin(apppot_pool):
    """condor_submit of apppot-vanilla.sub: the starter runs our plugin for apppot://tiny?format=uml-cow,
    `apppot run` boots the COW layer under UML, and stdout, files and the status (42) come back."""
    pool = apppot_pool
    cluster, d = submit_template(pool, "apppot-vanilla.sub", "vanilla")
    pool.wait(cluster, timeout=120)
    ad = history_ad(pool, cluster)
    assert ad["ExitCode"] == 42, (d / f"apppot.{cluster}.0.err").read_text(errors="replace")
    assert ad["MATCH_APPPOT_LAUNCHER"] == pool.env["APPPOT_PREFIX"] + "/bin/apppot"  # not /usr/local
    out = (d / f"apppot.{cluster}.0.out").read_text()
    assert re.search(r"^hello from Linux \S+ as uid 2000$", out, re.MULTILINE), out
    assert "argv: 3 [a b] [it s]" in out
    assert "to stderr" in (d / f"apppot.{cluster}.0.err").read_text()
    assert (d / "sorted.txt").read_text().split() == ["1", "2", "3"]
    # the plugin staged the disk: the starter counts each plugin transfer under its result ad's
    # TransferProtocol ("APPPOTFilesCount"), the shadow adds LastRun/Total (lookups ignore case)
    stats = ad["TransferInputStats"]
    assert stats["ApppotFilesCountLastRun"] == 1, stats
    assert not (d / IMAGE).exists(), "the UML COW layer was transferred back (--discard-disk missing?)"


def test_node_install_is_under_a_non_default_prefix(apppot_pool):
    """The pool installs apppot under PREFIX=/opt/apppot, and the slot ad says where: every job here
    (templates, `apppot submit`) proves that jobs use the node's advertised paths, not make's default."""
    pool = apppot_pool
    prefix = pool.env["APPPOT_PREFIX"]
    assert prefix != "/usr/local"
    ad = next(a for a in pool.startd_ads(["SlotType", "APPPOT_LAUNCHER", "APPPOT_VM_POST"]) if a.get("SlotType") != "Dynamic")
    assert ad["APPPOT_LAUNCHER"] == f"{prefix}/bin/apppot"
    assert ad["APPPOT_VM_POST"] == f"{prefix}/libexec/apppot/apppot_vm_post"
    if pool.mode == "chroot":
        assert (pool.root / ad["APPPOT_LAUNCHER"].lstrip("/")).is_file()
        assert not (pool.root / "usr/local/bin/apppot").exists(), "a default-PREFIX install would hide hard-coded paths"


def test_apppot_submit_wait_reports_exit_status(apppot_pool):
    """`apppot submit --wait` (htcondor2) from the host: same job, status as its own exit status."""
    pool = apppot_pool
    d = job_dir_with_script(pool, "submit")
    env = {**os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "apppot", "submit", "--image", IMAGE, "-i", "run.sh", "-i", "data.txt",
         "--job-dir", os.fspath(d), "--wait", "--timeout", "120", "--", "./run.sh", "x y", "it's \"q\"", "42"],
        capture_output=True, text=True, env=env, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 42, proc.stdout + proc.stderr
    assert "exit code 42" in proc.stdout
    assert f"outputs in {d}" in proc.stdout
    outs = list(d.glob("apppot.*.0.out"))
    assert len(outs) == 1
    assert 'argv: 3 [x y] [it\'s "q"]' in outs[0].read_text()


def test_apppot_submit_shell_command(apppot_pool):
    """A `sh -c` command with options of its own, quoting intact, no input files at all."""
    pool = apppot_pool
    d = pool.job_dir("shell")
    proc = subprocess.run(
        [sys.executable, "-m", "apppot", "submit", "--image", IMAGE, "--job-dir", os.fspath(d), "--wait",
         "--timeout", "120", "--", "sh", "-c", 'echo "one  two" > f.txt; echo done; exit 7'],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert (d / "f.txt").read_text() == "one  two\n"


def test_bad_apppot_input_is_held_with_our_reason(apppot_pool):
    """Two apppot:// inputs, one naming an image the node lacks: held, HoldReason has our text."""
    pool = apppot_pool
    desc = apppot_submit.build_submit(image=IMAGE, command=["true"], universe="vanilla", memory_mib=128,
                                      inputs=["apppot://no-such-image?format=uml-cow"], changes=None,
                                      job_dir=pool.job_dir("held"))  # fmt: skip
    ad = pool.submit_and_wait(desc, timeout=60, hold_ok=True)
    try:
        assert ad["JobStatus"] == pool.htcondor.JobStatus.HELD, dict(ad)
        reason = ad["HoldReason"]
        assert "no image named 'no-such-image'" in reason, reason
        assert "images here: " in reason and IMAGE in reason, reason  # our hint travels with it
        assert ad["HoldReasonCode"] == 13  # transfer input files failure
    finally:
        pool._remove(f"ClusterId == {ad['ClusterId']}", "test done")


def test_changes_tarball_job(apppot_pool):
    """An apppot-snap changes tarball made by one job is merged into the guest by the next one."""
    pool = apppot_pool
    d = pool.job_dir("changes")
    # job 1: change the image (as the guest user: its home) and ship the difference
    make = subprocess.run(
        [sys.executable, "-m", "apppot", "submit", "--image", IMAGE, "--job-dir", os.fspath(d), "--wait",
         "--timeout", "120", "--", "sh", "-c",
         "echo from-the-changes > /home/user/greeting && apppot-snap changes -o changes.tar.gz"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    err = "".join(p.read_text(errors="replace") for p in d.glob("apppot.*.err"))
    assert make.returncode == 0, f"apppot-snap changes failed in the job (exit {make.returncode}): {err[-800:]}"
    assert (d / "changes.tar.gz").stat().st_size > 0
    # job 2: a fresh COW layer over the same base, with the tarball merged before the command
    use = subprocess.run(
        [sys.executable, "-m", "apppot", "submit", "--image", IMAGE, "--job-dir", os.fspath(d), "--wait",
         "--changes", "changes.tar.gz", "--timeout", "120", "--", "cat", "/home/user/greeting"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert use.returncode == 0, use.stdout + use.stderr
    cluster = re.search(r"submitted cluster (\d+)", use.stdout).group(1)
    assert (d / f"apppot.{cluster}.0.out").read_text() == "from-the-changes\n"


# --- templates ------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.name for t in TEMPLATES])
def test_template_dry_run(apppot_pool, template):
    """condor_submit -dry-run of every template: it parses, and it requires the AppPot slot attributes."""
    pool = apppot_pool
    d = pool.job_dir("dry")
    (d / template.name).write_bytes(template.read_bytes())
    proc = pool.in_pool("condor_submit", "-dry-run", "-", "image=" + IMAGE, "cmd=./x 'a b'", template.name, cwd=d)
    ad = proc.stdout
    assert re.search(r'^Requirements=.*HasAppPot =\?= true.*stringListMember\("tiny",AppPotImages\)', ad, re.MULTILINE), ad
    assert "apppot://tiny" in ad
    # the node's paths, whatever its PREFIX: the schedd fills them in from the matched slot ad
    assert ('Cmd="$$(APPPOT_LAUNCHER)"' if template.name == "apppot-vanilla.sub" else 'PostCmd="$$(APPPOT_VM_POST)"') in ad
    assert "ERROR" not in proc.stderr, proc.stderr
    missing = pool.in_pool("condor_submit", "-dry-run", "-", template.name, cwd=d, check=False)
    assert missing.returncode != 0 and "needs image=NAME" in missing.stderr + missing.stdout


def test_the_trimmed_plugin_list(apppot_pool):
    """50-apppot.conf's suggested FILETRANSFER_PLUGINS for a site without Box, Google Drive or OneDrive
    users (docs/condor.md, "Plugin probes"), as HTCondor reads it on this node: every plugin it names
    exists, apppot's is the installed one, the Python cloud-drive plugins are gone, and an apppot job
    runs through it."""
    pool = apppot_pool
    config_d = pool.root / "etc/condor/config.d"
    drop_in = config_d / "99-test-trimmed-plugins.conf"
    drop_in.write_text(suggested_plugin_line(config_d) + "\n")
    try:
        plugins = [p.strip() for p in pool.in_pool("condor_config_val", "FILETRANSFER_PLUGINS").stdout.split(",")]
        assert all((pool.root / p.lstrip("/")).is_file() for p in plugins), plugins
        assert pool.env["APPPOT_PREFIX"] + "/libexec/apppot/apppot_plugin" in plugins
        assert [p for p in plugins if "curl_plugin" in p], plugins  # http(s):// stays
        assert not [p for p in plugins if p.endswith(".py")], plugins
        cluster, d = submit_template(pool, "apppot-vanilla.sub", "trimmed")
        pool.wait(cluster, timeout=120)
        assert history_ad(pool, cluster)["ExitCode"] == 42, (d / f"apppot.{cluster}.0.err").read_text(errors="replace")
    finally:
        drop_in.unlink()


# --- VM universe (last: its job was submitted at the start of the module) -------------------------


def test_vm_universe_job(vm_job):
    """The VM universe boots the plugin's qcow2 overlay with apppot's domain XML (direct kernel boot,
    scratch dir over 9p); outputs, stdout and the guest's status reach the submitter as far as
    HTCondor allows: files + apppot.status + AppPotExitCode; ExitCode itself stays 0."""
    pool, cluster, d = vm_job
    pool.wait(cluster, timeout=VM_TIMEOUT)
    ad = history_ad(pool, cluster)
    assert ad["JobUniverse"] == 13  # vm
    assert ad.get("AppPotExitCode") == 42, (dict(ad), sorted(p.name for p in d.iterdir()))
    assert ad["ExitCode"] == 0  # the VM universe cannot carry the guest's status here
    assert ad["MATCH_APPPOT_VM_POST"] == pool.env["APPPOT_PREFIX"] + "/libexec/apppot/apppot_vm_post"
    assert (d / "apppot.status").read_text().splitlines()[0] == "42"
    out = (d / "apppot.out").read_text()
    assert re.search(r"^hello from Linux \S+ as uid 2000$", out, re.MULTILINE), out
    assert "argv: 3 [a b] [it s]" in out
    assert "to stderr" in (d / "apppot.err").read_text()
    assert (d / "sorted.txt").read_text().split() == ["1", "2", "3"]
    assert not (d / IMAGE).exists(), "the qcow2 overlay came back (apppot_vm_post did not remove it)"
