"""Fixtures for tests that run jobs in the personal HTCondor pool (``scripts/personal-pool``).

The session-scoped ``pool`` fixture runs ``scripts/personal-pool up`` (which also installs
this checkout into the pool) and ``down`` at the end of the session, but only if the pool was
not already up when the session started.  Host-side access goes through the PyPI ``htcondor``
wheel, ``htcondor2``/``classad2`` API only (works with the 23.10 and 25.x wheels).

Paths: jobs are resolved by the schedd/shadow *inside* the pool, so a non-spooled job's
``initialdir`` must be visible there: use ``pool.job_dir()`` (under the shared dir, which has
the same path on the host and in the pool).  Spooled jobs (``spool=True``) may use any host
directory: input is sent to the schedd and output retrieved back into it.

Two execute points: the chroot pool runs two startds, ``nodea`` and ``nodeb`` (their slot ads say
``PoolNode``), each with its own image directory and image cache (``pool.nodes``); the tiny image is on
both, so a job may land on either. A test that needs an image on one node puts it there itself.

``http_server``: a real nginx on 127.0.0.1 (tests/httpserver.py) serving a directory, with an access log
that records each request's Range header (the image cache's downloads).

Needs root (the pool is a chroot); deselect with ``-m "not condor"``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import shlex
import subprocess
import time
from collections.abc import Mapping
from typing import Any, Union

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "personal-pool"
HERE = pathlib.Path(__file__).resolve().parent

UP_TIMEOUT = 600  # a fresh root (debootstrap + apt) takes ~1.5 min; leave room for slow mirrors

HOLD_SPOOLING_INPUT = 16  # HoldReasonCode while a spooled job waits for its input


def pytest_configure(config):
    config.addinivalue_line("markers", "condor: runs jobs in a personal HTCondor pool (scripts/personal-pool)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection sees the items
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in pathlib.Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.condor)


def _script(*args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Run scripts/personal-pool; on failure, fail the test with its output."""
    try:
        proc = subprocess.run(
            [str(SCRIPT), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"personal-pool {' '.join(args)} timed out after {timeout}s:\n{e.output or ''}")
    if check and proc.returncode != 0:
        pytest.fail(f"personal-pool {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}")
    return proc


def _parse_env(text: str) -> dict[str, str]:
    """Parse the `export K=V ...` / `unset K` lines printed by `personal-pool env`."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if not words:
            continue
        if words[0] == "unset":
            env.update({k: "" for k in words[1:]})
        elif words[0] == "export":
            for w in words[1:]:
                k, _, v = w.partition("=")
                env[k] = v
    return env


@dataclasses.dataclass(frozen=True)
class Node:
    """One execute point of the pool (scripts/personal-pool: NODES, node_images, node_cache)."""

    name: str                  # its PoolNode and STARTD_NAME: slot names are slot1@NAME@host
    image_dir: pathlib.Path    # host path of its APPPOT_IMAGE_PATH
    cache_dir: pathlib.Path    # host path of its APPPOT_CACHE_DIR


def node_of(ad) -> str | None:
    """The node a job ran on (or runs on), from its RemoteHost/LastRemoteHost "slot1_1@nodea@host"."""
    host = ad.get("RemoteHost") or ad.get("LastRemoteHost") or ""
    parts = str(host).split("@")
    return parts[1] if len(parts) == 3 else None


class Pool:
    """Handle on the running personal pool."""

    def __init__(self, env: Mapping[str, str]):
        import classad2
        import htcondor2

        self.htcondor = htcondor2
        self.classad = classad2
        self.env = dict(env)
        self.mode = env.get("APPPOT_POOL_MODE", "chroot")
        self.root = pathlib.Path(env.get("CONDOR_ROOT") or "/")
        self.shared_dir = pathlib.Path(env["SHARED_DIR"])
        self.client_dir = pathlib.Path(env["CLIENT_DIR"])
        self.test_user = env.get("TEST_USER", "tester")
        self.test_uid = int(env.get("TEST_UID", "2000"))
        self.log_dir = self.root / "var/log/condor"
        lib = self.root / "var/lib/apppot"
        self.nodes = {
            "nodea": Node("nodea", lib / "images", lib / "cache"),
            "nodeb": Node("nodeb", lib / "nodeb/images", lib / "nodeb/cache"),
        }
        self.image_dir = self.nodes["nodea"].image_dir  # what 50-apppot.conf sets for any node
        self.schedd = htcondor2.Schedd()
        self.collector = htcondor2.Collector()
        self._seq = itertools.count()

    # -- helpers -----------------------------------------------------------------------
    def in_pool(self, *cmd: str, check: bool = True, timeout: float = 120,
                cwd: Union[str, os.PathLike, None] = None, input: str | None = None,
                ) -> subprocess.CompletedProcess:
        """Run CMD inside the pool as the test user (cwd kept if the pool sees it)."""
        try:
            proc = subprocess.run(
                [str(SCRIPT), "in-pool", *map(str, cmd)], cwd=cwd, input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"in-pool {cmd!r} timed out after {timeout}s")
        if check and proc.returncode != 0:
            pytest.fail(f"in-pool {cmd!r} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def job_dir(self, name: str = "job") -> pathlib.Path:
        """A fresh directory under the shared dir, owned by the test user (jobs' initialdir)."""
        d = self.shared_dir / f"{name}.{os.getpid()}.{int(time.time())}.{next(self._seq)}"
        d.mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(d, self.test_uid, self.test_uid)
        return d

    def startd_ads(self, projection=()) -> list:
        """The startd's slot ads (MyType "Machine"), as the collector has them."""
        return self.collector.query(self.htcondor.AdType.Startd, projection=list(projection))

    def slot_ad(self, node: str, attrs=(), predicate=lambda ad: True, timeout: float = 0):
        """NODE's partitionable slot ad, once predicate(ad) holds (waits up to timeout s; the startd
        re-advertises every few seconds); fails with what it saw."""
        deadline = time.monotonic() + timeout
        while True:
            ads = [a for a in self.startd_ads(["Name", "SlotType", "PoolNode", *attrs])
                   if a.get("SlotType") != "Dynamic" and a.get("PoolNode") == node]  # fmt: skip
            if ads and predicate(ads[0]):
                return ads[0]
            if time.monotonic() >= deadline:
                pytest.fail(f"{node}'s slot ad never satisfied the check within {timeout}s: "
                            f"{[dict(a) for a in ads]}; {self.logs_hint()}")
            time.sleep(0.5)

    def logs_hint(self) -> str:
        return (f"see {self.log_dir}/{{SchedLog,ShadowLog,StartLog.node*,StarterLog.slot*,VMGahpLog}}"
                if self.mode == "chroot" else "see the HTCondor log directory (condor_config_val LOG)")

    # -- submit ------------------------------------------------------------------------
    def submit(self, submit: Union[str, Mapping[str, Any], Any], *, spool: bool = False):
        """Submit one cluster; returns the SubmitResult.  A dict/text without `initialdir`
        gets a fresh job_dir() when not spooled."""
        htcondor = self.htcondor
        if isinstance(submit, htcondor.Submit):  # (a Mapping too, but its keys() recurses in 23.10)
            sub = submit
        elif isinstance(submit, Mapping):
            desc = {k: str(v) for k, v in submit.items()}
            if not spool and not any(k.lower() in ("initialdir", "initial_dir", "iwd") for k in desc):
                desc["initialdir"] = str(self.job_dir())
            if spool:
                # keep the completed job in the queue until its output was retrieved
                desc.setdefault("leave_in_queue",
                                "JobStatus == 4 && (StageOutFinish =?= undefined || StageOutFinish == 0)")
            sub = htcondor.Submit(desc)
        else:
            sub = htcondor.Submit(submit)
        result = self.schedd.submit(sub, spool=spool)
        if spool:
            self.schedd.spool(result)
        return result

    def wait(self, cluster: int, *, timeout: float, spool: bool = False, hold_ok: bool = False):
        """Wait until every job of CLUSTER is done; return the (last) final job ad.

        Fails at once if a job is held (with its HoldReason) unless hold_ok, or removed, and
        after `timeout` seconds (the job is removed then). The jobs are followed through their
        event log (the submit description's `log`), as ornithology does; a spooled job's log is
        in the schedd's spool until its output is retrieved, so those are followed in the queue."""
        from apppot.submit import final_ad, job_events

        if spool:
            return self._wait_spooled(cluster, timeout=timeout, hold_ok=hold_ok)
        constraint = f"ClusterId == {cluster}"
        deadline = time.monotonic() + timeout
        et = self.htcondor.JobEventType
        ads = self.schedd.query(constraint=constraint, projection=["ProcId", "UserLog"])
        if not ads:  # done already (or never there)
            return self._from_history(cluster, deadline)
        if not ads[0].get("UserLog"):
            self._remove(constraint, "no event log (test failed)")
            pytest.fail(f"job {cluster} has no event log: give its submit description a `log`")
        procs, done = {ad["ProcId"] for ad in ads}, set()
        for event in job_events(self.htcondor, pathlib.Path(ads[0]["UserLog"]), cluster, deadline):
            if event.type == et.JOB_HELD:
                held = self.schedd.query(constraint=f"{constraint} && ProcId == {event.proc}")
                if hold_ok:
                    return held[0] if held else {"ClusterId": cluster, "JobStatus": self.htcondor.JobStatus.HELD,
                                                 **dict(event)}  # fmt: skip
                self._remove(constraint, "held job (test failed)")
                pytest.fail(f"job {cluster}.{event.proc} held: {event.get('HoldReason')} "
                            f"(HoldReasonCode={event.get('HoldReasonCode')}, "
                            f"HoldReasonSubCode={event.get('HoldReasonSubCode')}); {self.logs_hint()}")
            if event.type == et.JOB_ABORTED:
                pytest.fail(f"job {cluster}.{event.proc} was removed: {event.get('Reason')}")
            if event.type == et.JOB_TERMINATED:
                done.add(event.proc)
                if done >= procs:
                    ad = final_ad(self.schedd, self.htcondor, cluster, deadline)
                    if ad is not None:
                        return ad
                    break
        last = (self.schedd.query(constraint=constraint) or [None])[-1]
        self._remove(constraint, "timeout (test failed)")
        desc = "no ad" if last is None else (
            f"JobStatus={last.get('JobStatus')} HoldReason={last.get('HoldReason')} "
            f"LastRejMatchReason={last.get('LastRejMatchReason')}")
        pytest.fail(f"job {cluster} not done after {timeout}s ({desc}); {self.logs_hint()}")

    def _from_history(self, cluster: int, deadline: float):
        while not (hist := list(self.schedd.history(f"ClusterId == {cluster}", [], 1))):
            if time.monotonic() > deadline:
                pytest.fail(f"job {cluster} is neither in the queue nor in the history")
            time.sleep(0.25)
        if hist[0].get("JobStatus") == self.htcondor.JobStatus.REMOVED:
            pytest.fail(f"job {cluster} was removed: {hist[0].get('RemoveReason')}")
        return hist[0]

    def _wait_spooled(self, cluster: int, *, timeout: float, hold_ok: bool):
        js = self.htcondor.JobStatus
        constraint = f"ClusterId == {cluster}"
        deadline = time.monotonic() + timeout
        last = None
        while True:
            ads = self.schedd.query(constraint=constraint)
            if ads:
                last = ads[-1]
                statuses = {ad.get("JobStatus") for ad in ads}
                for ad in ads:
                    st = ad.get("JobStatus")
                    if st == js.HELD and ad.get("HoldReasonCode") != HOLD_SPOOLING_INPUT:
                        if hold_ok:
                            return ad
                        self._remove(constraint, "held job (test failed)")
                        pytest.fail(f"job {cluster}.{ad.get('ProcId')} held: {ad.get('HoldReason')} "
                                    f"(HoldReasonCode={ad.get('HoldReasonCode')}, "
                                    f"HoldReasonSubCode={ad.get('HoldReasonSubCode')}); {self.logs_hint()}")
                    if st == js.REMOVED:
                        pytest.fail(f"job {cluster}.{ad.get('ProcId')} was removed: {ad.get('RemoveReason')}")
                if statuses == {js.COMPLETED}:
                    self.schedd.retrieve(constraint)
                    self._remove(constraint, "output retrieved")
                    return last
            else:
                return self._from_history(cluster, deadline)
            if time.monotonic() > deadline:
                self._remove(constraint, "timeout (test failed)")
                desc = "no ad" if last is None else (
                    f"JobStatus={last.get('JobStatus')} HoldReason={last.get('HoldReason')} "
                    f"LastRejMatchReason={last.get('LastRejMatchReason')}")
                pytest.fail(f"job {cluster} not done after {timeout}s ({desc}); {self.logs_hint()}")
            time.sleep(0.25)

    def submit_and_wait(self, submit, *, timeout: float, spool: bool = False, hold_ok: bool = False):
        """Submit, wait (see wait()), and return the final job ad (a classad2.ClassAd).
        The job's directory is ad["Iwd"]; with spool=True the output was retrieved into it."""
        result = self.submit(submit, spool=spool)
        return self.wait(result.cluster(), timeout=timeout, spool=spool, hold_ok=hold_ok)

    def _remove(self, constraint: str, reason: str) -> None:
        try:
            self.schedd.act(self.htcondor.JobAction.Remove, constraint, reason)
        except Exception:  # already gone
            pass


@pytest.fixture(scope="session")
def pool():
    if os.geteuid() != 0:
        pytest.fail("scripts/personal-pool needs root (or deselect these tests: -m 'not condor')")
    was_up = _script("status", timeout=60, check=False).returncode == 0
    _script("up", timeout=UP_TIMEOUT)
    env = _parse_env(_script("env", timeout=30).stdout)

    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    import htcondor2

    htcondor2.reload_config()  # the bindings read CONDOR_CONFIG at import time
    try:
        yield Pool(env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # NB: no htcondor2.reload_config() here: without a CONDOR_CONFIG the condor library
        # exit()s the whole pytest process (silently losing its buffered report).
        if not was_up:
            _script("down", timeout=180)


# --- a real HTTP server ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def http_server(pool):
    """nginx for the session (tests/httpserver.py: Debian's nginx-light on 127.0.0.1 only, its own config,
    docroot and access log with each request's Range header), its directory in the pool's shared dir."""
    from tests.httpserver import Nginx

    server = Nginx(pool.shared_dir / f"nginx.{os.getpid()}")
    try:
        yield server
    finally:
        server.stop()
