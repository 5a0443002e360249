"""Images on demand through the pool's two execute points (scripts/personal-pool: startds nodea and
nodeb, each with its own image directory and image cache).

Jobs are submitted from submit_templates/apppot-vanilla.sub, as users would; a test that must pin a
job to one node adds `PoolNode =?= "nodeX"` to the template's requirements.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import time
import urllib.parse

import pytest

from tests.condor.conftest import node_of

pytestmark = pytest.mark.condor

REPO = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "submit_templates" / "apppot-vanilla.sub"
JOB_TIMEOUT = 240


@pytest.fixture(scope="module")
def two_nodes(pool):
    if pool.mode != "chroot":
        pytest.skip("the system-mode pool has one execute point")
    for node in pool.nodes:
        pool.slot_ad(node, ["HasAppPot", "AppPotImages"], lambda a: a.get("HasAppPot") is True, timeout=60)
    return pool


def _template_text(d: pathlib.Path, variables: dict[str, str], *, count: int = 1, node: str | None = None) -> str:
    text = TEMPLATE.read_text().rstrip()
    assert text.endswith("\nqueue")
    lines = [f"{k} = {v}" for k, v in variables.items()]
    extra = [f'requirements = $(requirements) && PoolNode =?= "{node}"'] if node else []
    return "\n".join([f"initialdir = {d}", *lines, text[: -len("queue")], *extra, f"queue {count}", ""])


def submit_from_template(pool, d: pathlib.Path, variables: dict[str, str], *, count: int = 1,
                         node: str | None = None) -> int:
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
