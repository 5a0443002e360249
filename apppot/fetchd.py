"""The node's fetch service (issue 13): the only writer of the image cache, and its client `request()`.

condor_master starts it as root (DAEMON_LIST += APPPOT_FETCHD, condor_config.d/55-apppot-cache.conf);
it drops to the condor account before touching the cache. Job users (the plugin) ask it over a unix
socket, one JSON line per request and per reply:

    {"op":"get","name":N,"url":U,"sha256":H}  -> {"ok":true,"path":".../sha256/H"} | {"ok":false,"error":E,"hint":X}
    {"op":"prefetch", ...}                     = get
    {"op":"list"}                              -> {"ok":true,"entries":[...]}
    {"op":"digest","path":P}                   -> {"ok":true,"sha256":H}   (P: a resident image)

One download per digest (others wait for it), HTTP Range resume of the .part, sha256 computed while
streaming, atomic rename into place, least recently used idle entries evicted before each download.
Only the client half is loaded by the plugin: the service's modules load in serve().
"""

from __future__ import annotations

import json
import os
import socket
import time

from apppot.errors import ApppotError

if False:  # for type checkers only
    from typing import Any

MAX_LINE = 64 << 10


RETRY_S = 0.5  # between tries while the service restarts (condor_master's back-off: seconds)


class _Gone(Exception):
    """The service was there and is not now (killed mid-request: condor_master restarts it)."""


def request(op: str, *, socket: str | None = None, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
    """Ask the node's fetch service; its reply, or ApppotError with its error and hint.

    A service that dies while it is asked (or whose stale socket refuses us) is asked again until it is
    back, within TIMEOUT: condor_master restarts it, and the new one resumes the download. No socket
    at all on the first try means no service on this node: that fails at once."""
    from apppot import imagecache

    path = socket or imagecache.socket_path()
    timeout = imagecache.fetch_timeout_s() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    line = json.dumps({"op": op, **fields}).encode() + b"\n"
    tries = 0
    while True:
        try:
            data = _ask(path, line, deadline, timeout, first=tries == 0)
            break
        except _Gone as e:
            tries += 1
            if time.monotonic() + RETRY_S >= deadline:
                raise ApppotError(
                    f"the image fetch service at {path} stopped answering and was not back within {timeout:g} s "
                    f"({tries} tries; last: {e})",
                    hint="condor_master restarts apppot_fetchd if it dies: see its log (APPPOT_FETCHD_LOG) and "
                    "the MasterLog; retry the job once it runs",
                ) from None
            time.sleep(RETRY_S)
    try:
        reply = json.loads(data)
    except ValueError:
        raise ApppotError(f"the image fetch service at {path} gave no valid answer ({data[:200]!r})") from None
    if not reply.get("ok"):
        raise ApppotError(str(reply.get("error") or "the image fetch service failed"), hint=reply.get("hint") or None)
    return reply


def _ask(path: str, line: bytes, deadline: float, timeout: float, *, first: bool) -> bytes:
    """One try: LINE to the service, its reply line. _Gone if it is not there now but was (or may be)."""
    s = _socket_mod.socket(_socket_mod.AF_UNIX, _socket_mod.SOCK_STREAM)
    try:
        s.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            s.connect(path)
        except FileNotFoundError as e:
            if not first:  # a restarting service removes its stale socket before it binds anew
                raise _Gone(e.strerror) from None
            raise ApppotError(
                f"the node's image fetch service is not running (cannot connect to {path}: {e.strerror})",
                hint="the node's admin must install condor_config.d/55-apppot-cache.conf (DAEMON_LIST += APPPOT_FETCHD) "
                "and condor_reconfig; or point APPPOT_FETCHD_SOCKET at its socket",
            ) from None
        except ConnectionRefusedError as e:  # a killed service's socket: condor_master starts a new one
            raise _Gone(e.strerror) from None
        s.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise _Gone("the connection closed before the answer")
            data += chunk
        return data
    except _socket_mod.timeout:
        raise ApppotError(
            f"the image fetch service did not answer within {timeout:g} s (a large image still downloading?)",
            hint="the download goes on: retry the job later, or raise APPPOT_FETCH_TIMEOUT on the node",
        ) from None
    except (ConnectionResetError, BrokenPipeError) as e:
        raise _Gone(e.strerror) from None
    except OSError as e:
        raise ApppotError(f"talking to the image fetch service at {path} failed: {e}") from None
    finally:
        s.close()


_socket_mod = socket  # `request(socket=...)` shadows the module's name inside it


# --- the service --------------------------------------------------------------------------------------


class Service:
    """The cache's writer. `get` is called from one thread per connection."""

    def __init__(self, root: str, *, budget: int, grace: float, log: Any) -> None:
        import threading

        self.root, self.budget, self.grace, self.log = root, budget, grace, log
        self.lock = threading.Lock()  # guards `downloads`, the meta files and eviction
        self.downloads: dict[str, Any] = {}  # digest -> threading.Event of the one download in flight
        self.errors: dict[str, ApppotError] = {}
        self.Event = threading.Event
        self.hashing: dict[str, Any] = {}  # resident image -> threading.Lock: one hash per image at a time
        self.Lock = threading.Lock

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "list":
            from apppot import imagecache

            return {"ok": True, "entries": imagecache.entries(self.root)}
        if op in ("get", "prefetch"):
            url, name, digest = req.get("url"), req.get("name"), req.get("sha256")
            if url is not None and not isinstance(url, str) or name is not None and not isinstance(name, str):
                raise ApppotError("url and name must be strings")
            return {"ok": True, "path": self.get(str(digest).lower() if digest else "", url, (name or "")[:200])}
        if op == "digest":
            if not isinstance(req.get("path"), str):
                raise ApppotError("path must be a string")
            return {"ok": True, "sha256": self.digest(req["path"])}
        raise ApppotError(f"unknown op {op!r}", hint="ops: get, prefetch, list, digest")

    def digest(self, path: str) -> str:
        """A resident image's sha256 for a pinned job, hashed once per version of the image (its stat) and
        recorded in the cache's digests/, which only this service writes: a job user can neither forge the
        record nor make every job hash a multi-GB base again. Only files inside the node's image directories."""
        import hashlib
        import json

        from apppot import image, store

        real = os.path.realpath(store.resolve(path, store.image_dirs()))
        record = os.path.join(self.root, "digests", hashlib.sha256(real.encode()).hexdigest() + ".json")
        with self.lock:
            lock = self.hashing.setdefault(real, self.Lock())
        with lock, open(real, "rb") as f:
            key = image.stat_key(os.fstat(f.fileno()))
            try:
                with open(record) as r:
                    entry = json.load(r)
                if entry["stat"] == key:
                    return str(entry["sha256"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
            self.log(f"hashing {real} (a new version, or none recorded)")
            digest = image.hash_file(f)
            from pathlib import Path

            image.write_atomically(Path(record), json.dumps({"path": real, "stat": key, "sha256": digest}).encode())
        return digest

    def get(self, digest: str, url: str | None, name: str) -> str:
        import time

        from apppot import imagecache

        if not imagecache.is_digest(digest):
            raise ApppotError("a sha256 of 64 hexadecimal digits is required", hint="compute it with: sha256sum IMAGE")
        path = imagecache.entry_path(self.root, digest)
        while True:
            with self.lock:
                if os.path.exists(path):
                    imagecache.write_meta(self.root, digest, last_use=time.time())
                    return path
                if not url:
                    raise ApppotError(f"no image with sha256 {digest} in this node's cache",
                                      hint="give its URL as well: apppot://NAME?sha256=HEX&from=URL")  # fmt: skip
                event = self.downloads.get(digest)
                mine = event is None
                if mine:
                    event = self.downloads[digest] = self.Event()
                    self.errors.pop(digest, None)
            if not mine:
                event.wait()
                with self.lock:
                    if digest in self.errors and not os.path.exists(path):
                        raise self.errors[digest]
                continue  # done: the loop returns the entry (or a new download starts after an eviction)
            try:
                self.download(digest, url, name)
            except ApppotError as e:
                with self.lock:
                    self.errors[digest] = e
                raise
            except Exception as e:  # noqa: BLE001 -- waiters must hear about it too
                err = ApppotError(f"downloading {url} failed: {type(e).__name__}: {e}")
                with self.lock:
                    self.errors[digest] = err
                raise err from None
            finally:
                with self.lock:
                    del self.downloads[digest]
                event.set()

    def download(self, digest: str, url: str, name: str) -> None:
        import hashlib
        import time
        import urllib.error
        import urllib.request

        from apppot import imagecache

        if not url.lower().startswith(("http://", "https://")):
            raise ApppotError(f"cannot fetch {url!r}: only http:// and https:// URLs", hint="serve the image over HTTP")
        part = imagecache.part_path(self.root, digest)
        h = hashlib.sha256()
        offset = 0
        if os.path.exists(part):
            with open(part, "rb") as f:  # resume: the bytes we have count towards the digest
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    offset += len(chunk)
        # No file:// or ftp:// handler: a URL (or a redirect) must not make the service read local files.
        opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                        urllib.request.HTTPRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                        urllib.request.HTTPErrorProcessor()):  # fmt: skip
            opener.add_handler(handler)
        headers = {"User-Agent": "apppot-fetchd", **({"Range": f"bytes={offset}-"} if offset else {})}
        self.log(f"GET {url} for {digest}" + (f" from byte {offset}" if offset else ""))
        try:
            resp = opener.open(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # we have it all: the service stopped before the rename
                resp = None
            else:
                raise ApppotError(f"GET {url}: HTTP {e.code} {e.reason}", hint="check the image's URL") from None
        except (urllib.error.URLError, OSError) as e:
            raise ApppotError(f"GET {url} failed: {getattr(e, 'reason', e)}", hint="check the URL and the server") from None
        if resp is not None:
            with resp:
                if offset and resp.status != 206:  # the server ignored Range: start again
                    self.log(f"{url}: no partial content (HTTP {resp.status}), downloading from the start")
                    offset, h = 0, hashlib.sha256()
                length = resp.headers.get("Content-Length")
                with self.lock:
                    self.make_room(int(length) if length and length.isdigit() else 0, offset)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.truncate(offset)
                    f.seek(offset)
                    size = offset
                    while chunk := resp.read(1 << 20):
                        size += len(chunk)
                        if size > self.budget:  # a server that sends more than it announced, or no end
                            f.close()
                            os.unlink(part)
                            raise ApppotError(f"{url} sent more than the cache budget ({self.budget} bytes)",
                                              hint="raise APPPOT_CACHE_BUDGET, or check the URL")  # fmt: skip
                        h.update(chunk)
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
        actual = h.hexdigest()
        if actual != digest:
            os.unlink(part)
            raise ApppotError(
                f"the image at {url} has sha256 {actual}, not the expected {digest}; nothing was cached",
                hint="the job's sha256= does not match the file served: check the URL, or pin the right digest "
                "(sha256sum IMAGE)",
            )  # fmt: skip
        os.chmod(part, 0o444)
        dest = imagecache.entry_path(self.root, digest)
        with self.lock:
            os.rename(part, dest)  # same file system: the entry appears whole or not at all
            _fsync_dir(os.path.dirname(dest))
            imagecache.write_meta(self.root, digest, name=name, url=url, size=os.path.getsize(dest),
                                  last_use=time.time())  # fmt: skip
        self.log(f"cached {digest} ({name or '?'}, {os.path.getsize(dest)} bytes) from {url}")

    def make_room(self, remaining: int, have: int) -> None:
        from apppot import imagecache

        if remaining + have > self.budget:
            raise ApppotError(f"the image ({remaining + have} bytes) is larger than this node's cache budget "
                              f"({self.budget} bytes)", hint="raise APPPOT_CACHE_BUDGET on the node")  # fmt: skip
        imagecache.evict(self.root, self.budget, need=remaining + have, grace=self.grace, log=self.log,
                         downloading=frozenset(self.downloads))  # fmt: skip


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def service_account() -> tuple[int, int]:
    """(uid, gid) of the condor account: CONDOR_IDS (uid.gid) if set, else the `condor` user."""
    from apppot.knobs import condor_param

    ids = condor_param("CONDOR_IDS")
    if ids:
        try:
            uid, gid = (int(x) for x in ids.strip().split("."))
            return uid, gid
        except ValueError:
            raise ApppotError(f"CONDOR_IDS = {ids!r} is not UID.GID") from None
    import pwd

    try:
        pw = pwd.getpwnam("condor")
    except KeyError:
        raise ApppotError("started as root, but there is no condor account to run as",
                          hint="create the user condor, or set CONDOR_IDS = UID.GID") from None  # fmt: skip
    return pw.pw_uid, pw.pw_gid


def prepare_dirs(root: str, uid: int, gid: int) -> None:
    """As root: the cache dir and its sub-dirs exist and belong to the service account."""
    os.makedirs(root, mode=0o755, exist_ok=True)
    for sub, mode in (("", 0o755), ("sha256", 0o755), ("meta", 0o755), ("digests", 0o755), ("partial", 0o700)):
        d = os.path.join(root, sub)
        os.makedirs(d, mode=mode, exist_ok=True)
        st = os.lstat(d)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(d, uid, gid, follow_symlinks=False)


def check_dirs(root: str) -> None:
    """Refuse a cache that someone else could write: a job user could then place or swap an entry."""
    import stat

    uid = os.geteuid()
    os.makedirs(root, mode=0o755, exist_ok=True)
    for sub, mode in (("sha256", 0o755), ("meta", 0o755), ("digests", 0o755), ("partial", 0o700)):
        os.makedirs(os.path.join(root, sub), mode=mode, exist_ok=True)
    for sub in ("", "sha256", "meta", "digests", "partial"):
        d = os.path.join(root, sub)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
            raise ApppotError(
                f"the image cache directory {d} is writable by others or not owned by uid {uid} "
                f"(mode {stat.filemode(st.st_mode)}, owner {st.st_uid}): refusing to run",
                hint=f"chown -R {uid} {root} && chmod 0755 {root} {root}/sha256 {root}/meta {root}/digests && chmod 0700 {root}/partial",
            )  # fmt: skip
    parent = os.path.dirname(os.path.realpath(root))
    while True:  # an ancestor anyone can write (without the sticky bit) lets them rename the cache away
        st = os.stat(parent)
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            raise ApppotError(f"{parent}, above the image cache {root}, is writable by everyone: refusing to run",
                              hint=f"chmod o-w {parent}, or put APPPOT_CACHE_DIR elsewhere")  # fmt: skip
        if parent == "/":
            break
        parent = os.path.dirname(parent)


def drop_root(root: str) -> None:
    uid, gid = service_account()
    prepare_dirs(root, uid, gid)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise ApppotError("could not drop root privileges")


def serve(argv: list[str] | None = None) -> int:
    """The daemon: what plugins/apppot_fetchd runs. Arguments condor_master adds (-f, ...) are ignored."""
    import logging
    import signal
    import socketserver
    import struct

    from apppot import imagecache
    from apppot.knobs import condor_param

    logging.basicConfig(level=logging.INFO, format="%(asctime)s apppot_fetchd[%(process)d] %(message)s")
    logger = logging.getLogger("apppot.fetchd")
    root = os.path.abspath(imagecache.cache_dir())
    sock_path = imagecache.socket_path()
    try:
        if os.geteuid() == 0:
            drop_root(root)
        logfile = condor_param("APPPOT_FETCHD_LOG")
        if logfile:
            try:
                handler = logging.FileHandler(logfile)
                handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(message)s"))
                logger.addHandler(handler)
            except OSError as e:
                logger.warning("cannot open APPPOT_FETCHD_LOG %s: %s; logging to stderr only", logfile, e)
        check_dirs(root)
        service = Service(root, budget=imagecache.budget_bytes(), grace=imagecache.grace_s(), log=logger.info)
    except ApppotError as e:
        logger.error("%s", e)
        return 1

    class Handler(socketserver.StreamRequestHandler):
        timeout = 10  # for the request line: a client that connects and says nothing does not keep a thread

        def handle(self) -> None:
            pid, uid, gid = struct.unpack("3i", self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            try:
                line = self.rfile.readline(MAX_LINE)
            except OSError:
                logger.info("pid %d uid %d sent no request within %d s", pid, uid, self.timeout)
                return
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                reply: dict[str, Any] = {"ok": False, "error": f"bad request: {e}", "hint": None}
            else:
                logger.info("request from pid %d uid %d gid %d: %s", pid, uid, gid,
                            {k: req.get(k) for k in ("op", "name", "sha256", "url")})  # fmt: skip
                try:
                    reply = service.handle(req)
                except ApppotError as e:
                    logger.info("-> error for uid %d: %s", uid, e)
                    reply = {"ok": False, "error": e.message, "hint": e.hint}
            try:
                self.wfile.write(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass  # the client gave up (its timeout); the download is kept

    class Server(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True
        request_queue_size = 128  # socketserver's 5 refuses (EAGAIN) a burst of jobs starting at once

    try:
        os.unlink(sock_path)  # a stale socket of an earlier run (ours: the directory is ours)
    except FileNotFoundError:
        pass
    old = os.umask(0o111)  # the socket: every local user may connect (they can only ask)
    try:
        server = Server(sock_path, Handler)
    finally:
        os.umask(old)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    def reconfig(signum: int, frame: object) -> None:  # condor_reconfig: the budget may have changed
        try:
            from apppot.knobs import bindings

            bindings()[0].reload_config()
        except Exception:  # noqa: BLE001 -- no bindings (tests, a node without them): the environment decides
            pass
        try:
            service.budget, service.grace = imagecache.budget_bytes(), imagecache.grace_s()
            logger.info("reconfigured: budget %d bytes, grace %g s", service.budget, service.grace)
        except ApppotError as e:
            logger.error("reconfig: %s (keeping the old settings)", e)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGQUIT, stop)
    signal.signal(signal.SIGHUP, reconfig)
    logger.info("serving %s on %s as uid %d (budget %d bytes, grace %g s)", root, sock_path, os.getuid(),
                service.budget, service.grace)  # fmt: skip
    try:
        server.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
        try:
            os.unlink(sock_path)
        except OSError:
            pass
        logger.info("stopped")
    return 0
