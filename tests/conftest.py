"""Fixtures shared by every tier: the repo, the plugin as HTCondor runs it, small real images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugins" / "apppot_plugin"
PREALLOCATED = 19264  # what HTCondor pre-allocates for the plugin's outfile: (16*1204)/64 * 64 bytes of spaces
JOB_UID = 4343  # the job's user that runs the plugin in run_plugin's `unprivileged` cases


def as_user(uid: int, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """argv run as uid and gid `uid`, without supplementary groups: an ordinary user, like a job's on
    an execute node. setpriv needs root but no user namespaces, so it works in a chroot too."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *map(os.fspath, argv)]


def pytest_report_header(config: pytest.Config) -> list[str]:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "missing"

    return [f"qemu-img: {version(['qemu-img', '--version'])}",
            f"qemu: {version(['qemu-system-x86_64', '--version'])}"]  # fmt: skip


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory that other users can traverse (pytest's tmp_path is root-only), for
    tests that run the plugin or a VM as an unprivileged user."""
    d = Path(tempfile.mkdtemp(prefix="apppot-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def plugin_env(open_tmp: Path) -> dict[str, str]:
    """The environment the starter gives the plugin: ours, with a Python that has classad2 first on
    PATH (the plugin's #! is `env python3`) and an image directory of its own."""
    images = open_tmp / "images"
    images.mkdir()
    images.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["APPPOT_IMAGE_PATH"] = os.fspath(images)
    env["PYTHONPATH"] = os.fspath(REPO)
    env["CONDOR_CONFIG"] = "/dev/null"  # no node config: the plugin falls back to the environment
    return env


@pytest.fixture
def images(plugin_env: dict[str, str]) -> Path:
    """An image directory with a raw base (4 MiB, distinctive bytes) and a qcow2 copy of it."""
    d = Path(plugin_env["APPPOT_IMAGE_PATH"])
    raw = d / "base.img"
    with open(raw, "wb") as f:
        f.truncate(4 << 20)
        for off in (0, 1 << 20, (4 << 20) - 4096):
            f.seek(off)
            f.write(os.urandom(4096))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, d / "qbase.qcow2"], check=True)
    return d


def run_plugin(env: dict[str, str], sandbox: Path, urls: Sequence[tuple[str, str]], *, upload: bool = False,
               unprivileged: bool = False, infile_text: str | None = None) -> tuple[int, list[dict], str]:  # fmt: skip
    """Run the plugin as HTCondor's starter does: write the infile, pre-allocate the outfile, run
    `apppot_plugin -infile IN -outfile OUT` in the sandbox; return (exit code, result ads, stderr).

    `unprivileged` runs it as JOB_UID, the owner of the sandbox and the in/outfile, without root's power
    to override file permissions, like a job user's plugin on an execute node (the sandbox must be
    reachable by that user: under open_tmp, not tmp_path). Not root: we are unprivileged already."""
    import classad2

    sandbox.mkdir(exist_ok=True)
    infile, outfile = sandbox / ".apppot_plugin.in", sandbox / ".apppot_plugin.out"
    if infile_text is None:
        infile_text = "".join(f'[ Url = "{u}"; LocalFileName = "{sandbox / n}" ]' for u, n in urls)
    if not infile.exists() or infile.read_text() != infile_text:
        infile.write_text(infile_text)
    if not outfile.exists():
        outfile.write_bytes(b" " * PREALLOCATED)
    argv: list[str] = [os.fspath(PLUGIN), "-infile", os.fspath(infile), "-outfile", os.fspath(outfile)]
    if unprivileged and os.geteuid() == 0:
        for p in (infile, outfile, sandbox):
            if p.stat().st_uid == 0:  # a sandbox the test gave to someone else stays theirs
                os.chown(p, JOB_UID, JOB_UID)
        argv = as_user(JOB_UID, argv)
    res = subprocess.run(argv + (["-upload"] if upload else []), env=env, cwd=sandbox, capture_output=True,
                         text=True)  # fmt: skip
    text = outfile.read_text()
    assert not text.endswith(" " * 64), "the pre-allocated tail was not dropped"
    ads = [dict(ad) for ad in classad2.parseAds(text)]
    for ad in ads:
        assert_v4_result(ad)
    return res.returncode, ads, res.stderr


# What HTCondor's starter keeps of a plugin's result ad and of each TransferErrorData entry, with their
# types (anything else is dropped: src/condor_starter.V6.1/filter.cpp, filterPluginResults and
# filterTransferErrorData; Retryable since 25.4, HTCONDOR-3064). Names ignore case.
RESULT_ATTRS = {"transfersuccess": bool, "transfererror": str, "transferprotocol": str, "transfertype": str,
                "transferfilename": str, "transferfilebytes": int, "transfertotalbytes": int,
                "transferstarttime": int, "transferendtime": int, "connectiontimeseconds": float,
                "transferurl": str, "transfererrordata": list, "developerdata": Mapping, "transferdata": list}  # fmt: skip
ERROR_ATTRS = {"intermediateservererrortype": str, "intermediateserver": str, "errortype": str,
               "pluginversion": str, "pluginlaunched": bool, "failedname": str, "failuretype": str,
               "failedserver": str, "shouldrefresh": bool, "errorcode": int, "errorstring": str, "retryable": int,
               "developerdata": Mapping}  # fmt: skip
# docs/apis/file-transfer-plugins/transfer_error_data.rst: "Each attribute in a stanza must be included."
# (A Transfer failure's FailureType is one of TooSlow, NoSpace, TimedOut, Quota: none fits a write that
# failed for another reason, so there it may be missing.)
ERROR_STANZAS = {"Parameter": {"pluginversion", "pluginlaunched"}, "Resolution": {"failedname", "failuretype"},
                 "Contact": {"failedserver"}, "Authorization": {"failedserver", "failuretype", "shouldrefresh"},
                 "Specification": {"failedserver"}, "Transfer": {"failedserver"}}  # fmt: skip


def assert_v4_result(ad: dict) -> None:  # (nested ads are classad2.ClassAd, a Mapping)
    """A result ad as protocol version 4 specifies it (docs/apis/file-transfer-plugins/index.rst): the
    required attributes, TransferError on failure, and TransferErrorData always ("mandatory in version
    4"): empty on success, on failure at least one entry with ErrorCode, ErrorString and one complete
    ErrorType stanza. Every attribute is one HTCondor keeps, with the type it keeps."""
    lower = {k.lower(): v for k, v in ad.items()}
    for name, value in lower.items():
        assert name in RESULT_ATTRS and _is_a(value, RESULT_ATTRS[name]), (name, value, ad)
    assert {"transferfilename", "transferurl", "transfersuccess", "transfererrordata"} <= lower.keys(), ad
    if lower["transfersuccess"]:
        assert lower["transfererrordata"] == [], ad
        return
    assert lower.get("transfererror") and lower["transfererrordata"], ad
    for entry in lower["transfererrordata"]:
        err = {k.lower(): v for k, v in dict(entry).items()}
        for name, value in err.items():
            assert name in ERROR_ATTRS and _is_a(value, ERROR_ATTRS[name]), (name, value, entry)
        assert isinstance(err.get("errorcode"), int) and isinstance(err.get("errorstring"), str), entry
        assert ERROR_STANZAS[err["errortype"]] <= err.keys(), entry


def _is_a(value: object, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # ClassAd: true is no 1
