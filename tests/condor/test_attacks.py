"""Attack jobs through the real VM universe: every way a job user could make the root-run parts of
apppot (condor_vm-gahp's LIBVIRT_XML_SCRIPT, the qemu it describes) reach outside the sandbox,
submitted as the pool's test user (docs/security.md lists them with these tests).

All attack jobs are submitted at once (a VM job needs >= ~65 s whatever it does), then each is
checked: a canary file and directory outside the sandbox keep owner, mode and content, the node's
base image keeps its sha256, no root-owned, setuid or device file appears in the sandbox (a
+PostCmd wrapper lists it right after the VM stopped), the job is held with a reason naming the
problem (or runs normally where the attack is simply ignored), and afterwards a normal VM job
still runs: the node's VM universe stayed up.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import subprocess
import time

import pytest

from apppot import debian
from apppot import submit as apppot_submit

IMAGE = "tiny"
VM_TIMEOUT = 420
CANARY_DIR = "/var/lib/apppot-canary"  # in the pool's root: root-owned, like any node file
CANARY = f"{CANARY_DIR}/secret"

# Runs in the guest as root instead of apppot's initramfs (the job may name its own initrd): loads
# the 9p modules and, as guest root, tries to leave root-owned, setuid and device files in the sandbox.
EVIL_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
PATH=/bin; export PATH
/bin/busybox --install -s /bin
while read -r m; do insmod "/modules/$m.ko"; done </modules.list
mkdir -p /job && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 job /job
cp /bin/busybox /job/suid; chown 0:0 /job/suid; chmod 4755 /job/suid
mknod /job/blockdev b 8 0; mkdir /job/rootdir; chown 0:0 /job/rootdir
ls -ln /job >/job/guest-view.txt
mkdir -p /job/.apppot; echo 7 >/job/.apppot/status
sync; echo o >/proc/sysrq-trigger; sleep 60
"""

# +PostCmd: list the sandbox (uid, mode, type, name) before and after apppot_vm_post.
POST_SH = """#!/bin/sh
find . -printf '%U %m %y %p\\n' >sandbox-before-post.lst
{vm_post} "$@"
find . -printf '%U %m %y %p\\n' >sandbox-after-post.lst
find . -maxdepth 1 -type l -delete  # planted symlinks: HTCondor would try to transfer their targets back
"""


ATTACKS = ["host file as vm_disk", "node base image writable", "planted symlinks in .apppot", ".apppot is a symlink",
           "guest root in the share", "qcow2 backed by a host file", "symlinked kernel", "VM_WORKING_DIR in the ad",
           "unbalanced quote", "results disk, ../ names, planted outputs"]  # fmt: skip


def fingerprint(p: pathlib.Path) -> tuple:
    st = p.lstat()
    content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else tuple(sorted(os.listdir(p)))
    return st.st_uid, st.st_gid, st.st_mode, content


def write(d: pathlib.Path, name: str, data: str | bytes, uid: int, mode: int = 0o644) -> None:
    p = d / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    p.chmod(mode)
    os.chown(p, uid, uid)


def listing(d: pathlib.Path, name: str) -> list[tuple[int, str, str, str]]:
    """(uid, octal mode, type, path) per sandbox entry, from the PostCmd wrapper."""
    rows = []
    for line in (d / name).read_text().splitlines():
        uid, mode, kind, path = line.split(" ", 3)
        rows.append((int(uid), mode, kind, path))
    return rows


@pytest.fixture(scope="module")
def node(pool):
    """The canaries, the base image's digest and the path of apppot_vm_post in the pool."""
    canary_dir = pool.root / CANARY_DIR.lstrip("/")
    canary_dir.mkdir(mode=0o755, exist_ok=True)
    (canary_dir / "secret").write_text("the node's secret\n")
    (canary_dir / "secret").chmod(0o600)
    home_canary = pool.root / "home" / pool.test_user / "canary"  # the job user's own file, outside the sandbox
    home_canary.write_text("mine\n")
    os.chown(home_canary, pool.test_uid, pool.test_uid)
    posts = [*pool.root.glob("*/libexec/apppot/apppot_vm_post"), *pool.root.glob("*/*/libexec/apppot/apppot_vm_post")]
    assert posts, "apppot_vm_post is not installed in the pool"
    base = pool.image_dir / f"{IMAGE}.img"
    return {"canary_dir": canary_dir, "home_canary": home_canary, "base": base,
            "vm_post": "/" + os.fspath(posts[0].relative_to(pool.root)),
            "before": (fingerprint(canary_dir), fingerprint(canary_dir / "secret"), fingerprint(home_canary),
                       hashlib.sha256(base.read_bytes()).hexdigest())}  # fmt: skip


def evil_initrd(pool) -> bytes:
    """The node's own initramfs with /init replaced (a later cpio member wins when the kernel unpacks)."""
    kit = pool.root / "var/lib/apppot/vm/initrd.img"
    return kit.read_bytes() + gzip.compress(debian.cpio_newc([("init", 0o100755, EVIL_INIT.encode())]))


def attack_jobs(pool, node) -> dict[str, dict]:
    """name -> {"setup": files for the job dir, "submit": overrides, "expect": held reason or exit code}."""
    plant = "#!/bin/sh\n{}\n"
    return {
        "host file as vm_disk": {
            "files": {"secret": b""}, "inputs": ["secret"],
            "submit": {"vm_disk": f"{CANARY}:vda:w:raw"},
            "held": "must be the name of a file in the job's sandbox"},
        "node base image writable": {
            "files": {f"{IMAGE}.img": b""}, "inputs": [f"{IMAGE}.img"],
            "submit": {"vm_disk": f"/var/lib/apppot/images/{IMAGE}.img:vda:w:raw"},
            "held": "must be the name of a file in the job's sandbox"},
        "planted symlinks in .apppot": {
            "files": {"plant.sh": plant.format(f"mkdir -p .apppot && ln -sf {CANARY} .apppot/params "
                                               f"&& ln -sf {CANARY} .apppot/argv && ln -sf {CANARY} .apppot/status")},
            "inputs": ["plant.sh"], "submit": {"+PreCmd": '"plant.sh"'}, "exit": 42},
        ".apppot is a symlink": {
            "files": {"plant.sh": plant.format(f"ln -s {CANARY_DIR} .apppot")},
            "inputs": ["plant.sh"], "submit": {"+PreCmd": '"plant.sh"'}, "held": "is a symlink or not a directory"},
        "guest root in the share": {
            "files": {"evil.img": evil_initrd(pool)}, "inputs": ["evil.img"],
            "submit": {"+AppPotInitrd": '"evil.img"'}, "exit": 7},
        "qcow2 backed by a host file": {
            "qcow2": ("evil.qcow2", CANARY), "inputs": ["evil.qcow2"],
            "submit": {"vm_disk": "evil.qcow2:vda:w:qcow2"}, "held": "outside this node's image directories"},
        "symlinked kernel": {
            "files": {"plant.sh": plant.format(f"ln -s {CANARY} k")},
            "inputs": ["plant.sh"], "submit": {"+PreCmd": '"plant.sh"', "+AppPotKernel": '"k"'}, "held": "is a symlink"},
        # the vm-gahp checks vm_disk against VM_WORKING_DIR; the script must use its own cwd instead:
        # the (empty) sandbox file is booted, not the node's base, which stays unchanged
        "VM_WORKING_DIR in the ad": {
            "files": {f"{IMAGE}.img": b""}, "inputs": [f"{IMAGE}.img"],
            "submit": {"+VM_WORKING_DIR": '"/var/lib/apppot/images"', "vm_disk": f"{IMAGE}.img:vda:w:raw"},
            "exit": 255},
        "unbalanced quote": {"submit": {"+AppPotCommand": "\"sh -c 'echo\""}, "held": "cannot be split into words"},
        "results disk, ../ names, planted outputs": {
            "files": {"results.img": b"\0" * 65536,
                      "plant.sh": plant.format(f"ln -s {node['home_canary']} apppot.status && "
                                               f"ln -s {node['home_canary']} apppot.out")},
            "inputs": ["results.img", "plant.sh"],
            "submit": {"vm_disk": f"{IMAGE}:vda:w:qcow2,results.img:vdb:w:raw", "+PreCmd": '"plant.sh"'}, "exit": 42},
    }  # fmt: skip


def submit_attack(pool, node, name: str, attack: dict) -> tuple[int, pathlib.Path]:
    d = pool.job_dir("attack")
    uid = pool.test_uid
    for fname, data in attack.get("files", {}).items():
        write(d, fname, data, uid, 0o755 if fname.endswith(".sh") else 0o644)
    if "qcow2" in attack:
        fname, backing = attack["qcow2"]
        subprocess.run(["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", backing, d / fname, "1M"],
                       check=True)  # fmt: skip
        os.chown(d / fname, uid, uid)
    write(d, "post.sh", POST_SH.format(vm_post=node["vm_post"]), uid, 0o755)
    desc = apppot_submit.build_submit(image=IMAGE, command=["sh", "-c", "echo ran; exit 42"], universe="vm",
                                      memory_mib=128, inputs=[*attack.get("inputs", []), "post.sh"], changes=None,
                                      job_dir=d)  # fmt: skip
    for key, value in {"+PostCmd": '"post.sh"', "batch_name": f'"attack: {name}"', **attack["submit"]}.items():
        desc["MY." + key[1:] if key.startswith("+") else key] = value  # MY.X replaces the template's +X
    return pool.submit(desc).cluster(), d


def final_ad(pool, cluster: int, timeout: float):
    """Wait until the job is held or has left the queue; return its last ad."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ads = pool.schedd.query(constraint=f"ClusterId == {cluster}")
        if ads and ads[0].get("JobStatus") == pool.htcondor.JobStatus.HELD:
            return ads[0]
        if not ads:
            hist = list(pool.schedd.history(f"ClusterId == {cluster}", [], 1))
            if hist:
                return hist[0]
        time.sleep(1)
    pool._remove(f"ClusterId == {cluster}", "timeout (test failed)")
    pytest.fail(f"attack job {cluster} neither held nor done after {timeout} s; {pool.logs_hint()}")


@pytest.fixture(scope="module")
def attacks(pool, node):
    specs = attack_jobs(pool, node)
    assert list(specs) == ATTACKS
    jobs = {name: submit_attack(pool, node, name, a) for name, a in specs.items()}
    results = {}
    try:
        for name, (cluster, d) in jobs.items():
            results[name] = (final_ad(pool, cluster, VM_TIMEOUT), d)
    finally:
        pool._remove(" || ".join(f"ClusterId == {c}" for c, _ in jobs.values()), "attack test done")
    return results


@pytest.mark.parametrize("name", ATTACKS)
def test_attack(pool, node, attacks, name):
    ad, d = attacks[name]
    expect = attack_jobs(pool, node)[name]
    if "held" in expect:
        assert ad["JobStatus"] == pool.htcondor.JobStatus.HELD, (name, dict(ad))
        assert expect["held"] in ad["HoldReason"], ad["HoldReason"]
        assert ad.get("AppPotExitCode") == 125
    else:
        assert ad["JobStatus"] == pool.htcondor.JobStatus.COMPLETED, (name, ad.get("HoldReason"), dict(ad))
        assert ad.get("AppPotExitCode") == expect["exit"], (name, ad.get("AppPotExitMessage"))
    # what the sandbox held right after the VM stopped: nothing root-owned, setuid or a device
    rows = listing(d, "sandbox-before-post.lst")
    assert rows, "the PostCmd wrapper did not run"
    for uid, mode, kind, path in rows:
        assert uid != 0, f"{path} in the sandbox belongs to root"  # (HTCondor's own .job.ad etc. are condor's)
        assert not int(mode, 8) & 0o6000, f"{path} is setuid/setgid ({mode})"
        assert kind in "fdl", f"{path} is of type {kind}"
        if path == f"./{IMAGE}":
            assert mode == "600", f"the disk layer is readable by others ({mode})"
    after = {p for _, _, _, p in listing(d, "sandbox-after-post.lst")}
    assert f"./{IMAGE}" not in after  # the plugin's layer is deleted, only that
    if name == "results disk, ../ names, planted outputs":
        assert "./results.img" in after
        assert (d / "apppot.out").read_text() == "ran\n"
    if name == "guest root in the share":
        assert "suid" in (d / "guest-view.txt").read_text()  # the guest did try


def test_node_is_intact_and_still_runs_vm_jobs(pool, node, attacks):
    """After all attacks: the canaries and the base are untouched, and a normal VM job runs."""
    base_sha = hashlib.sha256(node["base"].read_bytes()).hexdigest()
    after = (fingerprint(node["canary_dir"]), fingerprint(node["canary_dir"] / "secret"),
             fingerprint(node["home_canary"]), base_sha)  # fmt: skip
    assert after == node["before"]
    d = pool.job_dir("after-attacks")
    desc = apppot_submit.build_submit(image=IMAGE, command=["sh", "-c", "echo fine; exit 5"], universe="vm",
                                      memory_mib=128, inputs=[], changes=None, job_dir=d)  # fmt: skip
    ad = pool.submit_and_wait(desc, timeout=VM_TIMEOUT)
    assert ad.get("AppPotExitCode") == 5
    assert (d / "apppot.out").read_text() == "fine\n"
    slots = pool.startd_ads(["HasVM", "OfflineUniverses"])
    assert all(s.get("HasVM") is True for s in slots), [dict(s) for s in slots]
