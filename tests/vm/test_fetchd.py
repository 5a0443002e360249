"""The node's image cache with real parts: Debian's nginx on 127.0.0.1 and a real fetch service process,
started as root and dropping to an unprivileged service account, as condor_master runs it."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from apppot import fetchd, imagecache
from apppot.errors import ApppotError
from tests.conftest import JOB_UID, REPO, as_user, run_plugin
from tests.vm.conftest import apppot
from tests.httpserver import Nginx

SERVICE_UID = 4646  # the condor account the service drops to (CONDOR_IDS)
FETCHD = REPO / "plugins" / "apppot_fetchd"
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:  # not a skip: a missing component must fail
        pytest.fail("the fetch service drops root to its own account: run these tests as root (make test does)")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Fetchd:
    """A running apppot_fetchd process on a cache dir of its own."""

    def __init__(self, root: Path, *, budget: str = "1G", grace: int = 600, image_path: str = "") -> None:
        self.root, self.sock = root / "cache", root / "cache" / "fetchd.sock"
        self.env = {**os.environ, "CONDOR_CONFIG": "/dev/null", "PYTHONPATH": os.fspath(REPO),
                    "APPPOT_CACHE_DIR": os.fspath(self.root), "APPPOT_CACHE_BUDGET": budget,
                    "APPPOT_CACHE_GRACE": str(grace), "CONDOR_IDS": f"{SERVICE_UID}.{SERVICE_UID}",
                    "APPPOT_FETCHD_LOG": os.fspath(root / "log" / "fetchd.log"),
                    "APPPOT_IMAGE_PATH": image_path}  # fmt: skip
        self.logfile = root / "log" / "fetchd.log"
        self.logfile.parent.mkdir(exist_ok=True)  # like HTCondor's LOG: the condor account's
        os.chown(self.logfile.parent, SERVICE_UID, SERVICE_UID)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, FETCHD, "-f"], env=self.env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while not self.listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"apppot_fetchd exited {self.proc.returncode}: {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, "apppot_fetchd did not create its socket"
            time.sleep(0.05)

    def listening(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(os.fspath(self.sock))
                return True
            except OSError:  # not there yet, or a killed service's stale socket
                return False

    def get(self, url: str | None, sha: str, *, timeout: float = 60, name: str = "img") -> dict:
        return fetchd.request("get", socket=os.fspath(self.sock), timeout=timeout, name=name, url=url, sha256=sha)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(10)

    def entries(self) -> set[str]:
        return set(os.listdir(self.root / "sha256"))


@pytest.fixture
def nginx(open_tmp: Path):
    n = Nginx(open_tmp / "nginx")
    yield n
    n.stop()


@pytest.fixture
def service(open_tmp: Path):
    made: list[Fetchd] = []

    def make(**kw: object) -> Fetchd:
        made.append(Fetchd(open_tmp, **kw))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for f in made:
        if f.proc.poll() is None:
            f.kill()


def publish(nginx: Nginx, name: str, size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    (nginx.www / name).write_bytes(data)
    return data, digest(data)


def test_eight_concurrent_gets_one_download(nginx, service):
    _, sha = publish(nginx, "img8", 4 * MiB)
    f = service()
    with ThreadPoolExecutor(8) as pool:  # /slow/: ~2 s, all 8 ask while the first is downloading
        replies = list(pool.map(lambda _: f.get(nginx.url("img8", slow=True), sha), range(8)))
    path = f.root / "sha256" / sha
    assert {r["path"] for r in replies} == {os.fspath(path)}
    assert len(nginx.gets("img8")) == 1, nginx.log()
    assert digest(path.read_bytes()) == sha
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (SERVICE_UID, 0o444)  # dropped root before writing
    assert "request from pid" in f.logfile.read_text() and "uid 0" in f.logfile.read_text()  # SO_PEERCRED


def test_interrupted_download_resumes_with_range(nginx, service):
    """The service is killed mid-download and started again a second later (as condor_master does): the
    client that asked waits through it (it asks again), and the new service resumes with a Range request."""
    data, sha = publish(nginx, "imgr", 8 * MiB)
    f = service()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(f.get, nginx.url("imgr", slow=True), sha)
        part = f.root / "partial" / f"{sha}.part"
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size >= 2 * MiB):
            assert time.monotonic() < deadline and not pending.done()
            time.sleep(0.05)
        f.kill(signal.SIGKILL)  # the node's service dies mid-download
        have = part.stat().st_size
        assert 0 < have < len(data) and f.entries() == set()
        time.sleep(1)
        assert not pending.done()  # the client waits for the service to come back
        f.start()
        assert pending.result()["path"] == os.fspath(f.root / "sha256" / sha)
    assert digest((f.root / "sha256" / sha).read_bytes()) == sha
    first, second = nginx.gets("imgr")
    assert second.split()[4] == "206" and 'range="bytes=' in second, second
    assert int(second.split('range="bytes=')[1].split("-")[0]) == have
    assert second.split()[4:6] == ["206", str(len(data) - have)]  # only the rest came over the wire
    assert not part.exists()


def test_a_service_that_dies_and_stays_down_fails_the_client_clearly(nginx, service):
    """Killed mid-request and never restarted: the client asks again until its timeout, then says so."""
    _, sha = publish(nginx, "imgd", 8 * MiB)
    f = service()
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(f.get, nginx.url("imgd", slow=True), sha, timeout=4)
        time.sleep(1)
        f.kill(signal.SIGKILL)
        with pytest.raises(ApppotError, match="stopped answering and was not back within 4 s") as e:
            pending.result()
    assert 3.4 < time.monotonic() - started < 6
    assert "condor_master restarts apppot_fetchd" in str(e.value.hint)


def test_wrong_digest_names_both_and_caches_nothing(nginx, service):
    _, actual = publish(nginx, "imgw", MiB)
    wrong = "ab" * 32
    f = service()
    with pytest.raises(ApppotError) as e:
        f.get(nginx.url("imgw"), wrong)
    assert actual in str(e.value) and wrong in str(e.value) and "sha256sum" in str(e.value)
    assert f.entries() == set() and os.listdir(f.root / "partial") == []
    assert not (f.root / "meta" / f"{wrong}.json").exists()


def test_only_http_urls_and_a_digest_are_accepted(service, open_tmp):
    f = service()
    secret = open_tmp / "secret"
    secret.write_bytes(b"root's")
    with pytest.raises(ApppotError, match="only http"):
        f.get(f"file://{secret}", digest(b"root's"))
    with pytest.raises(ApppotError, match="sha256sum"):
        f.get("http://127.0.0.1:9/x", "not-a-digest")
    with pytest.raises(ApppotError, match="no image with sha256"):
        f.get(None, "cd" * 32)
    assert f.entries() == set()


def test_a_job_user_cannot_place_or_swap_an_entry(nginx, service, open_tmp):
    good, sha = publish(nginx, "imgt", MiB)
    f = service()
    path = f.get(nginx.url("imgt"), sha)["path"]
    fake = open_tmp / "fake"
    fake.write_bytes(os.urandom(MiB))
    fake.chmod(0o644)
    sub = f.root / "sha256"
    attacks = [  # each as the job's unprivileged user, each must fail
        f"cp {fake} {sub}/{'ef' * 32}",  # place an entry for a digest another job will ask for
        f"cp {fake} {path}",  # overwrite the entry in place
        f"mv {fake} {path}",  # swap it (rename over)
        f"rm -f {path}",
        f"ln -s {fake} {sub}/{'ef' * 32}",
        f"cp {fake} {f.root}/partial/{'ef' * 32}.part",  # plant a part the service would resume
        f"chmod 666 {path}",
        f"echo '{{}}' > {f.root}/meta/{sha}.json",
        f"rm -f {f.sock}",
    ]
    for cmd in attacks:
        res = subprocess.run(as_user(JOB_UID, ["sh", "-c", cmd]), capture_output=True, text=True)
        assert res.returncode != 0, f"a job user could: {cmd}"
    assert digest(Path(path).read_bytes()) == sha and f.entries() == {sha}
    # Through the service, a job user cannot make it cache other bytes under a digest either.
    res = subprocess.run(as_user(JOB_UID, [sys.executable, "-c", (
        "import sys; from apppot import fetchd; "
        f"fetchd.request('get', socket={os.fspath(f.sock)!r}, url={nginx.url('imgt')!r}, sha256={'ef' * 32!r})")]),
        env=f.env, capture_output=True, text=True)  # fmt: skip
    assert res.returncode != 0 and sha in res.stderr and "ef" * 32 in res.stderr
    assert f.entries() == {sha}
    assert f"uid {JOB_UID}" in f.logfile.read_text()  # who asked is in the service's log


def test_refuses_a_cache_others_can_write(open_tmp):
    root = open_tmp / "cache"
    root.mkdir()
    root.chmod(0o777)
    os.chown(root, SERVICE_UID, SERVICE_UID)
    with pytest.raises(RuntimeError, match="writable by others"):
        Fetchd(open_tmp)


def test_eviction_lru_idle_goes_held_entry_stays(nginx, service):
    (_, a), (_, b), (_, c) = (publish(nginx, n, 3 * MiB) for n in ("ea", "eb", "ec"))
    f = service(budget="7M", grace=0)
    pa = f.get(nginx.url("ea"), a)["path"]
    time.sleep(0.01)
    f.get(nginx.url("eb"), b)
    fd = imagecache.hold(pa)  # a job boots A, the least recently used
    try:
        f.get(nginx.url("ec"), c)  # 9M > 7M: A is LRU but held, so B goes
        assert f.entries() == {a, c}
        assert "evicted " + b in f.logfile.read_text()
    finally:
        os.close(fd)
    time.sleep(0.01)
    f.get(nginx.url("eb"), b)  # A is idle and least recently used now
    assert f.entries() == {b, c}
    listed = fetchd.request("list", socket=os.fspath(f.sock))["entries"]
    assert {e["sha256"] for e in listed} == {b, c} and all(e["size"] == 3 * MiB for e in listed)


def test_waiting_client_times_out_clearly(nginx, service):
    _, sha = publish(nginx, "imgs", 8 * MiB)
    f = service()
    with pytest.raises(ApppotError, match="did not answer within 0.5 s") as e:
        f.get(nginx.url("imgs", slow=True), sha, timeout=0.5)
    assert "APPPOT_FETCH_TIMEOUT" in str(e.value)
    assert f.get(nginx.url("imgs", slow=True), sha)["path"]  # the download went on; one GET in all
    assert len(nginx.gets("imgs")) == 1


def test_plugin_url_form_stages_over_the_cache_and_uml_boots_it(nginx, service, tiny_image, uml_kernel, job_dir,
                                                                 plugin_env):  # fmt: skip
    """The plugin, run as the job's unprivileged user like HTCondor's starter runs it, asks the service;
    the UML COW layer it writes is backed by the cache entry, and `apppot run` holds that entry while
    the guest runs."""
    from urllib.parse import quote

    (nginx.www / "tiny.img").write_bytes(tiny_image.read_bytes())
    sha = digest(tiny_image.read_bytes())
    f = service()
    env = {**plugin_env, "APPPOT_CACHE_DIR": os.fspath(f.root), "APPPOT_FETCHD_SOCKET": os.fspath(f.sock)}
    url = f"apppot://tiny?sha256={sha}&from={quote(nginx.url('tiny.img'), safe='')}&format=uml-cow"
    rc, ads, err = run_plugin(env, job_dir, [(url, "tiny")], unprivileged=True)
    assert rc == 0 and ads[0]["TransferSuccess"] is True, (ads, err)
    entry = f.root / "sha256" / sha
    assert ads[0]["DeveloperData"]["BaseImage"] == os.fspath(entry)
    from apppot.image import read_uml_cow_backing

    assert read_uml_cow_backing(job_dir / "tiny") == entry
    assert (job_dir / "tiny").stat().st_blocks * 512 < 1 << 20  # a sparse layer, not a copy
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(apppot, "run", "--image", job_dir / "tiny", "--", "sh", "-c", "sleep 2; echo hi; exit 7",
                          cwd=job_dir, user=JOB_UID, env={**env, "APPPOT_CACHE": os.environ.get("APPPOT_CACHE", "")})  # fmt: skip
        deadline = time.monotonic() + 30
        while not imagecache.in_use(os.fspath(entry)):  # held for the guest's life
            assert not run.done() and time.monotonic() < deadline, run.result().stderr if run.done() else "no hold"
            time.sleep(0.05)
        res = run.result()
    assert (res.returncode, res.stdout) == (7, "hi\n"), res.stderr
    assert not imagecache.in_use(os.fspath(entry))
    # A second job: no second download.
    rc, ads, err = run_plugin(env, job_dir, [(url, "tiny2")], unprivileged=True)
    assert rc == 0 and len(nginx.gets("tiny.img")) == 1


def test_plugin_url_form_wrong_digest_fails_the_transfer_naming_both(nginx, service, plugin_env, open_tmp):
    data, actual = publish(nginx, "w.img", MiB)
    f = service()
    env = {**plugin_env, "APPPOT_CACHE_DIR": os.fspath(f.root), "APPPOT_FETCHD_SOCKET": os.fspath(f.sock)}
    wrong = "0" * 64
    rc, ads, _ = run_plugin(env, open_tmp / "sb", [(f"apppot://w?sha256={wrong}&from={nginx.url('w.img')}", "w")],
                            unprivileged=True)  # fmt: skip
    assert rc == 1 and not ads[0]["TransferSuccess"]
    assert actual in ads[0]["TransferError"] and wrong in ads[0]["TransferError"]
    assert f.entries() == set() and not (open_tmp / "sb" / "w").exists()


def test_apppot_images_prefetches_and_lists_resident_and_cached(nginx, service, images, plugin_env, open_tmp):
    _, sha = publish(nginx, "pre.img", 2 * MiB)
    f = service()
    env = {**plugin_env, "APPPOT_CACHE_DIR": os.fspath(f.root), "APPPOT_FETCHD_SOCKET": os.fspath(f.sock)}
    res = apppot("images", "--prefetch", nginx.url("pre.img"), "--sha256", sha, cwd=open_tmp, env=env, user=JOB_UID)
    assert res.returncode == 0 and f"cached\t{sha}\t{f.root}/sha256/{sha}" in res.stdout, res.stderr
    fd = imagecache.hold(os.fspath(f.root / "sha256" / sha))
    try:
        res = apppot("images", cwd=open_tmp, env=env, user=JOB_UID)
    finally:
        os.close(fd)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(ln.startswith("base\traw\t4194304\t") for ln in lines), lines  # resident, with its sizes
    (cached,) = [ln.split("\t") for ln in lines if ln.startswith("sha256:")]
    assert cached[:3] == [f"sha256:{sha}", "pre.img", str(2 * MiB)] and cached[4] == "in use"
    assert cached[5] == nginx.url("pre.img")
    res = apppot("images", "--prefetch", nginx.url("pre.img"), cwd=open_tmp, env=env)
    assert res.returncode != 0 and "--sha256" in res.stderr


def test_a_server_sending_past_the_budget_is_cut_off(nginx, service):
    _, sha = publish(nginx, "big.img", 3 * MiB)
    f = service(budget="2M")
    with pytest.raises(ApppotError, match="larger than this node's cache budget"):  # announced: refused at once
        f.get(nginx.url("big.img"), sha)
    assert os.listdir(f.root / "partial") == [] and f.entries() == set()
    # A server that announces no length and sends more: cut off at the budget (nginx always sends one,
    # so a raw socket server plays the hostile one)
    import threading

    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            try:
                for _ in range(8):
                    conn.sendall(os.urandom(MiB))
            except OSError:
                pass  # the service hung up: what we want

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(ApppotError, match="sent more than the cache budget"):
        f.get(f"http://127.0.0.1:{srv.getsockname()[1]}/endless", sha)
    srv.close()
    assert os.listdir(f.root / "partial") == [] and f.entries() == set()


def test_a_job_holding_an_entry_exclusively_does_not_stall_other_jobs(nginx, service, plugin_env, open_tmp):
    """Any reader can flock a file: another job user's LOCK_EX on an entry must not hang the plugin."""
    _, sha = publish(nginx, "x.img", MiB)
    f = service()
    entry = f.get(nginx.url("x.img"), sha)["path"]
    locker = subprocess.Popen(as_user(JOB_UID + 1, [sys.executable, "-c", (
        f"import fcntl, sys, time; fd = open({entry!r}, 'rb'); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)")]), stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert locker.stdout.readline() == "locked\n"
        env = {**plugin_env, "APPPOT_CACHE_DIR": os.fspath(f.root), "APPPOT_FETCHD_SOCKET": os.fspath(f.sock)}
        t0 = time.monotonic()
        rc, ads, err = run_plugin(env, open_tmp / "sb", [(f"apppot://x?sha256={sha}&format=uml-cow", "x")],
                                  unprivileged=True)  # fmt: skip
        assert rc == 0 and ads[0]["TransferSuccess"], (ads, err)
        assert time.monotonic() - t0 < 10
        assert ads[0]["DeveloperData"]["BaseImage"] == entry  # sha256= alone: found in the cache
    finally:
        locker.kill()
        locker.wait()
    assert len(nginx.gets("x.img")) == 1


def test_a_silent_client_is_dropped(service):
    f = service()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.fspath(f.sock))
        s.settimeout(20)
        assert s.recv(1) == b""  # the service hung up on us (after its 10 s)
    assert "sent no request within 10 s" in f.logfile.read_text()
    assert fetchd.request("list", socket=os.fspath(f.sock))["ok"]


def test_sighup_rereads_the_budget_from_the_condor_config(service, open_tmp):
    """condor_reconfig reaches a non-DaemonCore daemon as SIGHUP: the new budget applies without a restart."""
    conf = open_tmp / "condor_config"
    conf.write_text("APPPOT_CACHE_BUDGET = 1G\n")
    conf.chmod(0o644)
    f = service()
    f.kill()
    del f.env["APPPOT_CACHE_BUDGET"]  # the knob from HTCondor's config, as on a node
    f.env["CONDOR_CONFIG"] = os.fspath(conf)
    f.start()
    conf.write_text("APPPOT_CACHE_BUDGET = 5M\n")
    f.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reconfigured: budget 5242880 bytes" not in f.logfile.read_text():
        assert time.monotonic() < deadline, f.logfile.read_text()
        time.sleep(0.05)
    assert "budget 1073741824 bytes" in f.logfile.read_text()  # what it started with


def test_a_pinned_resident_base_is_hashed_once_per_version(service, images, plugin_env, open_tmp):
    """Issue 15: a sha256= pin on a resident base does not hash it per job; the record is the service's."""
    import json

    f = service(image_path=plugin_env["APPPOT_IMAGE_PATH"])
    env = {**plugin_env, "APPPOT_CACHE_DIR": os.fspath(f.root), "APPPOT_FETCHD_SOCKET": os.fspath(f.sock)}
    base = images / "base.img"
    sha = digest(base.read_bytes())

    def stage(n: int, pin: str) -> tuple[int, list[dict]]:
        rc, ads, _ = run_plugin(env, open_tmp / f"sb{n}", [(f"apppot://base?sha256={pin}&format=uml-cow", "d")],
                                unprivileged=True)  # fmt: skip
        return rc, ads

    def hashed() -> int:
        return f.logfile.read_text().count("hashing ")

    assert stage(1, sha)[0] == 0 and hashed() == 1
    assert stage(2, sha)[0] == 0 and stage(3, sha)[0] == 0 and hashed() == 1  # the record, not the base
    (record,) = (f.root / "digests").iterdir()
    assert json.loads(record.read_text())["sha256"] == sha
    st = record.stat()
    assert st.st_uid == SERVICE_UID and not st.st_mode & 0o022
    forged = subprocess.run(as_user(JOB_UID, ["sh", "-c", f'echo x > "{record}" || echo x > "{record.parent}/f.json"']))
    assert forged.returncode != 0 and json.loads(record.read_text())["sha256"] == sha

    with open(base, "r+b") as b:  # a new version of the base: hashed again, the old pin now fails
        b.write(os.urandom(4096))
    new = digest(base.read_bytes())
    rc, ads = stage(4, sha)
    assert rc == 1 and new in ads[0]["TransferError"] and sha in ads[0]["TransferError"]
    assert stage(5, new)[0] == 0 and hashed() == 2

    with pytest.raises(ApppotError, match="outside"):  # no digest oracle for other files the service can read
        fetchd.request("digest", socket=os.fspath(f.sock), timeout=10, path="/etc/passwd")
