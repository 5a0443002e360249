"""`apppot submit --wait`: the job is followed through its event log, the final ad read once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import classad2
import htcondor2
import pytest

from apppot import submit
from apppot.errors import ApppotError

# Events as HTCondor 23.9's schedd, shadow and starter write them (copied from the test pool's logs).
SUBMIT = """000 (042.000.000) 2026-12-04 15:59:03 Job submitted from host: <127.0.0.1:9618?addrs=127.0.0.1-9618>
...
"""
EXECUTE = """001 (042.000.000) 2026-12-04 15:59:06 Job executing on host: <127.0.0.1:9618?addrs=127.0.0.1-9618>
	SlotName: slot1_2@vm
...
040 (042.000.000) 2026-12-04 15:59:07 Started transferring output files
...
"""
TERMINATED = """005 (042.000.000) 2026-12-04 15:59:07 Job terminated.
	(1) Normal termination (return value 42)
		Usr 0 00:00:00, Sys 0 00:00:00  -  Run Remote Usage
		Usr 0 00:00:00, Sys 0 00:00:00  -  Run Local Usage
		Usr 0 00:00:00, Sys 0 00:00:00  -  Total Remote Usage
		Usr 0 00:00:00, Sys 0 00:00:00  -  Total Local Usage
	158  -  Run Bytes Sent By Job
	570  -  Run Bytes Received By Job
	158  -  Total Bytes Sent By Job
	570  -  Total Bytes Received By Job
...
"""
HELD = """012 (042.000.000) 2026-12-04 15:44:28 Job was held.
	no image named 'nope' on this node
	Code 13 Subcode 1
...
"""
ABORTED = """009 (042.000.000) 2026-12-04 15:45:22 Job was aborted.
	via condor_rm (by user tester)
...
"""


class FakeSchedd:
    """The job's queue and history records: what `apppot submit` may still ask the schedd."""

    def __init__(self, log: Path) -> None:
        self.queue = [{"ClusterId": 42, "JobStatus": 1, "UserLog": str(log)}]
        self.history_ads: list[dict] = []
        self.queries = 0

    def query(self, constraint: str = "", projection: list[str] | None = None) -> list[dict]:
        assert constraint == "ClusterId == 42"
        self.queries += 1
        return [dict(ad) for ad in self.queue]

    def history(self, constraint: str, projection: list[str], match: int) -> list[dict]:
        return self.history_ads


def write_later(log: Path, *steps: tuple[float, str, object]) -> threading.Thread:
    """Append each event text after its delay, then run its effect on the schedd (if any)."""

    def run() -> None:
        for delay, text, effect in steps:
            time.sleep(delay)
            with log.open("a") as f:
                f.write(text)
            if callable(effect):
                effect()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait(schedd: FakeSchedd, tmp_path: Path, timeout_s: float = 20) -> submit.JobResult:
    return submit.wait_for(schedd, htcondor2, 42, universe="vanilla", job_dir=tmp_path, timeout_s=timeout_s,
                           spool=False)  # fmt: skip


def test_wait_follows_the_event_log_and_reads_the_final_ad(tmp_path: Path, capsys) -> None:
    log = tmp_path / "apppot.42.log"
    log.write_text(SUBMIT)
    schedd = FakeSchedd(log)

    def leaves_the_queue() -> None:
        schedd.queue = []
        schedd.history_ads = [{"ClusterId": 42, "JobStatus": 4, "ExitCode": 42}]

    t0 = time.monotonic()
    write_later(log, (0.3, EXECUTE, None), (0.5, TERMINATED, leaves_the_queue))
    res = wait(schedd, tmp_path)
    assert res.exit_code == 42 and res.describe() == "job 42.0 completed: exit code 42"
    assert time.monotonic() - t0 >= 0.8
    assert schedd.queries <= 3  # the UserLog, then the final ad: no polling while the job runs
    assert capsys.readouterr().err.splitlines() == [f"apppot submit: job 42.0 {s}" for s in
                                                     ("idle", "running", "transferring output")]  # fmt: skip


def test_held_job_is_reported_at_once_with_its_reason(tmp_path: Path) -> None:
    log = tmp_path / "apppot.42.log"
    log.write_text(SUBMIT)
    schedd = FakeSchedd(log)

    def held() -> None:
        schedd.queue = [{"ClusterId": 42, "JobStatus": 5, "HoldReason": "no image named 'nope' on this node",
                         "HoldReasonCode": 13}]  # fmt: skip

    write_later(log, (0.3, HELD, held))
    res = wait(schedd, tmp_path)
    assert res.status == htcondor2.JobStatus.HELD and res.exit_code is None
    assert res.describe() == "job 42.0 held: no image named 'nope' on this node"


def test_removed_job_reports_why(tmp_path: Path) -> None:
    log = tmp_path / "apppot.42.log"
    log.write_text(SUBMIT)
    schedd = FakeSchedd(log)

    def removed() -> None:
        schedd.queue = []
        schedd.history_ads = [{"ClusterId": 42, "JobStatus": 3, "RemoveReason": "via condor_rm (by user tester)"}]

    write_later(log, (0.3, ABORTED, removed))
    res = wait(schedd, tmp_path)
    assert res.describe() == "job 42.0 removed: via condor_rm (by user tester)" and res.exit_code is None


def test_timeout_is_an_error_naming_the_job(tmp_path: Path) -> None:
    log = tmp_path / "apppot.42.log"
    log.write_text(SUBMIT)
    t0 = time.monotonic()
    with pytest.raises(ApppotError, match=r"job 42.0 did not finish within 1 s"):
        wait(FakeSchedd(log), tmp_path, timeout_s=1)
    assert time.monotonic() - t0 < 5


# --- the submit description: the templates, with their variables set -----------------------------


def _job(tmp_path: Path, universe: str, command: list[str], **kw) -> htcondor2.Submit:
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    opts = {"image": "tiny", "memory_mib": 128, "inputs": ["run.sh"], "changes": None, "job_dir": tmp_path, **kw}
    return submit.build_submit(universe=universe, command=command, **opts)


def test_vanilla_job_is_the_template_with_its_variables(tmp_path: Path) -> None:
    job = _job(tmp_path, "vanilla", ["./run.sh", "x y", "it's \"q\"", "$HOME", "$(HOME)"], walltime_s=90)
    assert job.expand("executable") == "$$(APPPOT_LAUNCHER)"  # the node's, from the matched slot
    assert job.expand("arguments") == ('"run --image tiny --discard-disk --mem 128M  --walltime 90 -- '
                                       """./run.sh 'x y' 'it''s ""q""' $HOME $(HOME)\"""")  # `$` stays literal
    assert job.expand("transfer_input_files") == "apppot://tiny?format=uml-cow, run.sh, "
    assert job.expand("request_memory") == "128 + 64"
    assert job.expand("initialdir") == str(tmp_path)
    assert "AppPotImages" in job.expand("requirements")
    assert _job(tmp_path, "vanilla", ["true"], launcher="/opt/x/bin/apppot").expand("executable") == "/opt/x/bin/apppot"


def test_image_url_job_fetches_into_the_node_cache(tmp_path: Path) -> None:
    sha = "ab" * 32
    job = _job(tmp_path, "vanilla", ["true"], image=None, image_url="http://h:8080/imgs/deb 12.img?v=1", sha256=sha.upper())
    enc = "http%3A%2F%2Fh%3A8080%2Fimgs%2Fdeb%2012.img%3Fv%3D1"
    assert job.expand("transfer_input_files") == f"apppot://deb_12.img?format=uml-cow&sha256={sha}&from={enc}, run.sh, "
    assert job.expand("arguments").startswith('"run --image deb_12.img ')
    assert "AppPotImages" not in job.expand("requirements")
    from apppot import plugin  # and the plugin reads back what the template wrote

    t = plugin.parse_url(job.expand("transfer_input_files").split(",")[0])
    assert (t.ref, t.sha256, t.source, t.format) == ("deb_12.img", sha, "http://h:8080/imgs/deb 12.img?v=1", "uml-cow")


@pytest.mark.parametrize(("kw", "why"), [
    ({"image_url": "http://h/i.img"}, "sha256sum IMAGE"),
    ({"image_url": "http://h/i.img", "sha256": "abc"}, "64 hexadecimal"),
    ({"image_url": "ftp://h/i.img", "sha256": "a" * 64}, "http://"),
    ({"sha256": "a" * 64}, "goes with --image-url"),
])  # fmt: skip
def test_image_url_needs_a_digest(tmp_path: Path, kw, why) -> None:
    with pytest.raises(ApppotError, match=why):
        _job(tmp_path, "vanilla", ["true"], **kw)


def test_vm_job_is_the_template_with_its_variables(tmp_path: Path) -> None:
    job = _job(tmp_path, "vm", ["sh", "-c", 'echo "a  b" $X'], walltime_s=600, changes=None)
    assert job.expand("MY.AppPotCommand") == classad2.quote("sh -c 'echo \"a  b\" $X'")
    assert job.expand("vm_memory") == "128" and job.expand("vm_disk") == "tiny:vda:w:qcow2"
    assert job.expand("periodic_remove") == "JobStatus == 2 && time() - EnteredCurrentStatus > 600"
    assert job.expand("on_exit_hold") == "AppPotExitCode =?= 125 && AppPotExitMessage =!= undefined"
    assert job.expand("MY.PostCmd") == '"$$(APPPOT_VM_POST)"'


def test_a_command_with_a_line_break_or_a_missing_input_is_refused_with_a_way_out(tmp_path: Path) -> None:
    with pytest.raises(ApppotError, match="line break.*apppot-run"):
        _job(tmp_path, "vanilla", ["sh", "-c", "echo a\necho b"])
    with pytest.raises(ApppotError, match="input file nope not found in the job directory"):
        _job(tmp_path, "vm", ["true"], inputs=["nope"])


def test_dry_run_prints_what_condor_submit_accepts(tmp_path: Path) -> None:
    job = _job(tmp_path, "vanilla", ["true"])
    again = htcondor2.Submit(str(job))  # the printed text parses back to the same job
    assert again.expand("arguments") == job.expand("arguments")
