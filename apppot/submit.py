"""`apppot submit`: an AppPot job to HTCondor (htcondor2 bindings), optionally waiting for its result.

The job is the one submit_templates/apppot-vanilla.sub and apppot-vm.sub describe: the template itself
is submitted, its variables set from the options. The image travels as an apppot:// URL (the execute
point stages a copy-on-write layer over its own base), the job directory's files as ordinary inputs.
Vanilla (default): `apppot run` boots the image under User-Mode Linux and the job's ExitCode is the
command's exit status. VM universe: qemu/libvirt through condor_vm-gahp; the guest's status comes back
as the job attribute AppPotExitCode and the file apppot.status (the VM universe's own ExitCode is always 0).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from apppot import options
from apppot.errors import ApppotError
from apppot.knobs import bindings

# Paths on the execute point, as its slot ad advertises them (50-apppot.conf, 60-apppot-vm.conf): the
# schedd fills in $$(...) from the matched slot, so any PREFIX the node's admin chose works.
LAUNCHER = "$$(APPPOT_LAUNCHER)"

HOLD_SPOOLING_INPUT = 16  # HoldReasonCode of a spooled job while its input is on the way


def condor_arguments(argv: Sequence[str]) -> str:
    """argv -> HTCondor's new-style `arguments` value: "..." with 'single quotes' around words that
    need them, ' doubled inside them and " doubled everywhere."""
    out = []
    for a in argv:
        if a == "" or any(c in a for c in " \t'\"\n"):
            a = "'" + a.replace("'", "''") + "'"
        out.append(a.replace('"', '""'))
    return '"' + " ".join(out) + '"'


def template_path(universe: str) -> Path:
    """submit_templates/apppot-UNIVERSE.sub: in the source tree, under PREFIX/share/apppot (make install),
    or under the Python prefix's share/apppot (the wheel)."""
    if universe not in ("vanilla", "vm"):
        raise ApppotError(f"unknown universe {universe!r}: vanilla or vm")
    here = Path(__file__).resolve().parent
    name = f"apppot-{universe}.sub"
    places = [here.parent / "submit_templates", here.parents[2] / "share/apppot/submit_templates",
              Path(sys.prefix) / "share/apppot/submit_templates"]  # fmt: skip
    for d in places:
        if (d / name).is_file():
            return d / name
    raise ApppotError(f"submit template {name} not found (looked in {', '.join(map(str, places))})",
                      hint="reinstall apppot: `make install` puts the templates under PREFIX/share/apppot")  # fmt: skip


def _macro(value: str) -> str:
    """VALUE as the right-hand side of a submit-language macro: one line, `$` taken literally."""
    if "\n" in value or "\r" in value:
        raise ApppotError(f"{value!r} contains a line break, which a submit description cannot carry",
                          hint="put the command in a script in the job directory (apppot-run) and run that")  # fmt: skip
    return value.replace("$", "$(DOLLAR)")


def image_from_url(url: str, sha256: str | None) -> tuple[str, str, str]:
    """--image-url URL --sha256 HEX -> (NAME, the URL percent-encoded for apppot://NAME?...&from=, HEX).
    NAME (the sandbox file, a label on the node) is the URL's last path component."""
    from urllib.parse import quote, urlsplit

    if not url.lower().startswith(("http://", "https://")):
        raise ApppotError(f"--image-url {url}: give an http:// or https:// URL")
    if not sha256 or len(sha256) != 64 or set(sha256.lower()) - set("0123456789abcdef"):
        raise ApppotError("--image-url needs --sha256 HEX (64 hexadecimal digits): no digest, no download",
                          hint="compute it with: sha256sum IMAGE")  # fmt: skip
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in urlsplit(url).path.rsplit("/", 1)[-1])
    # Encoded whole (no "/" or "&" left), so HTCondor names the sandbox file after NAME alone.
    return name.lstrip(".") or "image", quote(url, safe=""), sha256.lower()


def build_submit(*, image: str | None, command: Sequence[str], universe: str, memory_mib: int,
                 inputs: Sequence[str], changes: str | None, job_dir: Path, launcher: str = LAUNCHER,
                 walltime_s: float | None = None, image_url: str | None = None,
                 sha256: str | None = None) -> Any:  # fmt: skip
    """The job as submit_templates/apppot-UNIVERSE.sub describes it, with its variables set from these
    options (the template is the one description: condor_submit and `apppot submit` run the same job).
    image_url + sha256: an image the execute point fetches into its cache (vanilla only).
    Returns an htcondor2.Submit."""
    htcondor2, classad2 = bindings()
    url_macros: dict[str, str] = {}
    if image_url:
        if universe != "vanilla":
            raise ApppotError("--image-url works in the vanilla universe only", hint="drop --universe vm")
        name, encoded, digest = image_from_url(image_url, sha256)
        image = image or name
        url_macros = {"image_url": encoded, "image_sha256": digest}
    elif sha256:
        raise ApppotError("--sha256 goes with --image-url", hint="apppot submit --image-url URL --sha256 HEX ...")
    if image is None or "/" in image or "?" in image or not image:
        raise ApppotError(f"--image {image!r}: give the NAME of an image the execute points hold",
                          hint="condor_status -af AppPotImages lists them")  # fmt: skip
    files = [*inputs, *([changes] if changes else [])]
    for f in files:
        if "://" not in f and not (job_dir / f).exists():
            raise ApppotError(f"input file {f} not found in the job directory {job_dir}")
    template = template_path(universe)
    if universe == "vanilla":  # the words after `--` in the template's new-syntax `arguments`
        cmd = condor_arguments(command)[1:-1]
    else:  # the body of the template's +AppPotCommand string literal
        cmd = str(classad2.quote(shlex.join(command)))[1:-1] if command else ""
    macros = {"image": image, "mem": str(memory_mib), "cmd": cmd, "inputs": ", ".join(inputs), "changes": changes,
              "walltime": f"{walltime_s:g}" if walltime_s else None, "launcher": launcher if launcher != LAUNCHER else None}  # fmt: skip
    lines = [f"initialdir = {_macro(os.fspath(job_dir))}"]
    macros.update(url_macros)
    lines += [f"{k} = {_macro(v)}" for k, v in macros.items() if v]
    return htcondor2.Submit("\n".join(lines) + "\n" + template.read_text())


class JobResult:
    def __init__(self, cluster: int, ad: Any, universe: str, job_dir: Path) -> None:
        self.cluster, self.ad, self.universe, self.job_dir = cluster, ad, universe, job_dir

    @property
    def status(self) -> int:
        return int(self.ad.get("JobStatus", 0))

    @property
    def exit_code(self) -> int | None:
        """The guest command's exit status: ExitCode (vanilla) or AppPotExitCode (VM universe)."""
        if self.status != _job_status().COMPLETED:
            return None
        key = "AppPotExitCode" if self.universe == "vm" else "ExitCode"
        value = self.ad.get(key)
        return int(value) if isinstance(value, int) else None

    def describe(self) -> str:
        js = _job_status()
        name = {js.COMPLETED: "completed", js.HELD: "held", js.REMOVED: "removed"}.get(self.status, f"status {self.status}")
        text = f"job {self.cluster}.0 {name}"
        if self.status == js.COMPLETED:
            code = self.exit_code
            text += f": exit code {code if code is not None else 'unknown'}"
            if self.universe == "vm":
                text += " (AppPotExitCode; the VM universe's own ExitCode is always 0)"
        elif self.status == js.HELD:
            text += f": {self.ad.get('HoldReason')}"
        elif self.status == js.REMOVED:
            text += f": {self.ad.get('RemoveReason')}"
        return text


def _job_status() -> Any:
    return bindings()[0].JobStatus


def wait_for(schedd: Any, htcondor2: Any, cluster: int, *, universe: str, job_dir: Path, timeout_s: float,
             spool: bool, progress: bool = True) -> JobResult:  # fmt: skip
    """Wait until job CLUSTER.0 completed, was held or removed. It is followed through its event log
    (the `log` of the submit description), as HTCondor's own test fixtures do, rather than by asking
    the schedd over and over; the final ad (ExitCode ...) comes from the queue or the history."""
    deadline = time.monotonic() + timeout_s
    if spool:  # the event log of a spooled job is in the schedd's spool until the output is retrieved
        return _wait_spooled(schedd, htcondor2, cluster, universe=universe, job_dir=job_dir, deadline=deadline,
                             timeout_s=timeout_s, progress=progress)  # fmt: skip
    constraint = f"ClusterId == {cluster}"
    ads = schedd.query(constraint=constraint, projection=["UserLog"])
    log = ads[0].get("UserLog") if ads else None
    if not log:
        raise ApppotError(f"job {cluster}.0 has no event log (`log` in its submit description) to wait on")
    et, js = htcondor2.JobEventType, htcondor2.JobStatus
    names = {et.SUBMIT: "idle", et.EXECUTE: "running", et.JOB_EVICTED: "idle", et.JOB_RELEASED: "idle"}
    for event in job_events(htcondor2, job_dir / log, cluster, deadline):  # (UserLog is absolute)
        name = names.get(event.type)
        if event.type == et.FILE_TRANSFER and event.get("Type") == htcondor2.FileTransferEventType.OUT_STARTED:
            name = "transferring output"
        if progress and name:
            print(f"apppot submit: job {cluster}.0 {name}", file=sys.stderr, flush=True)
        if event.type == et.JOB_HELD:  # still in the queue, with the reason; the event has it too
            queued = schedd.query(constraint=constraint)
            held = queued[0] if queued and queued[0].get("JobStatus") == js.HELD else {
                "JobStatus": int(js.HELD), "HoldReason": event.get("HoldReason"),
                "HoldReasonCode": event.get("HoldReasonCode"), "HoldReasonSubCode": event.get("HoldReasonSubCode")}
            return JobResult(cluster, held, universe, job_dir)
        if event.type in (et.JOB_TERMINATED, et.JOB_ABORTED):
            ad = final_ad(schedd, htcondor2, cluster, deadline)
            if ad is not None:
                return JobResult(cluster, ad, universe, job_dir)
            break
    raise ApppotError(f"job {cluster}.0 did not finish within {timeout_s:g} s (still in the queue)",
                      hint=f"condor_q {cluster}; condor_rm {cluster} to give up")  # fmt: skip


def job_events(htcondor2: Any, log: Path, cluster: int, deadline: float) -> Iterator[Any]:
    """The events of CLUSTER in the event log LOG, as they are written, until the deadline."""
    while not log.exists():  # the schedd writes the submit event as it commits the job
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)
    jel = htcondor2.JobEventLog(os.fspath(log))
    while (remaining := deadline - time.monotonic()) > 0:
        for event in jel.events(stop_after=math.ceil(remaining)):  # waits for the next event, at most this long
            if event.cluster == cluster:
                yield event
            if time.monotonic() > deadline:
                return


def final_ad(schedd: Any, htcondor2: Any, cluster: int, deadline: float) -> Any | None:
    """The ad of a job that ended (its event is written): in the queue once it says so, or in the history."""
    constraint, js = f"ClusterId == {cluster}", htcondor2.JobStatus
    while True:
        ads = schedd.query(constraint=constraint)
        if ads and ads[0].get("JobStatus") in (js.COMPLETED, js.REMOVED):
            return ads[0]
        if not ads:
            hist = list(schedd.history(constraint, [], 1))
            if hist:
                return hist[0]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.25)  # the shadow has written the event; the schedd's record follows within moments


def _wait_spooled(schedd: Any, htcondor2: Any, cluster: int, *, universe: str, job_dir: Path, deadline: float,
                  timeout_s: float, progress: bool) -> JobResult:  # fmt: skip
    constraint, js = f"ClusterId == {cluster}", htcondor2.JobStatus
    last_status = None
    while True:
        ads = schedd.query(constraint=constraint)
        if ads:
            ad = ads[0]
            st = ad.get("JobStatus")
            if st != last_status and progress:
                names = {js.IDLE: "idle", js.RUNNING: "running", js.TRANSFERRING_OUTPUT: "transferring output"}
                if st in names:
                    print(f"apppot submit: job {cluster}.0 {names[st]}", file=sys.stderr, flush=True)
                last_status = st
            if st == js.HELD and ad.get("HoldReasonCode") != HOLD_SPOOLING_INPUT:
                return JobResult(cluster, ad, universe, job_dir)
            if st == js.COMPLETED:
                schedd.retrieve(constraint)
                schedd.act(htcondor2.JobAction.Remove, constraint, "apppot submit: output retrieved")
                return JobResult(cluster, ad, universe, job_dir)
        else:
            hist = list(schedd.history(constraint, [], 1))
            if hist:
                return JobResult(cluster, hist[0], universe, job_dir)
        if time.monotonic() > deadline:
            raise ApppotError(f"job {cluster}.0 did not finish within {timeout_s:g} s (still in the queue)",
                              hint=f"condor_q {cluster}; condor_rm {cluster} to give up")  # fmt: skip
        time.sleep(0.25)


def submit_job(desc: Any, *, spool: bool = False) -> tuple[Any, Any, int]:
    htcondor2, _ = bindings()
    if spool:
        desc["leave_in_queue"] = "JobStatus == 4 && (StageOutFinish =?= undefined || StageOutFinish == 0)"
    schedd = htcondor2.Schedd()
    result = schedd.submit(desc, spool=spool)
    if spool:
        schedd.spool(result)
    return htcondor2, schedd, result.cluster()


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "submit", help="submit an AppPot job to HTCondor (vanilla: UML; vm: the VM universe)",
        description=__doc__.split("\n\n")[0],
        epilog="Exit status with --wait: the job command's own; 125 if the job was held, removed, or could "
        "not be submitted. Without --wait: 0 once submitted (the cluster id is printed).",
    )  # fmt: skip
    p.add_argument("--image", metavar="NAME", help="an image the execute points hold (AppPotImages)")
    p.add_argument("--image-url", metavar="URL",
                   help="an image the execute point fetches once into its cache (with --sha256; vanilla only)")  # fmt: skip
    p.add_argument("--sha256", metavar="HEX", help="the --image-url image's digest (sha256sum IMAGE)")
    p.add_argument("--universe", choices=("vanilla", "vm"), default="vanilla", help="default: %(default)s")
    p.add_argument("--mem", type=options.memory_mib, default="256M", metavar="SIZE", help="guest memory (default: 256M)")
    p.add_argument("--input", "-i", dest="inputs", action="append", default=[], metavar="FILE",
                   help="a file (or URL) for the job directory, relative to --job-dir (repeatable)")  # fmt: skip
    p.add_argument("--changes", metavar="TARBALL", help="apppot-snap changes tarball in --job-dir, merged before the command")
    p.add_argument("--job-dir", type=Path, default=Path("."), metavar="DIR",
                   help="where inputs are and outputs land (default: the current directory)")  # fmt: skip
    p.add_argument("--walltime", type=options.walltime, metavar="S", help="stop the job after S seconds (or 90m, 2h)")
    p.add_argument("--launcher", default=LAUNCHER,
                   help="`apppot` on the execute points (default: %(default)s, the path each one advertises)")
    p.add_argument("--spool", action="store_true",
                   help="send inputs to the schedd and fetch outputs back (the schedd cannot see --job-dir)")
    p.add_argument("--wait", action="store_true", help="wait for the job and report its result")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="with --wait (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the submit description and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD ARGS", help="command to run in the guest")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    job_dir = args.job_dir.resolve()
    if not job_dir.is_dir():
        raise ApppotError(f"job directory {job_dir} does not exist")
    if not args.image and not args.image_url:
        raise ApppotError("give --image NAME or --image-url URL --sha256 HEX")
    desc = build_submit(image=args.image, image_url=args.image_url, sha256=args.sha256, command=command,
                        universe=args.universe, memory_mib=args.mem,
                        inputs=args.inputs, changes=args.changes, job_dir=job_dir, launcher=args.launcher,
                        walltime_s=args.walltime)  # fmt: skip
    if args.dry_run:
        print(desc, end="")
        return 0
    try:
        htcondor2, schedd, cluster = submit_job(desc, spool=args.spool)
    except ApppotError:
        raise
    except Exception as e:  # noqa: BLE001 -- HTCondorException & co: the schedd refused or could not be reached
        raise ApppotError(f"submitting to HTCondor failed: {e}",
                          hint="is CONDOR_CONFIG set for your pool? (condor_q must work)") from None  # fmt: skip
    print(f"apppot submit: submitted cluster {cluster} ({args.universe} universe, image {args.image})", flush=True)
    if not args.wait:
        return 0
    res = wait_for(schedd, htcondor2, cluster, universe=args.universe, job_dir=job_dir, timeout_s=args.timeout,
                   spool=args.spool)  # fmt: skip
    print(f"apppot submit: {res.describe()}")
    if res.status == htcondor2.JobStatus.HELD:
        schedd.act(htcondor2.JobAction.Remove, f"ClusterId == {cluster}", "apppot submit: job was held")
    if res.status == htcondor2.JobStatus.COMPLETED:
        outs = (["apppot.out", "apppot.err", "apppot.status"] if args.universe == "vm"
                else [f"apppot.{cluster}.0.out", f"apppot.{cluster}.0.err"])  # fmt: skip
        print(f"apppot submit: outputs in {job_dir} ({', '.join(outs)}, and the files the command wrote)")
    code = res.exit_code
    return code if code is not None else 125
