"""HTCondor file-transfer plugin for apppot:// URLs: stage a VM disk in O(1) instead of copying it.

For each URL the plugin writes, at LocalFileName, a small copy-on-write layer over a base image
that the node already holds: a qcow2 overlay (VM universe, qemu, libvirt) or a UML COW file
(`format=uml-cow`, for `apppot run` under User-Mode Linux). The base is never written.

Protocol (HTCondor's docs/apis/file-transfer-plugins): `-classad` prints the capabilities;
`-infile IN -outfile OUT [-upload]` handles every request ad in IN and writes one result ad per
request to OUT, in order, even after failures; the legacy form `plugin URL DEST` does one file.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from apppot import __version__, store
from apppot.errors import ApppotError, NotFoundError, UnreadableError

# HTCondor runs the plugin twice per job (-classad, then the transfer): every import is paid on every
# job. Loaded at module level is only what -classad needs; classad2 and apppot.image load for a
# transfer, argparse for --help and usage errors (bench/staging.py, tests/unit/test_plugin.py).
if False:  # for type checkers only: typing costs start-up time and nothing here needs it at run time
    from collections.abc import Iterable, Sequence
    from typing import Any

SCHEME = "apppot"
PROTOCOL_VERSION = 4  # HTCondor 23.x and later; v2 input (no non-file ads) is read the same way

URL_HELP = """\
URL grammar:
  apppot://NAME[?sha256=HEX][&size=SIZE][&format=qcow2|uml-cow]
  apppot:///ABS/PATH/IMAGE[?...]        (only inside the node's image directories)
  apppot://NAME?sha256=HEX&from=URL[&...]   (an image the node fetches once into its cache)

  NAME     an image in the node's image directories (condor knob APPPOT_IMAGE_PATH, colon-separated;
           the environment variable of the same name when HTCondor's config has none). NAME may
           omit the suffix: apppot://debian finds debian, debian.img, debian.raw or debian.qcow2.
  sha256   pin the base: the job fails if the node's image has a different sha256. Without a
           resident image NAME, the node's image cache is looked up by this digest.
  from     where the node's fetch service downloads the image (http://, percent-encoded), once per
           node; sha256= is then required (compute it with: sha256sum IMAGE) and NAME is a label.
  size     grow the overlay's virtual disk, e.g. size=10G (qcow2 only; never shrinks).
  format   qcow2 (default): a qcow2 overlay for the VM universe, qemu or libvirt.
           uml-cow: a User-Mode Linux COW file for `apppot run` (needs a raw base; `uml` is
           accepted for it too).

HTCondor names the sandbox file after the URL's last path component, without the query:
apppot://debian?format=uml-cow becomes the file `debian` in the job's scratch directory.
"""


class TransferFailure(ApppotError):
    """A per-file failure, with the TransferErrorData stanza HTCondor wants for it."""

    def __init__(self, message: str, *, error_type: str, code: int, hint: str | None = None,
                 **extra: Any) -> None:  # fmt: skip
        super().__init__(message, hint=hint)
        self.error_type = error_type
        self.code = code
        self.extra = extra


class Request:
    """One request ad: a URL and the sandbox file to write for it."""

    __slots__ = ("url", "local_file")

    def __init__(self, url: str, local_file: str) -> None:
        self.url, self.local_file = url, local_file


class Target:
    """A parsed apppot:// URL."""

    __slots__ = ("ref", "sha256", "size", "format", "source")

    def __init__(self, ref: str, sha256: str | None = None, size: int | None = None, format: str = "qcow2",
                 source: str | None = None) -> None:  # fmt: skip
        self.ref, self.sha256, self.size, self.format = ref, sha256, size, format
        self.source = source  # from=URL: fetched into the node's image cache


def image_dirs() -> list[str]:
    """The node's image directories, from the environment HTCondor gives the plugin when it has them
    (knobs.condor_param: reading the config would cost more than the rest of the plugin)."""
    return store.image_dirs(env_first=True)


def capabilities() -> dict[str, Any]:
    return {
        "MultipleFileSupport": True,
        "PluginType": "FileTransfer",
        "PluginVersion": __version__,
        "ProtocolVersion": PROTOCOL_VERSION,
        "SupportedMethods": SCHEME,
    }


def startd_attrs() -> dict[str, Any]:
    """Slot-ad attributes: which base images this node holds, so jobs can require them."""
    names = store.list_images(image_dirs())
    return {"StartdAttrs": "HasAppPot,AppPotImages", "HasAppPot": bool(names), "AppPotImages": ",".join(names)}


def parse_url(url: str) -> Target:
    # By hand, not urllib.parse (with the `re` it pulls in, a few ms per job): the grammar is
    # apppot://REF[?K=V&K=V], percent-decoded; a fragment is dropped as urlsplit drops it.
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SCHEME:
        raise TransferFailure(
            f"URL {url!r} is not an apppot:// URL; this plugin only handles apppot://",
            error_type="Specification", code=errno.EPROTONOSUPPORT,
        )  # fmt: skip
    ref, _, query = rest.partition("#")[0].partition("?")
    opts: dict[str, str] = {}
    for pair in query.split("&") if query else ():
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise _bad_spec(url, f"its query {query!r} is malformed")
        key, value = _unquote(key.replace("+", " ")), _unquote(value.replace("+", " "))
        if key in opts:
            raise _bad_spec(url, "an option is given twice")
        opts[key] = value
    unknown = set(opts) - {"sha256", "size", "format", "from"}
    if unknown:
        raise _bad_spec(url, f"unknown option(s) {', '.join(sorted(unknown))}; known: sha256, size, format, from")
    sha = opts.get("sha256")
    if "from" in opts and sha is None:
        raise TransferFailure(
            f"bad URL {url!r}: an image fetched with from= needs its sha256= digest: no digest, no download",
            error_type="Specification", code=errno.EINVAL,
            hint="compute it with `sha256sum IMAGE` and add &sha256=HEX (apppot submit --image-url URL --sha256 HEX)",
        )  # fmt: skip
    if sha is not None and not (len(sha) == 64 and set(sha) <= set("0123456789abcdefABCDEF")):
        raise _bad_spec(url, "sha256 must be 64 hexadecimal digits (compute it with: sha256sum IMAGE)")
    source = opts.get("from")
    if source is not None and not source.lower().startswith(("http://", "https://")):
        raise _bad_spec(url, f"from={source!r} is not an http:// or https:// URL (percent-encode it)")
    fmt = {"uml": "uml-cow"}.get(opts.get("format", "qcow2"), opts.get("format", "qcow2"))  # (its old name)
    if fmt not in ("qcow2", "uml-cow"):
        raise _bad_spec(url, f"format={fmt} is unknown; use format=qcow2 or format=uml-cow")
    size = None
    if "size" in opts:
        if fmt == "uml-cow":
            raise _bad_spec(url, "size= only applies to qcow2 overlays; a UML COW file has the base's size")
        from apppot import image

        try:
            size = image.parse_size(opts["size"])
        except ApppotError as e:
            raise _bad_spec(url, str(e)) from None
    return Target(ref=_unquote(ref), sha256=sha.lower() if sha else None, size=size, format=fmt, source=source)


def _unquote(text: str) -> str:
    if "%" not in text:
        return text
    from urllib.parse import unquote  # only for the rare escaped URL

    return unquote(text)


def _bad_spec(url: str, why: str) -> TransferFailure:
    return TransferFailure(f"bad URL {url!r}: {why}", error_type="Specification", code=errno.EINVAL,
                           hint=URL_HELP.splitlines()[1].strip())  # fmt: skip


def stage(req: Request) -> dict[str, Any]:
    """Create the copy-on-write layer for one request; the only function here that does I/O."""
    target = parse_url(req.url)
    from apppot import image

    held = None  # a cache entry's fd with its shared flock: eviction skips it while we stage
    try:
        dirs = image_dirs()
        if target.source:
            base_path, held, dirs = cached_base(target)
        else:
            try:
                base_path = store.resolve(target.ref, dirs)
            except NotFoundError:
                if not target.sha256:
                    raise
                base_path, held, dirs = cached_base(target)  # a digest the node's cache may hold
        base = image.probe_image(base_path)
        store.backing_chain(base_path, dirs)  # a qcow2 base must not build on anything outside the image dirs
    except ApppotError as e:
        if held is not None:
            os.close(held)
        if isinstance(e, TransferFailure):
            raise
        missing, unreadable = isinstance(e, NotFoundError), isinstance(e, UnreadableError)
        raise TransferFailure(
            e.message, hint=e.hint,
            error_type="Resolution" if missing else "Authorization" if unreadable else "Specification",
            code=errno.ENOENT if missing else errno.EACCES if unreadable else errno.EINVAL,
            **({"FailedName": target.ref, "FailureType": "Definitive"} if missing else {}),
            **({"FailureType": "Authorization", "ShouldRefresh": False} if unreadable else {}),
        ) from None  # fmt: skip
    try:
        return _stage_on(req, target, base_path, base, verified=held is not None)
    finally:
        if held is not None:
            os.close(held)


def cached_base(target: Target) -> tuple[Any, int, list[str]]:
    """The node's cache entry for target.sha256, fetched from target.source if needed by the node's
    fetch service (the cache's only writer): (path, fd holding it shared, dirs a qcow2 chain may use).
    The entry was verified while it was downloaded: it is not hashed again per job."""
    from pathlib import Path

    from apppot import fetchd, imagecache

    try:
        reply = fetchd.request("get", name=target.ref, url=target.source, sha256=target.sha256)
    except ApppotError as e:
        mismatch = target.sha256 in e.message and "not the expected" in e.message
        raise TransferFailure(
            e.message, hint=e.hint, error_type="Specification" if mismatch else "Transfer",
            code=errno.EBADMSG if mismatch else errno.EIO,
        ) from None  # fmt: skip
    root = imagecache.cache_dir()
    path = imagecache.entry_path(root, target.sha256 or "")
    if reply.get("path") != path:
        raise TransferFailure(f"the fetch service answered {reply.get('path')!r}, not {path}",
                              error_type="Transfer", code=errno.EIO,
                              hint="APPPOT_CACHE_DIR differs between the plugin and apppot_fetchd")  # fmt: skip
    try:
        fd = imagecache.hold(path)
    except OSError as e:  # evicted in between: only after APPPOT_CACHE_GRACE idle seconds, so rare
        raise TransferFailure(f"cache entry {path}: {os.strerror(e.errno or 0)}", error_type="Transfer",
                              code=e.errno or errno.EIO, hint="retry the job") from None  # fmt: skip
    # Only the service's account may have written it: the cache dir's owner, no one else.
    st, dst = os.fstat(fd), os.stat(os.path.dirname(path))
    if st.st_uid != dst.st_uid or st.st_mode & 0o022 or dst.st_mode & 0o022:
        os.close(fd)
        raise TransferFailure(f"cache entry {path} is writable by others or not the cache owner's: not used",
                              error_type="Authorization", code=errno.EACCES,
                              hint="the node's admin must fix the image cache's ownership")  # fmt: skip
    return Path(path), fd, [*image_dirs(), os.path.dirname(path)]


def pinned_digest(base_path: Any) -> str:
    """A resident base's sha256 from a record no job user can forge: the admin's IMAGE.sha256, else the
    node's fetch service (hashes each version of a base once); only a node without the service hashes
    the base here, per job."""
    from apppot import image

    recorded = image.sha256_of(base_path, record_only=True)
    if recorded:
        return recorded
    from apppot import fetchd

    try:
        return str(fetchd.request("digest", path=os.fspath(base_path))["sha256"])
    except ApppotError:  # no fetch service on this node (55-apppot-cache.conf not installed)
        return str(image.sha256_of(base_path))


def _stage_on(req: Request, target: Target, base_path: Any, base: Any, *, verified: bool) -> dict[str, Any]:
    from apppot import image

    if base.format not in ("raw", "qcow2"):
        raise TransferFailure(f"base image {base_path} is in {base.format} format, which apppot cannot use",
                              error_type="Specification", code=errno.EINVAL,
                              hint="convert it on the node: qemu-img convert -O raw IMAGE IMAGE.raw")  # fmt: skip
    if target.sha256 and not verified:
        actual = pinned_digest(base_path)
        if actual != target.sha256:
            raise TransferFailure(
                f"base image {base_path} has sha256 {actual}, not the pinned {target.sha256}",
                error_type="Specification", code=errno.EBADMSG,
                hint="the node holds a different version of this image: update the pin or require another node",
            )  # fmt: skip
    from pathlib import Path  # already loaded by apppot.image

    dest = Path(req.local_file)
    try:
        if target.format == "uml-cow":
            nbytes = image.create_uml_cow(dest, base)
        else:
            nbytes = image.create_qcow2_overlay(dest, base, size=target.size)
    except ApppotError as e:
        raise TransferFailure(e.message, hint=e.hint, error_type="Specification", code=errno.EINVAL) from None
    except OSError as e:
        no_space = {errno.ENOSPC: "NoSpace", errno.EDQUOT: "Quota"}.get(e.errno or 0)
        raise TransferFailure(
            f"cannot write {dest}: {os.strerror(e.errno or 0)}",
            error_type="Transfer", code=e.errno or errno.EIO,
            hint="the execute node's scratch disk is full" if no_space else "check the job's scratch directory",
            **({"FailureType": no_space} if no_space else {}),  # (none of its values fits other errors)
        ) from None  # fmt: skip
    return {"TransferTotalBytes": nbytes, "TransferFileBytes": nbytes,
            "DeveloperData": {"BaseImage": os.fspath(base_path), "BaseFormat": base.format,
                              "OverlayFormat": target.format}}  # fmt: skip


def transfer(req: Request, *, upload: bool) -> dict[str, Any]:
    """Handle one request and build its result ad, failures included."""
    start = time.time()
    ad: dict[str, Any] = {
        "TransferUrl": req.url, "TransferFileName": req.local_file, "TransferProtocol": SCHEME,
        "TransferType": "upload" if upload else "download", "TransferStartTime": int(start),
    }  # fmt: skip
    try:
        if upload:
            raise TransferFailure(
                f"cannot upload {req.local_file} to {req.url}: apppot:// URLs are read-only base images",
                error_type="Parameter", code=errno.EROFS,
                hint="send outputs elsewhere: remove apppot:// from output_destination / transfer_output_remaps",
            )  # fmt: skip
        ad.update(stage(req))
        ad.update(TransferSuccess=True, TransferErrorData=[])  # protocol 4: always there; no error, no entry
    except TransferFailure as e:
        ad.update(TransferSuccess=False, TransferTotalBytes=0, TransferError=str(e),
                  TransferErrorData=[error_data(e)])  # fmt: skip
    except Exception as e:  # a bug must still yield a result ad, or HTCondor cannot tell which file failed
        msg = f"internal error in the apppot plugin: {type(e).__name__}: {e}"
        ad.update(TransferSuccess=False, TransferTotalBytes=0, TransferError=msg,
                  TransferErrorData=[{"ErrorType": "Parameter", "ErrorCode": errno.EIO, "ErrorString": msg,
                                      "PluginVersion": __version__, "PluginLaunched": True}])  # fmt: skip
    ad["TransferEndTime"] = int(time.time())
    return ad


def error_data(e: TransferFailure) -> dict[str, Any]:
    """One TransferErrorData entry: ErrorCode, ErrorString and the ErrorType's stanza (HTCondor's
    docs/apis/file-transfer-plugins/transfer_error_data.rst). The "server" that failed is this node's
    image store. Retryable -1: the same request fails the same way on this node (HTCondor >= 25.4
    reads it; older starters drop it)."""
    data: dict[str, Any] = {"ErrorType": e.error_type, "ErrorCode": e.code, "ErrorString": str(e), "Retryable": -1}
    if e.error_type == "Parameter":
        data.update(PluginVersion=__version__, PluginLaunched=True)
    elif e.error_type in ("Contact", "Authorization", "Specification", "Transfer"):
        data["FailedServer"] = os.uname().nodename  # = socket.gethostname(), without importing socket
    data.update(e.extra)
    return data


# --- ClassAd I/O ------------------------------------------------------------------------------------
# Requests are read and results written with HTCondor's ClassAd library (classad2: the full language).
# Only the -classad answer (flat values, printed on every job) and the failure to load classad2 at
# all are formatted here, so that neither needs the library.


def _classad2() -> Any:
    try:
        import classad2
    except ImportError:
        raise ApppotError(
            "HTCondor's Python bindings (classad2) are not importable by the plugin's Python",
            hint="install python3-htcondor on the node, or point the plugin's #! at a Python that has it",
        ) from None
    return classad2


def classad_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        esc = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        return f'"{esc}"'
    if isinstance(v, dict):
        return "[ " + "; ".join(f"{k} = {classad_value(x)}" for k, x in v.items()) + " ]"
    if isinstance(v, (list, tuple)):
        return "{ " + ", ".join(classad_value(x) for x in v) + " }"
    raise TypeError(f"no ClassAd form for {type(v).__name__}")


def format_old(ad: dict[str, Any]) -> str:
    """Old-style (line-oriented) ClassAd, as `-classad` must print."""
    return "".join(f"{k} = {classad_value(v)}\n" for k, v in ad.items())


def parse_requests(text: str) -> list[Request]:
    """The request ads of an infile, in order. v4 non-file ads (no URL/LocalFileName) are skipped."""
    if not text.strip():
        raise ApppotError("the plugin's input file is empty")
    classad2 = _classad2()
    try:
        parts = split_ads(text)
        ads = [classad2.ClassAd(p) for p in parts] if parts is not None else list(classad2.parseAds(text))
    except Exception as e:  # noqa: BLE001 -- classad2 raises ValueError or its own ClassAdException
        raise ApppotError(f"the plugin's input file is not a list of ClassAds ({e})") from None
    requests = []
    for ad in ads:
        keys = {k.lower(): k for k in ad.keys()}
        if "url" in keys and "localfilename" in keys:
            url, local = ad[keys["url"]], ad[keys["localfilename"]]
            if not isinstance(url, str) or not isinstance(local, str):
                raise ApppotError("a request ad's Url or LocalFileName is not a string")
            requests.append(Request(url, local))
    if not ads:
        raise ApppotError("the plugin's input file holds no ClassAd")
    return requests


def split_ads(text: str) -> list[str] | None:
    """The top-level `[ ... ]` ads of a new-syntax sequence, as text for classad2.ClassAd() each:
    classad2.parseAds() imports all of htcondor2 and reads the node's config (~20 ms, on every job),
    ClassAd(text) does not. Only brackets and string literals are tracked, the rest is classad2's to
    parse; None for anything else between ads (comments, garbage): then parseAds() takes it all."""
    ads, depth, start, quote, i = [], 0, 0, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "[":
            start = i if depth == 0 else start
            depth += 1
        elif c == "]":
            depth -= 1
            if depth < 0:
                return None
            if depth == 0:
                ads.append(text[start : i + 1])
        elif c == "/" and text[i + 1 : i + 2] in ("/", "*") or depth == 0 and not c.isspace():
            return None
        i += 1
    return ads if depth == 0 and not quote else None


def format_results(ads: Iterable[dict[str, Any]]) -> str:
    try:
        classad2 = _classad2()
    except ApppotError:  # only the "cannot read the input" ad gets here without the library
        return "".join(classad_value(ad) + "\n" for ad in ads)
    return "".join(str(classad2.ClassAd(ad)) + "\n" for ad in ads)


def write_results(path: str, ads: Iterable[dict[str, Any]]) -> None:
    # No O_TRUNC: HTCondor pre-allocates the file so that a full disk shows up before we run.
    data = format_results(ads).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.ftruncate(fd, len(data))  # only now drop the pre-allocated tail
    finally:
        os.close(fd)


USAGE = "usage: apppot_plugin -classad | -infile IN -outfile OUT [-upload] | URL DEST   (see --help)"


class Args:
    """The command line as HTCondor writes it (its fixed forms are parsed by hand: argparse alone
    costs more start-up time than staging an image; --help builds the argparse description)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.classad = self.upload = False
        self.infile: str | None = None
        self.outfile: str | None = None
        self.legacy: list[str] = []
        it = iter(argv)
        for arg in it:
            if arg == "-classad":
                self.classad = True
            elif arg == "-upload":
                self.upload = True
            elif arg == "-diagnostic":
                pass
            elif arg in ("-infile", "-outfile"):
                value = next(it, None)
                if value is None:
                    raise UsageError(f"{arg} needs a file name")
                setattr(self, arg[1:], value)
            elif arg.startswith("-") and arg != "-":
                raise UsageError(f"unknown option {arg}")
            else:
                self.legacy.append(arg)


class UsageError(Exception):
    pass


def help_text() -> str:
    import argparse

    p = argparse.ArgumentParser(
        prog="apppot_plugin",
        description="HTCondor file-transfer plugin for apppot:// URLs. Instead of copying a VM disk "
        "image into the job's sandbox, it writes a copy-on-write layer over a base image the node "
        "already holds. HTCondor runs it; admins enable it with condor_config.d/50-apppot.conf.",
        epilog=URL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-classad", action="store_true", help="print the plugin's capabilities ClassAd")
    p.add_argument("-infile", help="request ads (one per URL), written by HTCondor")
    p.add_argument("-outfile", help="result ads are written here (pre-allocated by HTCondor)")
    p.add_argument("-upload", action="store_true", help="upload direction (refused: apppot:// is read-only)")
    p.add_argument("-diagnostic", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("legacy", nargs="*", metavar="URL DEST", help="legacy single-file form: URL and destination")
    return p.format_help()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "-help") for a in argv):
        sys.stdout.write(help_text())
        return 0
    try:
        args = Args(argv)
    except UsageError as e:
        print(f"apppot_plugin: error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    if args.classad:
        sys.stdout.write(format_old({**capabilities(), **startd_attrs()}))
        return 0
    if args.legacy:
        if len(args.legacy) != 2 or args.infile or args.outfile:
            print("apppot_plugin: error: the legacy form takes exactly URL DEST", file=sys.stderr)
            return 1
        ad = transfer(Request(args.legacy[0], args.legacy[1]), upload=args.upload)
        sys.stdout.write(format_old(ad))
        if not ad["TransferSuccess"]:
            print(f"apppot_plugin: error: {ad['TransferError']}", file=sys.stderr)
        return 0 if ad["TransferSuccess"] else 1
    if not args.infile or not args.outfile:
        print("apppot_plugin: error: need -infile IN and -outfile OUT (or -classad, or URL DEST); see --help",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        with open(args.infile, encoding="utf-8") as f:
            requests = parse_requests(f.read())
    except (ApppotError, OSError, UnicodeDecodeError) as e:
        msg = f"cannot read the plugin's input file {args.infile}: {e}"
        print(f"apppot_plugin: error: {msg}", file=sys.stderr)
        failure = TransferFailure(msg, error_type="Parameter", code=errno.EINVAL)
        ad = {"TransferSuccess": False, "TransferUrl": "", "TransferFileName": "", "TransferError": msg,
              "TransferErrorData": [error_data(failure)]}  # fmt: skip
        try:
            write_results(args.outfile, [ad])
        except OSError:
            pass
        return 1
    ads = [transfer(r, upload=args.upload) for r in requests]
    try:
        write_results(args.outfile, ads)
    except OSError as e:
        print(f"apppot_plugin: error: cannot write results to {args.outfile}: {e}", file=sys.stderr)
        return 1
    for ad in ads:
        if not ad["TransferSuccess"]:
            print(f"apppot_plugin: error: {ad['TransferError']}", file=sys.stderr)
    return 0 if all(ad["TransferSuccess"] for ad in ads) else 1
