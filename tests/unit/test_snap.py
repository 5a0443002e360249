"""apppot-snap on temporary roots (no VM): base/changes/merge round trips, wrong bases, hostile tarballs.

Every test runs twice: under dash with the host's GNU tools (what Debian images have) and under
busybox sh with nothing but busybox applets on PATH (what the tiny image has).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAP = REPO / "apppot" / "guest" / "apppot-snap"
EXCLUDE = REPO / "apppot" / "guest" / "apppot-snap.exclude"
IS_ROOT = os.geteuid() == 0


Snap = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def busybox_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH directory holding only busybox applets, like the tiny image's /bin."""
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox is not installed (make test installs busybox-static)"
    d = tmp_path_factory.mktemp("busybox-bin")
    for applet in subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split():
        (d / applet).symlink_to(busybox)
    return d


@pytest.fixture(params=["gnu", "busybox"])
def snap(request: pytest.FixtureRequest, tmp_path: Path) -> Snap:
    """apppot-snap ARGS..., run under dash + GNU tools or busybox sh + busybox applets."""
    env = dict(os.environ, TMPDIR=os.fspath(tmp_path))
    if request.param == "gnu":
        assert shutil.which("dash") is not None, "dash is not installed"
        argv = ["dash", os.fspath(SNAP)]
    else:
        bindir = request.getfixturevalue("busybox_bin")
        env["PATH"] = os.fspath(bindir)
        argv = [os.fspath(bindir / "sh"), os.fspath(SNAP)]

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(argv + list(args), capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
        if check and res.returncode != 0:
            pytest.fail(f"apppot-snap {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
        return res

    return run


# --- trees ----------------------------------------------------------------------------------------


def make_base(root: Path) -> Path:
    """A small root file system with every kind of entry apppot-snap handles."""
    for d in ("etc/apppot", "usr/bin", "usr/share/doc/pkg", "usr/share/old/sub", "home/user/job", "tmp",
              "var/log", "var/lib", "opt/keep", "proc"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(EXCLUDE, root / "etc/apppot/snap.exclude")
    (root / "etc/motd").write_text("welcome\n")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (root / "usr/share/doc/pkg/README").write_text("docs\n")
    (root / "usr/share/old/sub/file").write_text("old\n")
    (root / "usr/share/old/top").write_text("old top\n")
    (root / "usr/bin/tool").write_text("#!/bin/sh\necho tool\n")
    (root / "usr/bin/tool").chmod(0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
    (root / "usr/bin/tool-symlink").symlink_to("tool")
    (root / "usr/bin/to-rename").write_text("rename me\n")
    (root / "opt/keep/name with spaces, 'quotes' & ünïcödé\\").write_text("odd name\n")
    (root / "opt/keep/su").write_text("setuid\n")
    (root / "opt/keep/su").chmod(0o4755)
    (root / "home/user/.profile").write_text("PATH=$PATH\n")
    if IS_ROOT:
        for p in (root / "home/user", root / "home/user/.profile"):
            os.chown(p, 1000, 1000)
    (root / "var/log/boot.log").write_text("log\n")
    for dirpath, dirnames, filenames in os.walk(root):  # an old, fixed time: mtimes then tell
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    return root


def copy_tree(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", os.fspath(src), os.fspath(dst)], check=True)  # keeps hard links
    return dst


EXCLUDED = ("var/lib/apppot", "tmp", "var/log", "proc", "home/user/job")


def tree_state(root: Path, *, everything: bool = False) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, mtime, content digest | link target, hard-link partners)."""
    entries: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = os.fspath(path.relative_to(root))
            if not everything and any(rel == e or rel.startswith(e + "/") for e in EXCLUDED):
                continue
            if rel == "var/lib/apppot":  # apppot-snap's own state dir: merge stages in it
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = "l", os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                what = "d", ""
            else:
                what = "f", hashlib.sha256(path.read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            mtime = 0 if what[0] == "l" else int(st.st_mtime)  # busybox tar keeps no symlink mtimes (nor do we)
            entries[rel] = (what[0], stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, what[1], st.st_ino)
    links = {ino: tuple(sorted(names)) for ino, names in inodes.items()}
    return {p: e[:-1] + (links.get(e[-1], ()),) for p, e in entries.items()}


def modify(root: Path) -> None:
    """Every kind of change: add, modify, delete, chmod, chown, symlink, hard link, rename, rmdir, retype."""
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/hello").write_text("#!/bin/sh\necho hello\n")
    (root / "usr/local/bin/hello").chmod(0o755)
    (root / "etc/motd").write_text("changed\n")  # modify
    (root / "usr/share/doc/pkg/README").unlink()  # delete
    shutil.rmtree(root / "usr/share/old")  # directory removal, with contents
    (root / "opt/keep/su").chmod(0o755)  # chmod (drops setuid)
    if IS_ROOT:
        os.chown(root / "etc/motd", 1000, 100)  # chown
    (root / "usr/bin/tool-symlink").unlink()
    (root / "usr/bin/tool-symlink").symlink_to("/usr/local/bin/hello")  # retarget a symlink
    (root / "usr/local/bin/hi").symlink_to("hello")  # new symlink
    os.link(root / "usr/bin/tool", root / "usr/local/bin/tool-link3")  # new hard link to an old file
    os.link(root / "usr/local/bin/hello", root / "usr/local/bin/hello-again")  # hard links among new files
    (root / "usr/bin/to-rename").rename(root / "usr/bin/renamed")  # rename
    (root / "opt/keep/name with spaces, 'quotes' & ünïcödé\\").write_text("odd, changed\n")
    (root / "opt/was-file").write_text("x")
    (root / "opt/was-file").unlink()
    (root / "opt/was-file").mkdir()  # new dir
    (root / "opt/keep").rename(root / "opt/kept")  # rename a directory
    (root / "tmp/scratch").write_text("excluded\n")  # excluded: never shipped
    (root / "var/log/boot.log").write_text("more log\n")
    (root / "home/user/job/output").write_text("the host's\n")


@pytest.fixture
def trees(tmp_path: Path, snap: Snap) -> tuple[Path, Path]:
    """(work, pristine): the same base, recorded once; `work` is the one the user changes."""
    work = make_base(tmp_path / "work")
    snap("base", "--root", os.fspath(work), "--label", "test base")
    return work, copy_tree(work, tmp_path / "pristine")


def changes(snap: Snap, root: Path, out: Path) -> Path:
    snap("changes", "--root", os.fspath(root), "-o", os.fspath(out))
    return out


# --- round trips ----------------------------------------------------------------------------------


def test_fresh_base_has_no_changes(snap: Snap, trees: tuple[Path, Path]) -> None:
    work, _ = trees
    assert snap("diff", "--root", os.fspath(work)).stdout == ""


def test_diff_lists_additions_modifications_deletions(snap: Snap, trees: tuple[Path, Path]) -> None:
    work, _ = trees
    modify(work)
    lines = set(snap("diff", "--root", os.fspath(work)).stdout.splitlines())
    assert {"A usr/local/bin/hello", "M etc/motd", "D usr/share/doc/pkg/README", "D usr/share/old",
            "D usr/share/old/sub/file", "A opt/kept/su", "M usr/bin/tool-symlink", "A usr/bin/renamed",
            "D usr/bin/to-rename", "D opt/keep", "A opt/was-file"} <= lines  # fmt: skip
    assert not any("tmp/" in x or "var/log" in x or "home/user/job" in x for x in lines)
    assert "M usr/bin/tool" not in lines  # only its link count changed


def test_merge_reproduces_every_change_exactly(snap: Snap, trees: tuple[Path, Path], tmp_path: Path) -> None:
    work, pristine = trees
    modify(work)
    tarball = changes(snap, work, tmp_path / "changes.tar.gz")
    res = snap("merge", "--root", os.fspath(pristine), os.fspath(tarball))
    assert "merged" in res.stderr
    assert tree_state(pristine) == tree_state(work)
    # excluded paths stay as the base had them
    assert not (pristine / "tmp/scratch").exists()
    assert (pristine / "var/log/boot.log").read_text() == "log\n"
    # and the merged tree now differs from its base exactly as `work` does
    assert snap("diff", "--root", os.fspath(pristine)).stdout == snap("diff", "--root", os.fspath(work)).stdout


def test_merge_keeps_untouched_hard_link_partners(snap: Snap, trees: tuple[Path, Path], tmp_path: Path) -> None:
    work, pristine = trees
    (work / "usr/bin/tool").unlink()  # break the pair: tool gets new contents, tool-hardlink keeps the old
    (work / "usr/bin/tool").write_text("new tool\n")
    snap("merge", "--root", os.fspath(pristine), os.fspath(changes(snap, work, tmp_path / "c.tgz")))
    assert (pristine / "usr/bin/tool").read_text() == "new tool\n"
    assert (pristine / "usr/bin/tool-hardlink").read_text() == "#!/bin/sh\necho tool\n"
    assert tree_state(pristine) == tree_state(work)


def test_type_changes(snap: Snap, trees: tuple[Path, Path], tmp_path: Path) -> None:
    work, pristine = trees
    (work / "etc/motd").unlink()
    (work / "etc/motd").mkdir()  # file -> dir
    (work / "etc/motd/inner").write_text("inner\n")
    shutil.rmtree(work / "usr/share/doc")
    (work / "usr/share/doc").symlink_to("/usr/local/doc")  # dir -> symlink
    (work / "usr/bin/tool-symlink").unlink()
    (work / "usr/bin/tool-symlink").write_text("now a file\n")  # symlink -> file
    snap("merge", "--root", os.fspath(pristine), os.fspath(changes(snap, work, tmp_path / "c.tgz")))
    assert tree_state(pristine) == tree_state(work)


def test_same_size_same_mtime_modification_is_found(snap: Snap, trees: tuple[Path, Path]) -> None:
    """`cp -p`-style edits keep size and mtime; the digest still sees them."""
    work, _ = trees
    motd = work / "etc/motd"
    st = motd.stat()
    motd.write_text("WELCOME\n")
    os.utime(motd, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "M etc/motd" in snap("diff", "--root", os.fspath(work)).stdout.splitlines()
    motd.write_text("welcome\n")  # back to the base's contents: no change after all
    os.utime(motd, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert snap("diff", "--root", os.fspath(work)).stdout == ""


def test_changes_is_default_output_in_cwd_and_lists_base(snap: Snap, trees: tuple[Path, Path], tmp_path: Path) -> None:
    work, _ = trees
    modify(work)
    res = snap("changes", "--root", os.fspath(work))
    out = tmp_path / "apppot-changes.tar.gz"
    with tarfile.open(out) as tf:
        names = tf.getnames()
        base = tf.extractfile(".apppot-snap/base").read().decode()  # type: ignore[union-attr]
        deleted = tf.extractfile(".apppot-snap/deleted").read().decode().splitlines()  # type: ignore[union-attr]
    assert names[0] == ".apppot-snap/format"
    assert all(n.startswith((".apppot-snap/", "root/")) for n in names)
    assert "label=test base" in base and base.split("\n")[0] in res.stderr.replace("base ", "id=")
    assert "usr/share/doc/pkg/README" in deleted and "usr/bin/to-rename" in deleted
    assert "root/tmp/scratch" not in names and "root/var/log/boot.log" not in names


# --- base identity ---------------------------------------------------------------------------------


def test_wrong_base_is_refused_naming_both(snap: Snap, trees: tuple[Path, Path], tmp_path: Path) -> None:
    work, pristine = trees
    modify(work)
    tarball = changes(snap, work, tmp_path / "c.tgz")
    snap("base", "--root", os.fspath(pristine), "--label", "other base")  # a new base: a new id
    mine = (work / "var/lib/apppot/snap.id").read_text().split("\n")[0].removeprefix("id=")
    theirs = (pristine / "var/lib/apppot/snap.id").read_text().split("\n")[0].removeprefix("id=")
    before = tree_state(pristine, everything=True)
    res = snap("merge", "--root", os.fspath(pristine), os.fspath(tarball), check=False)
    assert res.returncode != 0
    assert mine in res.stderr and theirs in res.stderr and "--force" in res.stderr
    assert "test base" in res.stderr and "other base" in res.stderr
    assert tree_state(pristine, everything=True) == before
    res = snap("merge", "--force", "--root", os.fspath(pristine), os.fspath(tarball))
    assert "warning" in res.stderr
    assert tree_state(pristine) == tree_state(work)


def test_image_without_base_is_refused(snap: Snap, tmp_path: Path, trees: tuple[Path, Path]) -> None:
    work, _ = trees
    modify(work)
    tarball = changes(snap, work, tmp_path / "c.tgz")
    bare = make_base(tmp_path / "bare")
    res = snap("merge", "--root", os.fspath(bare), os.fspath(tarball), check=False)
    assert res.returncode != 0 and "no recorded base" in res.stderr
    res = snap("changes", "--root", os.fspath(bare), check=False)
    assert res.returncode != 0 and "apppot-snap base" in res.stderr


# --- broken and hostile tarballs ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_tarball_changes_nothing(snap: Snap, trees: tuple[Path, Path], tmp_path: Path, damage: str) -> None:
    work, pristine = trees
    modify(work)
    (work / "usr/share/big").write_bytes(os.urandom(200_000))  # so the damage lands in file data
    data = bytearray(changes(snap, work, tmp_path / "c.tgz").read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"not a tarball at all\n" * 100)
    else:
        data = bytearray()
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(bytes(data))
    before = tree_state(pristine, everything=True)
    res = snap("merge", "--root", os.fspath(pristine), os.fspath(bad), check=False)
    assert res.returncode != 0, res.stderr
    assert "nothing was changed" in res.stderr or "cannot read" in res.stderr
    assert tree_state(pristine, everything=True) == before


def hostile(path: Path, base_id_file: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
            deleted: str = "") -> Path:  # fmt: skip
    """A changes tarball that claims the right base (anyone can copy an id) with the given members."""
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        for name, data in ((".apppot-snap/format", b"apppot-snap 1\n"), (".apppot-snap/base", base_id_file.read_bytes()),
                           (".apppot-snap/deleted", deleted.encode())):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info, payload in members:
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"pwned\n", link: str = "",
           mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the guest root that no merge may touch."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_text("precious\n")
    return d


HOSTILE = {
    "absolute name": lambda o: [member("/tmp/abs-evil")],
    "dot-dot name": lambda o: [member("root/../../outside/evil")],
    "dot-dot inside root": lambda o: [member("root/usr/../../../outside/evil")],
    "member outside root/": lambda o: [member("elsewhere/evil")],
    "symlink then write through it": lambda o: [member("root/lnk", tarfile.SYMTYPE, link=os.fspath(o)),
                                                 member("root/lnk/evil")],
    "relative symlink then write through it": lambda o: [member("root/usr/lnk", tarfile.SYMTYPE, link="../../outside"),
                                                          member("root/usr/lnk/victim")],
    "hard link to an absolute outside path": lambda o: [member("root/usr/hl", tarfile.LNKTYPE, link=os.fspath(o / "victim"))],
    "hard link out with dot-dot": lambda o: [member("root/usr/hl", tarfile.LNKTYPE, link="../outside/victim")],
    "hard link to a metadata member": lambda o: [member("root/usr/hl", tarfile.LNKTYPE, link=".apppot-snap/base")],
    "character device": lambda o: [member("root/usr/null", tarfile.CHRTYPE)],
    "block device": lambda o: [member("root/usr/disk", tarfile.BLKTYPE)],
    "fifo": lambda o: [member("root/usr/fifo", tarfile.FIFOTYPE)],
    "duplicate: symlink then file": lambda o: [member("root/usr/x", tarfile.SYMTYPE, link=os.fspath(o / "victim")),
                                               member("root/usr/x")],
    "excluded path": lambda o: [member("root/proc/sysrq-trigger")],
    "into the job directory": lambda o: [member("root/home/user/job/evil")],
    "over apppot's state": lambda o: [member("root/var/lib/apppot/snap.id")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tarball_is_rejected(snap: Snap, trees: tuple[Path, Path], tmp_path: Path, outside: Path,
                                     case: str) -> None:  # fmt: skip
    _, pristine = trees
    tarball = hostile(tmp_path / "evil.tgz", pristine / "var/lib/apppot/snap.id", HOSTILE[case](outside))
    before, outside_before = tree_state(pristine, everything=True), tree_state(outside, everything=True)
    res = snap("merge", "--root", os.fspath(pristine), os.fspath(tarball), check=False)
    assert res.returncode != 0, f"accepted: {res.stderr}"
    assert "nothing was changed" in res.stderr
    assert tree_state(pristine, everything=True) == before
    assert tree_state(outside, everything=True) == outside_before
    assert not (tmp_path / "tmp/abs-evil").exists() and not Path("/tmp/abs-evil").exists()


@pytest.mark.parametrize("deleted", ["../outside/victim", "/etc/motd", "usr/../../outside/victim", ".", "proc"])
def test_hostile_deletions_are_rejected(snap: Snap, trees: tuple[Path, Path], tmp_path: Path, outside: Path,
                                        deleted: str) -> None:  # fmt: skip
    _, pristine = trees
    tarball = hostile(tmp_path / "evil.tgz", pristine / "var/lib/apppot/snap.id", [], deleted=deleted + "\n")
    before = tree_state(pristine, everything=True)
    res = snap("merge", "--root", os.fspath(pristine), os.fspath(tarball), check=False)
    assert res.returncode != 0 and "nothing was changed" in res.stderr
    assert tree_state(pristine, everything=True) == before
    assert (outside / "victim").read_text() == "precious\n"


def test_symlinked_parent_in_target_is_never_followed(snap: Snap, trees: tuple[Path, Path], tmp_path: Path,
                                                      outside: Path) -> None:  # fmt: skip
    """The image has /opt/keep as a symlink out (another base, say): neither writes nor deletions go through it."""
    work, pristine = trees
    (work / "opt/keep/new").write_text("new\n")
    (work / "opt/keep/su").unlink()
    tarball = changes(snap, work, tmp_path / "c.tgz")
    shutil.rmtree(pristine / "opt/keep")
    (pristine / "opt/keep").symlink_to(outside)
    (outside / "su").write_text("outside su\n")
    before = tree_state(pristine, everything=True)
    res = snap("merge", "--root", os.fspath(pristine), os.fspath(tarball), check=False)
    assert res.returncode != 0 and "symlink" in res.stderr and "nothing was changed" in res.stderr
    assert tree_state(pristine, everything=True) == before
    # --force replaces the symlink by the directory, and still touches nothing outside
    outside_before = tree_state(outside, everything=True)
    snap("merge", "--force", "--root", os.fspath(pristine), os.fspath(tarball))
    assert (pristine / "opt/keep").is_dir() and not (pristine / "opt/keep").is_symlink()
    assert (pristine / "opt/keep/new").read_text() == "new\n"
    assert tree_state(outside, everything=True) == outside_before


# --- build integration and lint --------------------------------------------------------------------


def test_shellcheck() -> None:
    assert shutil.which("shellcheck"), "shellcheck is not installed (make test installs it)"
    res = subprocess.run(["shellcheck", "-s", "sh", os.fspath(SNAP)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout
