"""The apppot:// transfer plugin, run as HTCondor's starter runs it, with real qemu-img checks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import classad2
import pytest

from apppot import plugin
from tests.conftest import PLUGIN, PREALLOCATED, run_plugin

OTHER_UID = 4242  # owns files that the plugin, run without privileges, must not be able to use


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def sandbox_files(sandbox: Path) -> set[str]:
    return {p.name for p in sandbox.iterdir()} - {".apppot_plugin.in", ".apppot_plugin.out"}


def test_classad_capabilities(plugin_env, images):
    out = subprocess.run([PLUGIN, "-classad"], env=plugin_env, capture_output=True, text=True, check=True).stdout
    ad = classad2.parseOne(out, parser=classad2.ParserType.Old)
    assert ad["MultipleFileSupport"] is True
    assert ad["PluginType"] == "FileTransfer"
    assert ad["SupportedMethods"] == "apppot"
    assert ad["ProtocolVersion"] in (2, 4)
    assert isinstance(ad["PluginVersion"], str)
    # the slot ad learns which images the node holds
    assert ad["StartdAttrs"] == "HasAppPot,AppPotImages"
    assert ad["HasAppPot"] is True
    assert set(ad["AppPotImages"].split(",")) == {"base", "qbase"}


@pytest.mark.parametrize("url, base_name, fmt", [
    ("apppot://base", "base.img", "raw"),
    ("apppot://base.img", "base.img", "raw"),
    ("apppot://qbase", "qbase.qcow2", "qcow2"),
])  # fmt: skip
def test_overlay_is_valid_reads_base_and_protects_it(plugin_env, images, tmp_path, url, base_name, fmt):
    base = images / base_name
    before = sha(base)
    sb = tmp_path / "sandbox"
    rc, ads, _ = run_plugin(plugin_env, sb, [(url, "disk.qcow2")])
    assert rc == 0
    (ad,) = ads
    assert ad["TransferSuccess"] is True and ad["TransferErrorData"] == []  # protocol 4: always there
    assert ad["TransferUrl"] == url and ad["TransferFileName"] == os.fspath(sb / "disk.qcow2")
    assert ad["TransferProtocol"] == "apppot" and ad["TransferType"] == "download"
    assert ad["TransferTotalBytes"] > 0 and ad["TransferEndTime"] >= ad["TransferStartTime"]
    ov = sb / "disk.qcow2"
    subprocess.run(["qemu-img", "check", ov], check=True, capture_output=True)
    info = subprocess.run(["qemu-img", "info", "--output=json", ov], check=True, capture_output=True, text=True).stdout
    assert f'"backing-filename-format": "{fmt}"' in info
    assert subprocess.run(["qemu-img", "compare", ov, base], capture_output=True).returncode == 0
    # a write through the overlay lands in the overlay, never in the base
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 64k", ov], check=True, capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 1M 64k", ov], check=True, capture_output=True)
    subprocess.run(["qemu-img", "check", ov], check=True, capture_output=True)
    assert sha(base) == before
    assert sandbox_files(sb) == {"disk.qcow2"}


def test_size_grows_the_overlay(plugin_env, images, tmp_path):
    rc, ads, _ = run_plugin(plugin_env, tmp_path / "sb", [("apppot://base?size=10G", "big")])
    assert rc == 0 and ads[0]["TransferSuccess"]
    info = subprocess.run(["qemu-img", "info", tmp_path / "sb/big"], capture_output=True, text=True).stdout
    assert "virtual size: 10 GiB" in info


def test_uml_format_writes_a_uml_cow_file(plugin_env, images, tmp_path):
    rc, ads, _ = run_plugin(plugin_env, tmp_path / "sb", [("apppot://base?format=uml-cow", "base")])
    assert rc == 0 and ads[0]["TransferSuccess"]
    from apppot.image import probe_image, read_uml_cow_backing

    cow = tmp_path / "sb/base"
    assert probe_image(cow).format == "uml-cow"
    assert read_uml_cow_backing(cow) == images / "base.img"
    assert cow.stat().st_blocks * 512 < 64 << 10  # sparse: O(1) whatever the base's size


def test_sha256_pin(plugin_env, images, tmp_path):
    good = sha(images / "base.img")
    rc, ads, _ = run_plugin(plugin_env, tmp_path / "ok", [(f"apppot://base?sha256={good}", "d")])
    assert rc == 0 and ads[0]["TransferSuccess"]
    bad = "0" * 64
    rc, ads, err = run_plugin(plugin_env, tmp_path / "bad", [(f"apppot://base?sha256={bad}", "d")])
    assert rc == 1 and not ads[0]["TransferSuccess"]
    assert good in ads[0]["TransferError"] and bad in ads[0]["TransferError"]
    assert sandbox_files(tmp_path / "bad") == set()


def test_digest_cache_is_used_only_while_the_stat_matches(images, monkeypatch):
    from apppot import image

    base = images / "base.img"
    digest = image.sha256_of(base, update_cache=True)
    assert image.digest_sidecar(base).exists()
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert image.sha256_of(base) == digest and calls == []  # served from the sidecar
    with open(base, "r+b") as f:  # the base changes: the sidecar no longer vouches for it
        f.write(b"changed!")
    assert image.sha256_of(base) != digest and calls == [1]


def test_many_urls_one_failure_keeps_order_and_reports_each(plugin_env, images, tmp_path):
    urls = [("apppot://base", "a"), ("apppot://nope", "b"), ("apppot://qbase", "c")]
    rc, ads, err = run_plugin(plugin_env, tmp_path / "sb", urls)
    assert rc == 1
    assert [a["TransferUrl"] for a in ads] == [u for u, _ in urls]
    assert [a["TransferSuccess"] for a in ads] == [True, False, True]
    assert "no image named 'nope'" in ads[1]["TransferError"] and "base" in ads[1]["TransferError"]
    (data,) = ads[1]["TransferErrorData"]
    assert data["ErrorType"] == "Resolution" and data["FailedName"] == "nope"
    assert "no image named 'nope'" in err
    assert sandbox_files(tmp_path / "sb") == {"a", "c"}


BAD_URLS = [
    ("apppot://../images/base", "'..'", "Specification"),
    ("apppot:///etc/passwd", "outside this node's image directories", "Specification"),
    ("apppot://escape", "outside the image directories", "Specification"),
    ("apppot://empty", "is empty", "Specification"),
    ("apppot://ragged", "512-byte sectors", "Specification"),
    ("apppot://broken", "qcow2 image", "Specification"),
    ("apppot://base?format=vmdk", "format=vmdk is unknown", "Specification"),
    ("apppot://base?size=lots", "invalid size", "Specification"),
    ("apppot://base?colour=red", "unknown option", "Specification"),
    ("http://example.org/base.img", "not an apppot:// URL", "Specification"),
    ("apppot://", "names no image", "Specification"),
]


@pytest.mark.parametrize("url, message, error_type", BAD_URLS)
def test_bad_input_fails_clearly_and_leaves_nothing(plugin_env, images, tmp_path, url, message, error_type):
    os.symlink("/etc/hostname", images / "escape")
    (images / "empty").touch()
    (images / "ragged").write_bytes(b"x" * 1000)
    (images / "broken.qcow2").write_bytes((images / "qbase.qcow2").read_bytes()[:100])
    before = {p.name: sha(p) for p in images.iterdir() if p.is_file()}
    rc, ads, err = run_plugin(plugin_env, tmp_path / "sb", [(url, "disk")])
    assert rc == 1
    (ad,) = ads
    assert ad["TransferSuccess"] is False
    assert message in ad["TransferError"], ad["TransferError"]
    assert ad["TransferErrorData"][0]["ErrorType"] == error_type
    assert isinstance(ad["TransferErrorData"][0]["ErrorCode"], int)
    assert sandbox_files(tmp_path / "sb") == set()
    assert {p.name: sha(p) for p in images.iterdir() if p.is_file()} == before


def test_unreadable_base(plugin_env, images, open_tmp):
    if os.geteuid() == 0:  # another user's private file (the plugin runs as JOB_UID)
        os.chown(images / "base.img", OTHER_UID, OTHER_UID)
        (images / "base.img").chmod(0o600)
    else:  # our own file, unreadable even to us: root alone could override that
        (images / "base.img").chmod(0o000)
    sb = open_tmp / "sb"
    rc, ads, _ = run_plugin(plugin_env, sb, [("apppot://base", "disk")], unprivileged=True)
    assert rc == 1 and "not readable" in ads[0]["TransferError"]
    assert ads[0]["TransferErrorData"][0]["ErrorType"] == "Authorization"
    assert sandbox_files(sb) == set()


def test_destination_not_writable(plugin_env, images, open_tmp):
    sb = open_tmp / "sb"
    sb.mkdir()
    out = sb / ".apppot_plugin.out"  # the outfile is the plugin's to write; the directory is not
    out.write_bytes(b" " * PREALLOCATED)
    (sb / ".apppot_plugin.in").write_text(f'[ Url = "apppot://base"; LocalFileName = "{sb}/disk" ]')
    if os.geteuid() == 0:  # another user's directory (the plugin runs as JOB_UID)
        os.chown(sb, OTHER_UID, OTHER_UID)
    else:  # our own directory, read-only even to us
        sb.chmod(0o555)
    rc, ads, _ = run_plugin(plugin_env, sb, [("apppot://base", "disk")], unprivileged=True)
    sb.chmod(0o755)  # (open_tmp's cleanup can remove it again)
    assert rc == 1 and "cannot write" in ads[0]["TransferError"]
    assert ads[0]["TransferErrorData"][0]["ErrorType"] == "Transfer"
    assert sandbox_files(sb) == set() and out.exists()


def test_upload_is_refused_per_file(plugin_env, images, tmp_path):
    sb = tmp_path / "sb"
    sb.mkdir()
    (sb / "out.txt").write_text("result")
    rc, ads, _ = run_plugin(plugin_env, sb, [("apppot://base", "out.txt"), ("apppot://x", "out.txt")], upload=True)
    assert rc == 1 and len(ads) == 2
    assert all(not a["TransferSuccess"] and a["TransferType"] == "upload" for a in ads)
    assert "read-only" in ads[0]["TransferError"]
    assert (sb / "out.txt").read_text() == "result"


def test_v4_non_file_ads_and_unknown_attributes_are_tolerated(plugin_env, images, tmp_path):
    sb = tmp_path / "sb"
    text = (f'[ PluginData = "x"; Protocol = "apppot" ]'
            f'[ Url = "apppot://base"; LocalFileName = "{sb}/d"; Extra = {{1, 2}}; apppot_PluginData = [ a = 1 ] ]')  # fmt: skip
    rc, ads, _ = run_plugin(plugin_env, sb, [], infile_text=text)
    assert rc == 0 and len(ads) == 1 and ads[0]["TransferSuccess"]


@pytest.mark.parametrize("text", ["", "this is not a classad", "[ Url = ; ]"])
def test_malformed_infile(plugin_env, images, tmp_path, text):
    rc, ads, err = run_plugin(plugin_env, tmp_path / "sb", [], infile_text=text)
    assert rc == 1
    assert ads[0]["TransferSuccess"] is False and "input file" in ads[0]["TransferError"]
    assert ads[0]["TransferErrorData"][0]["ErrorType"] == "Parameter"
    assert sandbox_files(tmp_path / "sb") == set()


def test_missing_outfile_argument(plugin_env, tmp_path):
    (tmp_path / "in").write_text('[ Url = "apppot://base"; LocalFileName = "x" ]')
    res = subprocess.run([PLUGIN, "-infile", tmp_path / "in"], env=plugin_env, capture_output=True, text=True)
    assert res.returncode == 1 and "-outfile" in res.stderr


def test_outfile_is_never_opened_with_truncation(images, tmp_path, monkeypatch):
    flags = []
    real_open = os.open
    monkeypatch.setattr(plugin.os, "open", lambda p, f, *a: flags.append(f) or real_open(p, f, *a))
    out = tmp_path / "out"
    out.write_bytes(b" " * PREALLOCATED)
    plugin.write_results(os.fspath(out), [{"TransferSuccess": True}])
    assert flags and not flags[0] & os.O_TRUNC
    text = out.read_text()
    assert not text.endswith(" " * 64)  # the pre-allocated tail is gone
    assert [dict(ad) for ad in classad2.parseAds(text)] == [{"TransferSuccess": True}]


def test_legacy_single_file_form(plugin_env, images, tmp_path):
    res = subprocess.run([PLUGIN, "apppot://base", tmp_path / "d"], env=plugin_env, capture_output=True, text=True)
    assert res.returncode == 0 and (tmp_path / "d").exists()
    assert "TransferSuccess = true" in res.stdout
    res = subprocess.run([PLUGIN, "apppot://nope", tmp_path / "e"], env=plugin_env, capture_output=True, text=True)
    assert res.returncode == 1 and "no image named" in res.stderr and not (tmp_path / "e").exists()


def test_concurrent_invocations_over_one_base(plugin_env, images, tmp_path):
    def one(i: int) -> tuple[int, list]:
        rc, ads, _ = run_plugin(plugin_env, tmp_path / f"sb{i}", [("apppot://base", "d"), ("apppot://base?format=uml-cow", "u")])
        return rc, ads

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, range(24)))
    assert all(rc == 0 and all(a["TransferSuccess"] for a in ads) for rc, ads in results)
    for i in range(24):
        subprocess.run(["qemu-img", "check", tmp_path / f"sb{i}/d"], check=True, capture_output=True)


def test_help_documents_the_url_grammar(plugin_env):
    out = subprocess.run([PLUGIN, "--help"], env=plugin_env, capture_output=True, text=True).stdout
    assert "apppot://NAME[?sha256=HEX][&size=SIZE][&format=qcow2|uml-cow]" in out
    assert "APPPOT_IMAGE_PATH" in out


def test_image_path_from_environment_when_condor_has_none(plugin_env):
    def image_path(**env: str) -> str:
        code = "from apppot import store; print(':'.join(map(str, store.image_path())))"
        return subprocess.run([sys.executable, "-c", code], env={**plugin_env, **env}, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip

    assert image_path(APPPOT_IMAGE_PATH="/a:/b") == "/a:/b"
    # a knob in HTCondor's configuration wins over the environment variable
    assert image_path(APPPOT_IMAGE_PATH="/a:/b", _CONDOR_APPPOT_IMAGE_PATH="/from/condor") == "/from/condor"


def test_base_whose_backing_chain_leaves_the_image_dirs_is_refused(plugin_env, images, tmp_path, open_tmp):
    """A qcow2 base in the image directory may only build on another image there (store.backing_chain):
    its chain would otherwise make qemu open a host file. Refused per file; the other URL still works."""
    outside = open_tmp / "host-file"
    outside.write_bytes(b"\0" * 65536)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", outside, images / "chained.qcow2"],
                   check=True)  # fmt: skip
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", images / "qbase.qcow2",
                    images / "inside.qcow2"], check=True)  # fmt: skip
    sb = tmp_path / "sb"
    rc, ads, _ = run_plugin(plugin_env, sb, [("apppot://chained", "a"), ("apppot://inside", "b")])
    assert rc == 1
    assert ads[0]["TransferSuccess"] is False
    assert f"is backed by {outside}, outside this node's image directories" in ads[0]["TransferError"]
    assert ads[0]["TransferErrorData"][0]["ErrorType"] == "Specification"
    assert ads[1]["TransferSuccess"] is True  # a chain that stays inside is fine
    assert sandbox_files(sb) == {"b"}
    assert oct((sb / "b").stat().st_mode & 0o777) == "0o600"  # a running guest's writes are its owner's only


def test_plugin_takes_the_image_path_from_the_environment_the_startd_passes(plugin_env, images, tmp_path):
    """condor_config.d/50-apppot.conf puts APPPOT_IMAGE_PATH into STARTD_ENVIRONMENT, so the plugin needs
    no bindings to find the images; the environment wins over a config the plugin would have to load."""
    (images / "envimg").write_bytes(b"\0" * 65536)
    env = {**plugin_env, "_CONDOR_APPPOT_IMAGE_PATH": "/nonexistent/from/condor"}
    out = subprocess.run([PLUGIN, "-classad"], env=env, capture_output=True, text=True, check=True).stdout
    attrs = dict(line.split(" = ", 1) for line in out.splitlines())
    assert "envimg" in attrs["AppPotImages"].strip('"').split(",")
    rc, ads, _ = run_plugin(env, tmp_path / "sb", [("apppot://envimg", "d")])
    assert rc == 0 and ads[0]["DeveloperData"]["BaseImage"] == os.fspath(images / "envimg")


def _modules_loaded_by(argv: list[str], env: dict[str, str]) -> set[str]:
    """Modules the plugin process imports after Python's own start-up (site), from -X importtime."""
    res = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, capture_output=True, text=True)
    lines = [ln.rpartition("|")[2].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")]
    return set(lines[lines.index("site") + 1 :])  # site (and a venv's .pth files) load before the plugin runs


# What start-up time buys nothing on the plugin's hot paths (it runs twice per job): issue 15.
NEVER_FOR_CLASSAD = {"htcondor2", "classad2", "argparse", "dataclasses", "inspect", "pathlib", "typing",
                     "urllib.parse", "re", "socket", "apppot.image", "apppot.fetchd", "apppot.imagecache",
                     "fcntl", "json"}  # fmt: skip
# A resident image needs neither the fetch service's client nor the cache (issue 13)
NEVER_FOR_TRANSFER = {"htcondor2", "argparse", "dataclasses", "inspect", "socket", "urllib.parse", "apppot.fetchd",
                      "apppot.imagecache"}  # fmt: skip
# The URL form asks the service over a socket, and loads none of the service's own modules
NEVER_FOR_URL_FORM = {"htcondor2", "argparse", "dataclasses", "inspect", "threading", "socketserver",
                      "urllib.request", "http.client", "hashlib", "logging"}  # fmt: skip


def test_plugin_classad_and_transfer_import_only_what_they_need(plugin_env, images, tmp_path):
    loaded = _modules_loaded_by([os.fspath(PLUGIN), "-classad"], plugin_env)
    assert "apppot.plugin" in loaded and "apppot.store" in loaded
    assert loaded & NEVER_FOR_CLASSAD == set()
    sb = tmp_path / "sb"
    sb.mkdir()
    (sb / "in").write_text(f'[ Url = "apppot://base"; LocalFileName = "{sb}/d" ]\n'
                           f'[ Url = "apppot://base?format=uml-cow"; LocalFileName = "{sb}/u" ]')
    argv = [os.fspath(PLUGIN), "-infile", os.fspath(sb / "in"), "-outfile", os.fspath(sb / "out")]
    loaded = _modules_loaded_by(argv, plugin_env)
    assert (sb / "d").exists() and (sb / "u").exists()
    assert "classad2" in loaded and "apppot.image" in loaded  # requests are parsed by HTCondor's library
    assert loaded & NEVER_FOR_TRANSFER == set()
    # The URL form, against a service that is not there (the imports are what is measured)
    sha = sha256_hex(images / "base.img")
    (sb / "in").write_text(f'[ Url = "apppot://x?sha256={sha}&from=http://127.0.0.1:9/x"; LocalFileName = "{sb}/x" ]')
    env = {**plugin_env, "APPPOT_FETCHD_SOCKET": os.fspath(tmp_path / "none.sock"),  # as 55-apppot-cache.conf
           "APPPOT_CACHE_DIR": os.fspath(tmp_path), "APPPOT_FETCH_TIMEOUT": "5"}  # puts them for the startd
    loaded = _modules_loaded_by(argv, env)
    assert "apppot.fetchd" in loaded and "socket" in loaded and "not running" in (sb / "out").read_text()
    assert loaded & NEVER_FOR_URL_FORM == set()


def sha256_hex(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_url_without_sha256_is_refused_saying_how_to_get_it(plugin_env, images, tmp_path):
    rc, ads, _ = run_plugin(plugin_env, tmp_path / "sb", [("apppot://deb?from=http%3A%2F%2Fh%2Fdeb.img", "deb")])
    assert rc == 1 and not ads[0]["TransferSuccess"]
    err = ads[0]["TransferError"]
    assert "sha256=" in err and "no digest, no download" in err and "sha256sum IMAGE" in err
    assert ads[0]["TransferErrorData"][0]["ErrorType"] == "Specification"
    assert sandbox_files(tmp_path / "sb") == set()


@pytest.mark.parametrize(("url", "why"), [
    ("apppot://d?sha256=abc&from=http://h/d", "64 hexadecimal"),
    (f"apppot://d?sha256={'a' * 64}&from=file:///etc/shadow", "not an http"),
])  # fmt: skip
def test_url_form_bad_options(url, why):
    with pytest.raises(plugin.TransferFailure, match=why):
        plugin.parse_url(url)


def test_url_form_parses():
    t = plugin.parse_url(f"apppot://deb?sha256={'A' * 64}&from=http%3A%2F%2Fh%3A8080%2Fi%2Fdeb.img&format=uml-cow")
    assert (t.ref, t.sha256, t.source, t.format) == ("deb", "a" * 64, "http://h:8080/i/deb.img", "uml-cow")


def test_digest_not_resident_nor_cached_fails_clearly(plugin_env, images, tmp_path):
    env = {**plugin_env, "APPPOT_FETCHD_SOCKET": os.fspath(tmp_path / "none.sock")}
    rc, ads, _ = run_plugin(env, tmp_path / "sb", [(f"apppot://nothere?sha256={'b' * 64}", "d")])
    assert rc == 1 and "fetch service is not running" in ads[0]["TransferError"]


@pytest.mark.parametrize(("text", "expected"), [
    ('[ A = "]" ] [ B = [ C = 1 ]; D = {1, 2} ]', ['[ A = "]" ]', "[ B = [ C = 1 ]; D = {1, 2} ]"]),
    ("\n[ 'odd]name' = \"x\\\"]\" ]\n", ["[ 'odd]name' = \"x\\\"]\" ]"]),
    ("[ A = 1 ] // a comment", None),  # anything between ads that is not blank: classad2.parseAds decides
    ("garbage [ A = 1 ]", None),
    ("[ A = 1 ]]", None),
    ('[ A = "unterminated ]', None),
])  # fmt: skip
def test_split_ads_splits_only_plain_sequences(text, expected):
    assert plugin.split_ads(text) == expected
    if expected is not None:  # and each piece is one ad, as classad2 reads the whole sequence
        assert [dict(classad2.ClassAd(p)) for p in expected] == [dict(ad) for ad in classad2.parseAds(text)]


def test_infile_with_comments_is_still_read_by_classad2(plugin_env, images, tmp_path):
    sb = tmp_path / "sb"
    text = f'// HTCondor writes none, but the language allows them\n[ Url = "apppot://base"; LocalFileName = "{sb}/d" ]'
    rc, ads, _ = run_plugin(plugin_env, sb, [], infile_text=text)
    assert rc == 0 and ads[0]["TransferSuccess"]


def test_format_uml_is_still_read_as_uml_cow(plugin_env, images, tmp_path):
    """`format=uml` was the option's first name: submit files that use it keep working."""
    rc, ads, _ = run_plugin(plugin_env, tmp_path / "sb", [("apppot://base?format=uml", "d")])
    assert rc == 0 and ads[0]["DeveloperData"]["OverlayFormat"] == "uml-cow"
    assert (tmp_path / "sb/d").read_bytes()[:4] == b"OOOM"  # UML COW magic, big-endian "MOOO"
