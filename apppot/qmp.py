"""QMP, qemu's JSON control socket: one command per connection, enough for apppot's polite stop."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from apppot.errors import ApppotError


def qmp_send_ctrl_alt_del(sock_path: Path, *, timeout_s: float = 2.0) -> None:
    keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
    qmp_command(sock_path, "send-key", {"keys": keys}, timeout_s=timeout_s)


def qmp_command(sock_path: Path, command: str, arguments: dict[str, object] | None = None, *,
                timeout_s: float = 2.0) -> dict[str, object]:  # fmt: skip
    """One QMP command (after the capabilities handshake); return its `return` value."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(os.fspath(sock_path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments or {}}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise ApppotError(f"QMP {cmd['execute']} failed: {reply['error'].get('desc')}")
                break
    return dict(reply.get("return") or {})
