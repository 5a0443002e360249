"""Images on demand through the pool's two execute points (scripts/personal-pool: startds nodea and
nodeb, each with its own image directory and image cache).

Jobs are submitted from submit_templates/apppot-vanilla.sub, as users would; a test that must pin a
job to one node adds `PoolNode =?= "nodeX"` to the template's requirements.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import time
import urllib.parse

import pytest

from apppot import fetchd
from tests.condor.conftest import node_of

pytestmark = pytest.mark.condor

REPO = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "submit_templates" / "apppot-vanilla.sub"
JOB_TIMEOUT = 240


@pytest.fixture(scope="module")
def two_nodes(pool):
    if pool.mode != "chroot":
        # not a skip: these must-shows would silently not run
        pytest.fail("the two-execute-point tests need the chroot pool (the system-mode pool has one execute "
                    "point): run them with APPPOT_POOL_MODE=chroot")  # fmt: skip
    for node in pool.nodes:
        pool.slot_ad(node, ["HasAppPot", "AppPotImages"], lambda a: a.get("HasAppPot") is True, timeout=60)
    return pool


def _template_text(d: pathlib.Path, variables: dict[str, str], *, count: int = 1, node: str | None = None) -> str:
    text = TEMPLATE.read_text().rstrip()
    assert text.endswith("\nqueue")
    lines = [f"{k} = {v}" for k, v in variables.items()]
    extra = [f'requirements = $(requirements) && PoolNode =?= "{node}"'] if node else []
    return "\n".join([f"initialdir = {d}", *lines, text[: -len("queue")], *extra, f"queue {count}", ""])


def submit_from_template(pool, d: pathlib.Path, variables: dict[str, str], *, count: int = 1, node: str | None = None) -> int:
    """The template with VARIABLES set (as `condor_submit var=value` would), COUNT jobs, optionally
    pinned to NODE; returns the cluster id."""
    return pool.submit(pool.htcondor.Submit(_template_text(d, variables, count=count, node=node))).cluster()


def history(pool, cluster: int, count: int) -> list:
    deadline = time.monotonic() + 30
    while len(ads := list(pool.schedd.history(f"ClusterId == {cluster}", [], count))) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"job {cluster}: {len(ads)} of {count} jobs in the history")
        time.sleep(0.25)
    return sorted(ads, key=lambda ad: ad["ProcId"])


def link_image(src: pathlib.Path, dst: pathlib.Path) -> None:
    os.link(src, dst)  # the same file: no copy
    dst.chmod(0o644)


def test_job_for_an_image_only_node_a_holds_runs_on_node_a(two_nodes):
    """An image in node A's image directory only: node A's slot ad lists it, node B's does not, and
    every job for it runs on node A (on node B the plugin would not find it and the job would be held)."""
    pool = two_nodes
    name = f"onlya{os.getpid()}"
    image = pool.nodes["nodea"].image_dir / f"{name}.img"
    link_image(pool.nodes["nodea"].image_dir / "tiny.img", image)
    try:
        pool.slot_ad("nodea", ["AppPotImages"], lambda a: name in a.get("AppPotImages", "").split(","), timeout=30)
        assert name not in pool.slot_ad("nodeb", ["AppPotImages"])["AppPotImages"].split(",")
        d = pool.job_dir("onlya")
        cluster = submit_from_template(pool, d, {"image": name, "cmd": "sh -c 'echo ran; exit 42'"}, count=4)
        pool.wait(cluster, timeout=JOB_TIMEOUT)
        ads = history(pool, cluster, 4)
        assert [node_of(ad) for ad in ads] == ["nodea"] * 4, [ad.get("LastRemoteHost") for ad in ads]
        assert [ad["ExitCode"] for ad in ads] == [42] * 4
        assert all((d / f"apppot.{cluster}.{p}.out").read_text() == "ran\n" for p in range(4))
    finally:
        image.unlink()


def test_template_url_form(two_nodes):
    """condor_submit -dry-run of the template with image_url: the plugin's pinned URL form, any node
    with an image cache, rank for a node that holds the digest; no digest, no job."""
    pool = two_nodes
    d = pool.job_dir("dry-url")
    (d / TEMPLATE.name).write_bytes(TEMPLATE.read_bytes())
    hexd = "ab" * 32
    url = "http%3A%2F%2F127.0.0.1%3A8080%2Fx.img"
    ad = pool.in_pool("condor_submit", "-dry-run", "-", "image=x", f"image_sha256={hexd}", f"image_url={url}",
                      "cmd=true", TEMPLATE.name, cwd=d).stdout  # fmt: skip
    assert f'TransferInput="apppot://x?format=uml-cow&sha256={hexd}&from={url}"' in ad, ad
    assert f'Rank=ifThenElse(stringListMember("sha256:{hexd}",AppPotCachedImages) =?= true,1,0)' in ad, ad
    assert "Requirements=(AppPotCachedImages =!= undefined)" in ad, ad
    missing = pool.in_pool("condor_submit", "-dry-run", "-", "image=x", f"image_url={url}", TEMPLATE.name,
                           cwd=d, check=False)  # fmt: skip
    assert missing.returncode != 0 and "image_url needs image_sha256" in missing.stdout + missing.stderr


# --- images by URL (the fetch service of each node, apppot/fetchd.py) ---------------------------------


def url_image(pool, server, tag: str, extra_bytes: int) -> tuple[str, str, pathlib.Path]:
    """A bootable image of its own digest in the server's docroot: the tiny image plus random bytes.
    Returns (name, sha256, path)."""
    name = f"{tag}{os.getpid()}"
    path = server.www / f"{name}.img"
    data = (pool.nodes["nodea"].image_dir / "tiny.img").read_bytes() + os.urandom(extra_bytes)
    path.write_bytes(data)
    path.chmod(0o644)
    return name, hashlib.sha256(data).hexdigest(), path


def url_vars(server, name: str, digest: str, *, slow: bool = False, cmd: str = "sh -c 'echo ran; exit 42'") -> dict:
    url = urllib.parse.quote(server.url(f"{name}.img", slow=slow), safe="")
    return {"image": name, "image_sha256": digest, "image_url": url, "cmd": cmd}


def cached(pool, node: str, digest: str) -> pathlib.Path:
    return pool.nodes[node].cache_dir / "sha256" / digest


def downloads(server, name: str) -> list[str]:
    return server.gets(f"{name}.img")


def no_claims_left(pool, timeout: float = 60) -> None:
    """Wait until no dynamic slot (a claim) is left on either node: the schedd may run a new job on a
    claim it still holds from an earlier job without asking the negotiator, so rank would not decide."""
    deadline = time.monotonic() + timeout
    while [a for a in pool.startd_ads(["SlotType"]) if a.get("SlotType") == "Dynamic"]:
        assert time.monotonic() < deadline, f"claims still held after {timeout}s; {pool.logs_hint()}"
        time.sleep(0.5)


def test_url_job_runs_on_either_node_which_caches_it_and_wins_the_next_job(two_nodes, http_server):
    """A job pinned to a URL image neither node holds runs (on either node), that node fetches it once
    into its cache (verified, read-only, the slot ad lists it), and the next job for the same digest
    prefers that node (the template's rank) and downloads nothing."""
    pool, server = two_nodes, http_server
    name, digest, _ = url_image(pool, server, "url", 1 << 20)
    assert not any(cached(pool, n, digest).exists() for n in pool.nodes)
    d = pool.job_dir("url")
    cluster = submit_from_template(pool, d, url_vars(server, name, digest))
    pool.wait(cluster, timeout=JOB_TIMEOUT)
    (ad,) = history(pool, cluster, 1)
    assert ad["ExitCode"] == 42 and (d / f"apppot.{cluster}.0.out").read_text() == "ran\n"
    node = node_of(ad)
    other = next(n for n in pool.nodes if n != node)
    entry = cached(pool, node, digest)
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == digest
    assert entry.stat().st_mode & 0o777 == 0o444
    assert not cached(pool, other, digest).exists()
    assert len(downloads(server, name)) == 1, downloads(server, name)
    pool.slot_ad(node, ["AppPotCachedImages"], lambda a: f"sha256:{digest}" in a.get("AppPotCachedImages", "").split(","),
                 timeout=30)  # fmt: skip
    assert f"sha256:{digest}" not in pool.slot_ad(other, ["AppPotCachedImages"])["AppPotCachedImages"]
    # the next jobs for that digest: rank sends them where it is cached (each run alone, so both
    # nodes have free slots when it is matched)
    for _ in range(2):
        no_claims_left(pool)
        again = submit_from_template(pool, d, url_vars(server, name, digest))
        pool.wait(again, timeout=JOB_TIMEOUT)
        (ad2,) = history(pool, again, 1)
        assert ad2["ExitCode"] == 42 and node_of(ad2) == node, ad2.get("LastRemoteHost")
    assert len(downloads(server, name)) == 1, downloads(server, name)


def test_eight_jobs_at_once_for_one_url_on_one_node_download_it_once(two_nodes, http_server):
    """8 jobs submitted together for one URL image, all on node B: the image is served at 2 MB/s so
    their transfers overlap; one GET in nginx's access log, all 8 jobs succeed."""
    pool, server = two_nodes, http_server
    name, digest, _ = url_image(pool, server, "eight", 8 << 20)
    d = pool.job_dir("eight")
    cluster = submit_from_template(pool, d, url_vars(server, name, digest, slow=True), count=8, node="nodeb")
    pool.wait(cluster, timeout=JOB_TIMEOUT)
    ads = history(pool, cluster, 8)
    assert [ad["ExitCode"] for ad in ads] == [42] * 8
    assert {node_of(ad) for ad in ads} == {"nodeb"}
    gets = downloads(server, name)
    assert len(gets) == 1 and '" 200 ' in gets[0], gets
    assert hashlib.sha256(cached(pool, "nodeb", digest).read_bytes()).hexdigest() == digest
    assert not cached(pool, "nodea", digest).exists()


def test_wrong_digest_holds_the_job_naming_both_and_caches_nothing(two_nodes, http_server):
    """The URL serves other bytes than the digest says: the job is held with a reason naming the
    expected and the actual digest; neither enters any cache, no partial download is left."""
    pool, server = two_nodes, http_server
    name, actual, _ = url_image(pool, server, "wrong", 1 << 20)
    expected = hashlib.sha256(b"not this image").hexdigest()
    d = pool.job_dir("wrong")
    ad = pool.submit_and_wait(
        pool.htcondor.Submit(_template_text(d, url_vars(server, name, expected), node="nodea")),
        timeout=JOB_TIMEOUT, hold_ok=True)  # fmt: skip
    try:
        assert ad["JobStatus"] == pool.htcondor.JobStatus.HELD, dict(ad)
        reason = ad["HoldReason"]
        assert expected in reason and actual in reason, reason
    finally:
        pool._remove(f"ClusterId == {ad['ClusterId']}", "test done")
    for node in pool.nodes.values():
        assert not (node.cache_dir / "sha256" / expected).exists()
        assert not (node.cache_dir / "sha256" / actual).exists()
        assert not list((node.cache_dir / "partial").glob(f"*{expected}*"))


# --- the service killed, hostile job users, the budget (issue 13's "must show", through the pool) ------


def fetchd_pid(pool, node: str) -> int:
    """The pid of NODE's fetch service: the peer of a connection to its socket (SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.fspath(pool.nodes[node].cache_dir / "fetchd.sock"))
        pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        s.sendall(b'{"op": "list"}\n')  # a request, so the service does not log a silent client
        s.recv(65536)
    return pid


def wait_for(what: str, predicate, timeout: float = 120, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(every)
    return result


def test_a_download_killed_midway_resumes_and_the_job_succeeds(two_nodes, http_server):
    """A URL job's image is served slowly; once the chosen node's partial download has grown, that node's
    apppot_fetchd is SIGKILLed. condor_master starts it again, the job's plugin asks again, the new service
    resumes the download with an HTTP Range request (only the rest comes over the wire), and the job
    succeeds with a verified entry."""
    pool, server = two_nodes, http_server
    name, digest, path = url_image(pool, server, "resume", 16 << 20)  # 48 MiB at 2 MB/s: ~24 s
    total = path.stat().st_size
    d = pool.job_dir("resume")
    cluster = submit_from_template(pool, d, url_vars(server, name, digest, slow=True))
    parts = {n: node.cache_dir / "partial" / f"{digest}.part" for n, node in pool.nodes.items()}
    (node,) = wait_for("a partial download of 4 MiB on a node", lambda: [
        n for n, p in parts.items() if p.exists() and p.stat().st_size >= 4 << 20])  # fmt: skip
    pid = fetchd_pid(pool, node)
    os.kill(pid, signal.SIGKILL)
    pool.wait(cluster, timeout=JOB_TIMEOUT)
    (ad,) = history(pool, cluster, 1)
    assert ad["ExitCode"] == 42 and node_of(ad) == node, (ad.get("ExitCode"), ad.get("LastRemoteHost"))
    assert (d / f"apppot.{cluster}.0.out").read_text() == "ran\n"
    assert fetchd_pid(pool, node) != pid  # condor_master started a new service
    entry = cached(pool, node, digest)
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == digest
    assert not parts[node].exists()
    first, second = downloads(server, name)
    assert '" 200 ' in first and 'range="-"' in first, first
    start = int(second.split('range="bytes=')[1].split("-")[0])
    assert 4 << 20 <= start < total, second
    assert second.split()[4:6] == ["206", str(total - start)], second  # only the rest came over the wire


# Runs on the node as the job's user: every way it has to change what a later job boots from the node's
# image cache, tried over and over while the genuine image downloads (a race), then once more against the
# finished entry. Prints what each attempt got, as JSON.
ATTACK = r"""#!/usr/bin/python3
import json, os, socket, sys, time
cache, digest, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
entry = os.path.join(cache, "sha256", digest)
sock = os.path.join(cache, "fetchd.sock")
with open("fake.img", "wb") as f:
    f.write(b"not the image you pinned\n" * 4096)
fake = os.path.abspath("fake.img")

def write(path, mode="xb"):
    with open(path, mode) as f:
        f.write(b"planted")

def own_socket():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(sock)
    finally:
        s.close()

ATTEMPTS = {
    "write into the cache dir": lambda: write(os.path.join(cache, "planted")),
    "plant sha256/HEX": lambda: write(entry),
    "symlink sha256/HEX to a fake": lambda: os.symlink(fake, entry),
    "hard-link a fake as sha256/HEX": lambda: os.link(fake, entry),
    "rename a fake onto sha256/HEX": lambda: os.rename(fake, entry),
    "plant partial/HEX.part": lambda: write(os.path.join(cache, "partial", digest + ".part"), "ab"),
    "write meta/HEX.json": lambda: write(os.path.join(cache, "meta", digest + ".json"), "wb"),
    "rename sha256/ away": lambda: os.rename(os.path.join(cache, "sha256"), os.path.join(cache, "old")),
    "remove the socket": lambda: os.unlink(sock),
    "bind a socket of its own": own_socket,
    "rename a file over the socket": lambda: os.rename(fake, sock),
    "overwrite the entry": lambda: write(entry, "r+b"),
    "chmod the entry": lambda: os.chmod(entry, 0o666),
    "remove the entry": lambda: os.unlink(entry),
}
results = {k: {"succeeded": 0, "errors": []} for k in ATTEMPTS}

def round_():
    for what, attempt in ATTEMPTS.items():
        try:
            attempt()
            results[what]["succeeded"] += 1
        except OSError as e:
            if e.strerror not in results[what]["errors"]:
                results[what]["errors"].append(e.strerror)

deadline, rounds = time.monotonic() + seconds, 0
while not os.path.exists(entry) and time.monotonic() < deadline:
    round_()
    rounds += 1
    time.sleep(0.02)
seen = os.path.exists(entry)
round_()
print(json.dumps({"uid": os.getuid(), "rounds": rounds + 1, "entry_seen": seen, "results": results}))
"""


def test_a_job_user_cannot_change_what_another_job_boots(two_nodes, http_server):
    """A job on node B, as the pool's job user, tries to write into the node's image cache, plant
    sha256/HEX for a digest a later job asks for (a file, a symlink, a hard link, a rename), plant a
    partial download, swap the fetch service's socket, and, once the genuine entry is there, overwrite,
    chmod or remove it -- racing the genuine download the whole time. Every attempt fails; the URL jobs
    for that digest boot the genuine image (its sha256 checked on the node), downloaded once."""
    pool, server = two_nodes, http_server
    name, digest, _ = url_image(pool, server, "victim", 4 << 20)  # 36 MiB at 2 MB/s: ~18 s of racing
    cache = pool.nodes["nodeb"].cache_dir
    cache_in_pool = "/" + os.fspath(cache.relative_to(pool.root))
    d = pool.job_dir("attack")
    (d / "attack.py").write_text(ATTACK)
    (d / "attack.py").chmod(0o755)
    os.chown(d / "attack.py", pool.test_uid, pool.test_uid)
    attacker = pool.submit({
        "initialdir": os.fspath(d), "universe": "vanilla", "executable": os.fspath(d / "attack.py"),
        "arguments": f"{cache_in_pool} {digest} 150", "should_transfer_files": "YES",
        "output": "attack.out", "error": "attack.err", "log": "attack.log", "request_memory": "64",
        "request_disk": "64M", "requirements": 'PoolNode =?= "nodeb"',
    }).cluster()  # fmt: skip
    wait_for("the attack job running", lambda: pool.schedd.query(
        f"ClusterId == {attacker} && JobStatus == 2", ["ClusterId"]), timeout=60, every=0.25)  # fmt: skip
    time.sleep(1)  # let it start its first rounds
    victim = submit_from_template(pool, d, url_vars(server, name, digest, slow=True), node="nodeb")
    pool.wait(victim, timeout=JOB_TIMEOUT)
    pool.wait(attacker, timeout=JOB_TIMEOUT)
    report = json.loads((d / "attack.out").read_text())
    service_uid = cache.stat().st_uid
    assert report["uid"] not in (0, service_uid), report["uid"]
    assert report["entry_seen"] and report["rounds"] >= 2, report
    succeeded = {k: v for k, v in report["results"].items() if v["succeeded"] or not v["errors"]}
    assert not succeeded, succeeded
    (ad,) = history(pool, victim, 1)
    assert ad["ExitCode"] == 42 and (d / f"apppot.{victim}.0.out").read_text() == "ran\n"
    # a later job for the digest boots what the cache holds after every attack: the genuine image
    later = submit_from_template(pool, d, url_vars(server, name, digest), node="nodeb")
    pool.wait(later, timeout=JOB_TIMEOUT)
    (ad,) = history(pool, later, 1)
    assert ad["ExitCode"] == 42 and (d / f"apppot.{later}.0.out").read_text() == "ran\n"
    entry = cached(pool, "nodeb", digest)
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == digest
    assert not entry.is_symlink() and entry.stat().st_nlink == 1
    assert len(downloads(server, name)) == 1, downloads(server, name)
    for p in [cache, *cache.rglob("*")]:  # nothing in the cache is the job user's
        assert p.lstat().st_uid == service_uid, (p, p.lstat().st_uid)
    assert not (cache / "planted").exists() and not (cache / "partial" / f"{digest}.part").exists()


def in_pool_as_root(pool, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """CMD in the pool's root, as its root (an admin's condor_reconfig, condor_restart)."""
    return subprocess.run(["chroot", os.fspath(pool.root), *cmd], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"})  # fmt: skip


def restart_fetchd(pool, node: str) -> None:
    """What an admin does after changing a node's fetch service environment: condor_reconfig (the master
    re-reads APPPOT_FETCHD_<NODE>_ENVIRONMENT; it only SIGHUPs a daemon that is not DaemonCore, which keeps
    its environment) and a restart of that one daemon: condor_off/on -subsystem (condor_restart -daemon
    finds no address for a daemon that is not DaemonCore)."""
    old = fetchd_pid(pool, node)
    name = f"APPPOT_FETCHD_{node.upper()}"
    for cmd in (["condor_reconfig"], ["condor_off", "-subsystem", name], ["condor_on", "-subsystem", name]):
        proc = in_pool_as_root(pool, *cmd)
        assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)

    def restarted() -> bool:
        try:
            return fetchd_pid(pool, node) != old
        except OSError:  # between the old one and the new one
            return False

    wait_for(f"{node}'s apppot_fetchd restarted", restarted, timeout=60, every=0.25)


@contextlib.contextmanager
def fetchd_settings(pool, node: str, **env: str):
    """NODE's fetch service runs with ENV (e.g. its own APPPOT_CACHE_BUDGET) until the block ends: a
    drop-in that appends it to APPPOT_FETCHD_<NODE>_ENVIRONMENT (70-apppot-two-nodes.conf), then restored."""
    conf = pool.root / "etc" / "condor" / "config.d" / f"80-test-fetchd-{node}.conf"
    var = f"APPPOT_FETCHD_{node.upper()}_ENVIRONMENT"
    conf.write_text(f"{var} = $({var});" + ";".join(f"{k}={v}" for k, v in env.items()) + "\n")
    try:
        restart_fetchd(pool, node)
        yield
    finally:
        conf.unlink()
        restart_fetchd(pool, node)


def scratch_file(pool, node: str, name: str) -> pathlib.Path | None:
    """NAME in the scratch directory of a job running on NODE (the guest's job dir, by hostfs): dir_PID/
    on HTCondor 23, dir_PID/scratch/ on 25."""
    execute = pool.root / "var" / "lib" / "condor" / "execute" / node
    found = [*execute.glob(f"dir_*/{name}"), *execute.glob(f"dir_*/scratch/{name}")]
    return found[0] if found else None


def test_over_budget_the_least_recently_used_idle_entry_goes_one_in_use_stays(two_nodes, http_server):
    """Node B's fetch service with a budget of 3.5 images (and no grace period): job A boots image X and
    keeps running; jobs for Y1, then Y2 run and end; the job for Z needs room. The least recently used
    entry is X, but A's `apppot run` holds it: Y1, the least recently used idle one, is evicted; X, Y2
    and Z stay, and A ends normally."""
    pool, server = two_nodes, http_server
    cache = pool.nodes["nodeb"].cache_dir
    for p in [*cache.glob("sha256/*"), *cache.glob("meta/*")]:  # earlier tests' entries: the budget is ours
        p.unlink()
    images = {tag: url_image(pool, server, tag, 1 << 20) for tag in ("x", "yone", "ytwo", "z")}  # 33 MiB each
    d = pool.job_dir("budget")
    tag = f"{os.getpid()}.{time.time_ns()}"
    # (ls, not test -e: the guest's hostfs may keep a negative dentry for a name that did not exist)
    hold_cmd = f"sh -c 'echo up >started.{tag}; until ls | grep -q release.{tag}; do sleep 1; done; echo ran; exit 42'"

    def run(key: str) -> None:
        name, digest, _ = images[key]
        cluster = submit_from_template(pool, d, url_vars(server, name, digest), node="nodeb")
        pool.wait(cluster, timeout=JOB_TIMEOUT)
        (ad,) = history(pool, cluster, 1)
        assert ad["ExitCode"] == 42 and (d / f"apppot.{cluster}.0.out").read_text() == "ran\n"

    def present() -> dict[str, bool]:
        return {k: cached(pool, "nodeb", digest).exists() for k, (_, digest, _) in images.items()}

    with fetchd_settings(pool, "nodeb", APPPOT_CACHE_BUDGET="116M", APPPOT_CACHE_GRACE="0"):
        name, digest, _ = images["x"]
        a = submit_from_template(pool, d, url_vars(server, name, digest, cmd=hold_cmd), node="nodeb")
        try:
            started = wait_for("job A's guest running", lambda: scratch_file(pool, "nodeb", f"started.{tag}"),
                               timeout=JOB_TIMEOUT, every=0.5)  # fmt: skip
            in_use = {e["sha256"]: e["in_use"] for e in fetchd.request(
                "list", socket=os.fspath(cache / "fetchd.sock"), timeout=30)["entries"]}  # fmt: skip
            assert in_use == {digest: True}, in_use
            run("yone")
            run("ytwo")
            assert present() == {"x": True, "yone": True, "ytwo": True, "z": False}
            run("z")
            assert present() == {"x": True, "yone": False, "ytwo": True, "z": True}
            (started.parent / f"release.{tag}").write_text("")
            pool.wait(a, timeout=JOB_TIMEOUT)
        finally:
            pool._remove(f"ClusterId == {a}", "test done")  # still waiting if the test failed
        (ad,) = history(pool, a, 1)
        assert ad["ExitCode"] == 42 and (d / f"apppot.{a}.0.out").read_text() == "ran\n"
    log = (pool.log_dir / "ApppotFetchdLog.nodeb").read_text()
    assert f"evicted {images['yone'][1]}" in log and f"evicted {images['x'][1]}" not in log
    for name, _, _ in images.values():
        assert len(downloads(server, name)) == 1, downloads(server, name)
