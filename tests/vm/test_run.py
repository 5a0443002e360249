"""`apppot run` with real boots: run modes, statuses, arguments, the job dir, stopping, failures."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vm.conftest import REPO, TEST_UID, apppot, vm_processes

ARGS_PROBE = ["sh", "-c", 'for a in "$@"; do printf "[%s]\\n" "$a"; done', "probe"]


def outcome(job_dir: Path) -> dict:
    return json.loads((job_dir / ".apppot" / "outcome.json").read_text())


@pytest.mark.parametrize("status", [0, 1, 42, 255])
def test_exit_status_passes_through(backend, tiny_image, job_dir, status):
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--", "sh", "-c", f"exit {status}", cwd=job_dir)
    assert res.returncode == status, res.stderr
    assert outcome(job_dir)["guest_status"] == status  # a real 255 from the job, not a crash


def test_outcome_times_the_runs_phases_by_the_host_clock(backend, tiny_image, job_dir):
    """outcome.json's times (bench/condor.py splits a pool job's phases by them): the VM starts, the
    job runs, the guest writes its status, the VM ends, in that order, on the host's clock."""
    before = time.time()
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--", "sh", "-c", "sleep 0.3; echo > mid",
                 cwd=job_dir)  # fmt: skip
    after = time.time()
    assert res.returncode == 0, res.stderr
    t = outcome(job_dir)["times"]
    mid = (job_dir / "mid").stat().st_mtime  # written by the job, through the job dir: the host's clock
    assert before < t["boot"] < mid <= t["status"] <= t["vm_exit"] < after, (before, t, mid, after)
    assert t["status"] - t["boot"] >= 0.3


def test_arguments_arrive_exactly(backend, tiny_image, job_dir):
    args = ["two words", "it's", 'say "hi"', "new\nline", "ünïcødé ✓", "", "$HOME `id` $(id)", "\\", "-x"]
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--", *ARGS_PROBE, *args, cwd=job_dir)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "".join(f"[{a}]\n" for a in args)


def test_stdout_and_stderr_are_separate_from_boot_noise(backend, tiny_image, job_dir):
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--", "sh", "-c", "echo out; echo err >&2",
                 cwd=job_dir)  # fmt: skip
    assert res.stdout == "out\n"
    assert res.stderr.splitlines()[-1] == "err"
    console = (job_dir / ".apppot" / "console.log").read_text()
    assert "Linux" in console or "Power down" in console  # the boot log is kept aside (UML | qemu, quiet)


# libvirt as an unprivileged submitter means qemu:///session, which needs a passwd entry for the uid
# (TEST_UID has none); as root the domain's qemu runs with root's DAC label: see test_backends.py.
@pytest.mark.backends("uml", "qemu")
def test_job_dir_files_in_and_out_with_the_submitters_owner(backend, tiny_image, job_dir):
    os.chown(job_dir, TEST_UID, TEST_UID)
    (job_dir / "input.txt").write_text("3\n1\n2\n")
    os.chown(job_dir / "input.txt", TEST_UID, TEST_UID)
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--", "sh", "-c",
                 "id -u > uid.txt; sort -n input.txt > sorted.txt; mkdir -p sub && echo x > sub/f",
                 cwd=job_dir, user=TEST_UID)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (job_dir / "sorted.txt").read_text() == "1\n2\n3\n"
    assert (job_dir / "uid.txt").read_text().strip() == str(TEST_UID)  # the guest user has our uid
    for f in ("sorted.txt", "uid.txt", "sub", "sub/f"):
        st = (job_dir / f).stat()
        assert (st.st_uid, st.st_gid) == (TEST_UID, TEST_UID), f


def test_guest_sees_only_the_job_dir(backend, tiny_image, job_dir):
    (job_dir / "marker").write_text("job")
    (job_dir / "escape").symlink_to("/etc")  # a symlink out of the job dir resolves in the guest
    # As guest root, mount the host file system again (hostfs under UML; under qemu the 9p share,
    # mounted at the job dir, is the only one), asking for / and for /etc explicitly; follow the symlink.
    hostfs, ninep = "mount -t hostfs none", "mount -t 9p -o trans=virtio,version=9p2000.L"
    script = (f"mkdir -p /mnt/a /mnt/b; {hostfs} /mnt/a 2>/dev/null || mount --bind /home/user/job /mnt/a; ls -a /mnt/a; "
              f"{{ {hostfs} /mnt/b -o /etc || {ninep},aname=/etc job /mnt/b; }} 2>/dev/null && cat /mnt/b/hostname; "
              "cat /mnt/a/escape/hostname /mnt/a/../../etc/hostname; true")  # fmt: skip
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--", "sh", "-c", script, cwd=job_dir)
    assert res.returncode == 0, res.stderr
    listing = res.stdout.split()
    assert "marker" in listing and "etc" not in listing and "usr" not in listing
    assert Path("/etc/hostname").read_text().strip() not in res.stdout.splitlines()[len(listing) :]


def test_apppot_run_script_in_the_job_dir(backend, tiny_image, job_dir):
    script = job_dir / "apppot-run"
    script.write_text("#!/bin/sh\necho from apppot-run in $PWD\nexit 7\n")
    script.chmod(0o755)
    res = apppot("run", "--backend", backend, "--image", tiny_image, cwd=job_dir)
    assert res.returncode == 7 and res.stdout == "from apppot-run in /home/user/job\n"


def test_autorun_in_the_image_and_a_kept_cow(backend, tiny_image, job_dir, tmp_path):
    cow = tmp_path / "my.cow"
    make = "printf '#!/bin/sh\\necho autorun\\nexit 5\\n' > /home/user/apppot-autorun; chmod +x /home/user/apppot-autorun"
    res = apppot("run", "--backend", backend, "--apppot", f"{cow},{tiny_image}", "--", "sh", "-c", make, cwd=job_dir)
    assert res.returncode == 0, res.stderr
    assert cow.exists()  # --apppot keeps the writable layer: changes persist
    res = apppot("run", "--backend", backend, "--apppot", f"{cow},{tiny_image}", cwd=job_dir)
    assert res.returncode == 5 and res.stdout == "autorun\n"
    # the command line beats apppot-run beats autorun
    (job_dir / "apppot-run").write_text("#!/bin/sh\nexit 6\n")
    (job_dir / "apppot-run").chmod(0o755)
    assert apppot("run", "--backend", backend, "--apppot", f"{cow},{tiny_image}", cwd=job_dir).returncode == 6
    assert apppot("run", "--backend", backend, "--apppot", f"{cow},{tiny_image}", "--", "true",
                  cwd=job_dir).returncode == 0  # fmt: skip


def test_nothing_to_run_is_a_clear_error(backend, tiny_image, job_dir):
    res = apppot("run", "--backend", backend, "--image", tiny_image, cwd=job_dir)
    assert res.returncode == 125
    assert "nothing to run" in res.stderr and "apppot-run" in res.stderr


@pytest.mark.backends("uml", "qemu")  # libvirt: the console is a file, not our terminal
def test_interactive_shell_on_a_terminal(backend, tiny_image, job_dir):
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(job_dir)
        os.environ["PYTHONPATH"] = os.fspath(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "apppot", "run", "--backend", backend,
                                  "--image", os.fspath(tiny_image)])  # fmt: skip
    out, sent, deadline = b"", False, time.monotonic() + 60
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if not sent and b"/home/user/job" in out.splitlines()[-1:][0] if out else False:  # the shell's prompt
            os.write(fd, b"echo interactive-$((6*7)); exit 9\n")
            sent = True
    else:
        os.kill(pid, signal.SIGKILL)
    _, wstatus = os.waitpid(pid, 0)
    assert b"interactive-42" in out, out[-2000:]
    assert os.waitstatus_to_exitcode(wstatus) == 9


def test_walltime_stops_the_vm(backend, tiny_image, job_dir):
    start = time.monotonic()
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--walltime", "3", "--grace", "2", "--id",
                 "wall-test", "--", "sleep", "100", cwd=job_dir)  # fmt: skip
    assert res.returncode == 124, res.stderr
    assert "walltime" in res.stderr
    assert time.monotonic() - start < 30
    assert vm_processes("wall-test") == []


def test_sigterm_stops_the_job_politely(backend, tiny_image, job_dir):
    job = 'trap "echo got TERM; exit 143" TERM; echo started; sleep 100 & wait'
    argv = [sys.executable, "-m", "apppot", "run", "--backend", backend, "--image", os.fspath(tiny_image),
            "--id", "term-test", "--grace", "10", "--", "sh", "-c", job]  # fmt: skip
    p = subprocess.Popen(argv, cwd=job_dir, env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None
    assert p.stdout.readline() == "started\n"  # the job is running in the guest
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)  # what HTCondor does on eviction
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10, "the guest did not stop within the grace period"
    assert p.returncode == 143, err
    assert "got TERM" in out
    assert vm_processes("term-test") == []


def test_sigkill_of_apppot_takes_the_vm_with_it(backend, tiny_image, job_dir, tmp_path):
    """The batch system's last resort: apppot itself gets SIGKILL and cannot clean up. The VM and
    every host process it forked must still go (PDEATHSIG; UML's helpers: kernel/patches/0003), and
    so must its run dir with the guest's root-disk layer (proc.DirReaper)."""
    vm_id = f"sigkill-{backend}"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    argv = [sys.executable, "-m", "apppot", "run", "--backend", backend, "--image", os.fspath(tiny_image),
            "--id", vm_id, "--", "sh", "-c", "echo started > /root/written; echo started; sleep 100"]  # fmt: skip
    p = subprocess.Popen(argv, cwd=job_dir, env={**os.environ, "PYTHONPATH": os.fspath(REPO), "TMPDIR": os.fspath(tmpdir)},
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == "started\n"
    assert vm_processes(vm_id), "the VM's processes should be visible while it runs"
    rundirs = list(tmpdir.glob(f"apppot-{vm_id}-*"))
    assert len(rundirs) == 1 and (rundirs[0] / "root.cow").is_file(), rundirs
    p.kill()
    p.wait()
    deadline = time.monotonic() + 15
    while (vm_processes(vm_id) or rundirs[0].exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm_processes(vm_id) == []
    assert not rundirs[0].exists(), sorted(p.name for p in rundirs[0].iterdir())


def test_job_ignoring_sigterm_is_killed_after_the_grace_period(backend, tiny_image, job_dir):
    argv = [sys.executable, "-m", "apppot", "run", "--backend", backend, "--image", os.fspath(tiny_image),
            "--id", "kill-test", "--grace", "2", "--", "sh", "-c", 'trap "" TERM; echo started; sleep 100']  # fmt: skip
    p = subprocess.Popen(argv, cwd=job_dir, env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == "started\n"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 255 and "stop request" in err
    assert vm_processes("kill-test") == []


def test_guest_kernel_panic_is_reported(backend, tiny_image, job_dir):
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--id", "panic-test", "--", "sh", "-c",
                 "echo c > /proc/sysrq-trigger", cwd=job_dir)  # fmt: skip
    assert res.returncode == 255
    assert "without the guest reporting an exit status" in res.stderr
    assert "panic" in res.stderr.lower() or "sysrq" in res.stderr.lower()  # the console tail is shown
    assert outcome(job_dir)["guest_status"] is None
    assert vm_processes("panic-test") == []


@pytest.mark.backends("uml")  # the UML COW format; qemu's staging is test_backends.py's
def test_disk_staged_by_the_plugin_in_uml_format(backend, tiny_image, job_dir):
    env = {**os.environ, "APPPOT_IMAGE_PATH": os.fspath(tiny_image.parent), "PYTHONPATH": os.fspath(REPO),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    name = tiny_image.name
    subprocess.run([REPO / "plugins/apppot_plugin", f"apppot://{name}?format=uml-cow", job_dir / name], env=env,
                   check=True, capture_output=True)  # fmt: skip
    res = apppot("run", "--backend", backend, "--image", name, "--discard-disk", "--", "sh", "-c",
                 "echo staged > /root/x && cat /root/x", cwd=job_dir)  # fmt: skip
    assert res.returncode == 0 and res.stdout == "staged\n", res.stderr
    assert not (job_dir / name).exists()  # --discard-disk: the COW file does not go back as output


@pytest.mark.parametrize("args, message", [
    (["--kernel", "/nonexistent/linux"], "not found"),
    (["--image", "/nonexistent.img"], "does not exist"),
    (["--mem", "8G"], "max_map_count"),
])  # fmt: skip
def test_checks_before_boot(tiny_image, job_dir, args, message):
    if "--image" not in args:
        args = ["--image", os.fspath(tiny_image), *args]
    res = apppot("run", *args, "--", "true", cwd=job_dir)
    assert res.returncode == 125 and message in res.stderr, res.stderr
    assert not (job_dir / ".apppot" / "params").exists()  # nothing half-written is left


def test_memory_file_directory_too_small(tiny_image, job_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", small], check=True)
    try:
        res = apppot("run", "--image", tiny_image, "--mem", "64M", "--", "true", cwd=job_dir,
                     env={**os.environ, "PYTHONPATH": os.fspath(REPO), "APPPOT_MEMDIR": os.fspath(small),
                          "TMPDIR": os.fspath(small)})  # fmt: skip
    finally:
        subprocess.run(["umount", small], check=True)
    assert res.returncode == 125 and "--mem" in res.stderr and "MiB free" in res.stderr, res.stderr


def test_qcow2_overlay_given_to_uml_says_which_url_to_use(tiny_image, job_dir):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", tiny_image, job_dir / "disk"],
                   check=True)  # fmt: skip
    res = apppot("run", "--image", job_dir / "disk", "--", "true", cwd=job_dir)
    assert res.returncode == 125 and "format=uml-cow" in res.stderr


def test_guest_planting_symlinks_and_fifos_in_the_control_dir(backend, tiny_image, job_dir, open_tmp):
    """The host side never follows what the guest leaves in .apppot: a symlink to /dev/zero as its
    stdout (read naively, it never ends), a FIFO as its stderr (an open that blocks), a symlink where
    the host writes outcome.json. The run ends with the guest's status; the canary is untouched."""
    canary = open_tmp / "canary"
    canary.write_text("keep\n")
    # (9p refuses mkfifo; UML's hostfs makes a real FIFO on the host)
    script = (f"cd .apppot; rm -f stdout; ln -s /dev/zero stdout; rm -f stderr; mkfifo stderr 2>/dev/null; "
              f"ln -s {canary} outcome.json; exit 3")  # fmt: skip
    res = apppot("run", "--backend", backend, "--image", tiny_image, "--", "sh", "-c", script, cwd=job_dir, timeout=90)
    assert res.returncode == 3, res.stderr
    assert canary.read_text() == "keep\n"
    assert outcome(job_dir)["guest_status"] == 3  # written by rename over the guest's symlink
    assert not (job_dir / ".apppot" / "outcome.json").is_symlink()
