"""Images on demand through the pool's two execute points (scripts/personal-pool: startds nodea and
nodeb, each with its own image directory and image cache).

Jobs are submitted from submit_templates/apppot-vanilla.sub, as users would; a test that must pin a
job to one node adds `PoolNode =?= "nodeX"` to the template's requirements.
"""

from __future__ import annotations

import os
import pathlib
import time

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


def submit_from_template(pool, d: pathlib.Path, variables: dict[str, str], *, count: int = 1,
                         node: str | None = None) -> int:
    """The template with VARIABLES set (as `condor_submit var=value` would), COUNT jobs, optionally
    pinned to NODE; returns the cluster id."""
    text = TEMPLATE.read_text().rstrip()
    assert text.endswith("\nqueue")
    lines = [f"{k} = {v}" for k, v in variables.items()]
    extra = [f'requirements = $(requirements) && PoolNode =?= "{node}"'] if node else []
    desc = "\n".join([f"initialdir = {d}", *lines, text[: -len("queue")], *extra, f"queue {count}", ""])
    return pool.submit(pool.htcondor.Submit(desc)).cluster()


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
    assert f'TransferInput="apppot://x?sha256={hexd}&from={url}&format=uml-cow"' in ad, ad
    assert f'Rank=ifThenElse(stringListMember("sha256:{hexd}",AppPotCachedImages) =?= true,1,0)' in ad, ad
    assert "Requirements=(AppPotCachedImages =!= undefined)" in ad, ad
    missing = pool.in_pool("condor_submit", "-dry-run", "-", "image=x", f"image_url={url}", TEMPLATE.name,
                           cwd=d, check=False)  # fmt: skip
    assert missing.returncode != 0 and "image_url needs image_sha256" in missing.stdout + missing.stderr
