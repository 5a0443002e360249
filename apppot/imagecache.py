"""The node's image cache (issue 13): images fetched by URL, stored by sha256, shared by every job.

Layout under APPPOT_CACHE_DIR (written only by the fetch service, apppot/fetchd.py, as the condor
account; job users only read):

    sha256/HEX       a complete, verified entry (0444), renamed into place atomically
    partial/HEX.part a download in progress or interrupted (resumed with an HTTP Range request); 0700 dir
    meta/HEX.json    {"name", "url", "size", "last_use"}

A process using an entry holds a shared flock on it (hold()): the plugin while it stages, `apppot run`
for the guest's life. Eviction takes an exclusive non-blocking flock, so it skips entries in use.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from apppot.errors import ApppotError
from apppot.knobs import condor_param

if False:  # for type checkers only
    from typing import Any

DEFAULT_DIR = "/var/lib/apppot/cache"
DEFAULT_BUDGET = "20G"
DEFAULT_GRACE_S = 600  # plugin-stage -> `apppot run` takes its own lock: an entry used this recently stays
DEFAULT_FETCH_TIMEOUT_S = 900
HEX = frozenset("0123456789abcdef")


def knob(name: str, default: str) -> str:
    # env_first: the plugin and `apppot run` get these from the startd's environment (50-apppot.conf)
    return condor_param(name, env_first=True) or default


def cache_dir() -> str:
    return knob("APPPOT_CACHE_DIR", DEFAULT_DIR)


def socket_path() -> str:
    return knob("APPPOT_FETCHD_SOCKET", os.path.join(cache_dir(), "fetchd.sock"))


def budget_bytes() -> int:
    return parse_budget(knob("APPPOT_CACHE_BUDGET", DEFAULT_BUDGET))


def grace_s() -> float:
    return _number("APPPOT_CACHE_GRACE", DEFAULT_GRACE_S)


def fetch_timeout_s() -> float:
    return _number("APPPOT_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT_S)


def _number(name: str, default: float) -> float:
    text = knob(name, str(default))
    try:
        return float(text)
    except ValueError:
        raise ApppotError(f"{name} = {text!r} is not a number of seconds", hint=f"e.g. {name} = {default}") from None


def parse_budget(text: str) -> int:
    """'20G', '512M', '1T', '1048576' -> bytes."""
    from apppot.image import parse_size

    try:
        size = parse_size(text.strip())
    except ApppotError as e:
        raise ApppotError(f"APPPOT_CACHE_BUDGET = {text!r}: {e.message}", hint="write a size such as 20G") from None
    if size <= 0:
        raise ApppotError(f"APPPOT_CACHE_BUDGET = {text!r} leaves no room", hint="write a size such as 20G")
    return size


def is_digest(text: str | None) -> bool:
    return text is not None and len(text) == 64 and set(text) <= HEX


def entry_path(root: str, digest: str) -> str:
    return os.path.join(root, "sha256", digest)


def part_path(root: str, digest: str) -> str:
    return os.path.join(root, "partial", digest + ".part")


def meta_path(root: str, digest: str) -> str:
    return os.path.join(root, "meta", digest + ".json")


def digest_of_entry(path: str) -> str | None:
    """HEX when PATH is a cache entry (.../sha256/HEX), else None: how `apppot run` knows to hold it."""
    head, digest = os.path.split(os.path.realpath(path))
    return digest if os.path.basename(head) == "sha256" and is_digest(digest) else None


HOLD_WAIT_S = 2.0


def hold(path: str) -> int:
    """Open PATH and take a shared flock on it: the entry stays while this fd is open. Returns the fd
    (close-on-exec: a child does not extend the hold past this process).

    Exclusive holders are eviction and in_use(), each for an instant. Any job user can also flock a
    file it can read, so an exclusive lock held longer is someone's, not eviction's: then we go on
    without ours rather than hang the job (that holder keeps eviction out as well)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + HOLD_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        # Evicted between open and flock? Then the name is gone or is another file: say so.
        st, now = os.fstat(fd), os.stat(path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise FileNotFoundError(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def in_use(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our lock


def read_meta(root: str, digest: str) -> dict[str, Any]:
    try:
        with open(meta_path(root, digest), encoding="utf-8") as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def write_meta(root: str, digest: str, **fields: Any) -> None:
    """Merge FIELDS into the entry's metadata (the service only; atomic rename)."""
    meta = {**read_meta(root, digest), **fields}
    dest = meta_path(root, digest)
    tmp = f"{dest}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def entries(root: str) -> list[dict[str, Any]]:
    """The complete entries: sha256, name, url, size, last_use (epoch s), in_use; most recent first."""
    try:
        names = [n for n in os.listdir(os.path.join(root, "sha256")) if is_digest(n)]
    except FileNotFoundError:
        return []
    out = []
    for digest in names:
        path = entry_path(root, digest)
        try:
            st = os.stat(path)
        except OSError:
            continue  # evicted meanwhile
        meta = read_meta(root, digest)
        last_use = meta.get("last_use")
        out.append({"sha256": digest, "name": meta.get("name") or "", "url": meta.get("url") or "",
                    "size": st.st_size, "last_use": last_use if isinstance(last_use, (int, float)) else st.st_mtime,
                    "in_use": in_use(path)})  # fmt: skip
    return sorted(out, key=lambda e: -e["last_use"])


def evict(root: str, budget: int, *, need: int = 0, grace: float = DEFAULT_GRACE_S, now: float | None = None,
          log: Any = None, downloading: Any = frozenset()) -> list[str]:  # fmt: skip
    """Remove least recently used idle entries until they and NEED more bytes fit in BUDGET. Skipped:
    entries used within GRACE seconds and entries someone holds (hold()). Returns the digests removed.
    First, interrupted downloads nobody resumed within GRACE seconds go, whatever the budget (partial/
    HEX.part not in DOWNLOADING): their jobs are gone, and they would fill the disk outside the budget.
    The caller (the service) serialises eviction with its downloads."""
    now = time.time() if now is None else now
    drop_stale_partials(root, grace, now, downloading, log)
    found = entries(root)
    total = sum(e["size"] for e in found) + need
    removed = []
    for e in sorted(found, key=lambda e: e["last_use"]):
        if total <= budget:
            break
        if now - e["last_use"] < grace:
            continue
        path = entry_path(root, e["sha256"])
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a job uses it
            os.unlink(path)  # under our exclusive lock: nobody holds it now, later hold()s see it gone
        finally:
            os.close(fd)
        for p in (meta_path(root, e["sha256"]),):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        total -= e["size"]
        removed.append(e["sha256"])
        if log:
            log(f"evicted {e['sha256']} ({e['name'] or '?'}, {e['size']} bytes, idle {now - e['last_use']:.0f} s)")
    return removed


def drop_stale_partials(root: str, grace: float, now: float, downloading: Any, log: Any = None) -> None:
    part_dir = os.path.join(root, "partial")
    try:
        names = os.listdir(part_dir)
    except FileNotFoundError:
        return
    for name in names:
        digest, dot, ext = name.partition(".")
        if ext != "part" or not is_digest(digest) or digest in downloading:
            continue
        path = os.path.join(part_dir, name)
        try:
            st = os.lstat(path)
            if now - st.st_mtime < grace:
                continue  # a download the service may resume (it was killed and is starting again)
            os.unlink(path)
        except FileNotFoundError:
            continue
        if log:
            log(f"removed an interrupted download of {digest} ({st.st_size} bytes, idle {now - st.st_mtime:.0f} s)")
