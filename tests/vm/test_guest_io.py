"""Guest writes through UML's hostfs (the job dir) and ubd + COW (the root disk) arrive byte-exact,
with the same durability as before kernel/patches/0006 and 0007 batched them into large host writes.
Correctness only; the speed is bench/io.py's."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.vm.conftest import apppot

PAGE = 4096
# Random data written in odd-sized chunks (never page-aligned) and a hole, then read back in the guest.
UNALIGNED = r"""
set -e
dd if=/dev/urandom of=/tmp/src bs=4099 count=1500 2>/dev/null          # ~6 MiB, not a page multiple
dd if=/tmp/src of="$1" bs=12345 2>/dev/null                               # unaligned writes
dd if=/tmp/src of="$1" bs=777 count=3 seek=20000 conv=notrunc 2>/dev/null  # past EOF: a hole before it
md5sum </tmp/src | cut -d' ' -f1
"""


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def run_uml(*args: object, cwd: Path):
    return apppot("run", "--backend", "uml", *args, cwd=cwd)


def test_job_dir_writes_arrive_byte_exact(tiny_image: Path, job_dir: Path) -> None:
    """hostfs: large unaligned writes, a write past EOF, partial-page overwrites of a file the guest
    never read (only the bytes written may change), appends; the host sees exactly that."""
    existing = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: 2 pages and a partial one
    (job_dir / "existing.bin").write_bytes(existing)
    script = (
        UNALIGNED
        + r"""
printf 'XYZ' | dd of=existing.bin bs=1 seek=5000 conv=notrunc 2>/dev/null   # inside a page, never read
head -c 5000 /dev/zero | tr '\0' 'Q' | dd of=existing.bin bs=5000 seek=2 conv=notrunc 2>/dev/null
printf 'appended' >> existing.bin
"""
    )
    res = run_uml("--image", tiny_image, "--", "sh", "-c", script, "io", "out.bin", cwd=job_dir)
    assert res.returncode == 0, res.stderr
    src_md5 = res.stdout.split()[0]
    out = (job_dir / "out.bin").read_bytes()
    src_len = 4099 * 1500
    assert len(out) == 20000 * 777 + 3 * 777
    assert md5(out[:src_len]) == src_md5
    assert out[src_len : 20000 * 777] == bytes(20000 * 777 - src_len)  # the hole reads as zeros
    assert out[20000 * 777 :] == out[: 3 * 777]
    want = bytearray(existing)
    want[5000:5003] = b"XYZ"
    want[10000:15000] = b"Q" * 5000
    assert (job_dir / "existing.bin").read_bytes() == bytes(want) + b"appended"


def test_job_dir_writes_reach_the_host_without_sync(tiny_image: Path, job_dir: Path) -> None:
    """hostfs writes through: what write() returned is on the host even while the file is still open
    (closing it would flush) and the guest powers off at once (sysrq o: no sync, no status; 255)."""
    script = r"""
dd if=/dev/urandom of=/tmp/src bs=4099 count=1500 2>/dev/null
md5sum </tmp/src | cut -d' ' -f1
exec 3>"$1"                                   # held open by this shell until the VM is gone
dd if=/tmp/src bs=12345 2>/dev/null >&3
echo o > /proc/sysrq-trigger; sleep 10
"""
    res = run_uml("--image", tiny_image, "--", "sh", "-c", script, "io", "out.bin", cwd=job_dir)
    assert res.returncode == 255, res.stderr
    out = (job_dir / "out.bin").read_bytes()
    assert len(out) == 4099 * 1500
    assert md5(out) == res.stdout.split()[0]


def test_root_disk_writes_survive_a_drop_of_caches_and_a_hard_poweroff(tiny_image: Path, job_dir: Path,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    """ubd + COW: unaligned writes read back the same after the guest drops its page cache, and after
    `dd conv=fsync` and an immediate poweroff without sync, in the next boot of the same COW file
    (its data and its bitmap were on the host)."""
    cow = tmp_path / "root.cow"
    script = (
        UNALIGNED
        + r"""
echo 3 > /proc/sys/vm/drop_caches
head -c $((4099 * 1500)) "$1" | md5sum | cut -d' ' -f1
dd if=/tmp/src of=/root/synced bs=8191 conv=fsync 2>/dev/null
echo o > /proc/sysrq-trigger; sleep 10
"""
    )
    res = run_uml("--apppot", f"{cow},{tiny_image}", "--", "sh", "-c", script, "io", "/root/out.bin", cwd=job_dir)
    assert res.returncode == 255, res.stderr
    src_md5, reread_md5 = res.stdout.split()[:2]
    assert reread_md5 == src_md5
    res = run_uml("--apppot", f"{cow},{tiny_image}", "--", "md5sum", "/root/synced", cwd=job_dir)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == src_md5


def test_job_dir_large_writes_from_the_writers_pages(tiny_image: Path, job_dir: Path) -> None:
    """hostfs, writes of 64 KiB or more (kernel/patches/0008: straight from the writer's pages, past the
    guest's page cache): unaligned large writes, an overwrite of pages the guest has cached (its later
    read must see the new bytes), a large O_APPEND write, and a large write that starts inside a page of
    a host file the guest never read (the bytes before it stay); host and guest agree on every step."""
    src = os.urandom(4099 * 1500)
    (job_dir / "src.bin").write_bytes(src)
    existing = bytes(range(256)) * 40 + b"tail"
    (job_dir / "existing.bin").write_bytes(existing)
    script = r"""
set -e
cp src.bin /tmp/src
dd if=/tmp/src of="$1" bs=200003 2>/dev/null                               # large, unaligned
exec 4<"$1"                # hostfs drops a file's pages when its last user goes: keep one while it runs
md5sum <"$1" | cut -d' ' -f1                                                # the guest caches its pages
dd if=/tmp/src of="$1" bs=100001 count=3 seek=7 conv=notrunc 2>/dev/null   # over those cached pages
md5sum <"$1" | cut -d' ' -f1
dd if=/tmp/src bs=65536 count=2 2>/dev/null >>"$1"                          # O_APPEND
md5sum <"$1" | cut -d' ' -f1
exec 3<>existing.bin
dd bs=5000 count=1 <&3 >/dev/null 2>&1                                      # offset 5000, inside page 1
dd if=/tmp/src bs=70000 count=1 >&3 2>/dev/null
"""
    res = run_uml("--image", tiny_image, "--", "sh", "-c", script, "io", "out.bin", cwd=job_dir)
    assert res.returncode == 0, res.stderr
    overwritten = bytearray(src)
    overwritten[700007 : 700007 + 300003] = src[:300003]
    appended = bytes(overwritten) + src[: 2 * 65536]
    assert res.stdout.split() == [md5(src), md5(bytes(overwritten)), md5(appended)]
    assert (job_dir / "out.bin").read_bytes() == appended
    assert (job_dir / "existing.bin").read_bytes() == existing[:5000] + src[:70000]


def test_job_dir_large_writes_from_unaligned_buffers(debian_image: Path, job_dir: Path) -> None:
    """The same path when the writer's buffer starts inside a page (perl's syswrite from odd offsets of
    one buffer; busybox dd's buffers are page-aligned): each host write takes its bytes from there."""
    src = os.urandom(3 << 20)
    (job_dir / "src.bin").write_bytes(src)
    script = r"""
open(my $s, "<:raw", "src.bin") or die "src: $!"; local $/; my $d = <$s>;
open(my $f, ">:raw", "out.bin") or die "out: $!";
my $o = 0;
for my $n (70001, 131073, 196611, 65536, 1048577) {
    my $w = syswrite($f, $d, $n, $o); die "short write: $w of $n" unless $w == $n; $o += $n;
}
print "$o\n";
"""
    res = run_uml("--image", debian_image, "--", "perl", "-e", script, cwd=job_dir)
    assert res.returncode == 0, res.stderr
    total = int(res.stdout)
    assert total == 70001 + 131073 + 196611 + 65536 + 1048577
    assert (job_dir / "out.bin").read_bytes() == src[:total]
