"""A real HTTP server for the image-cache tests: Debian's nginx on 127.0.0.1, config in a tmp dir.

Its access log has one line per request with the Range header, so tests count downloads and see
resumes. /slow/ serves the same files at a limited rate (downloads that can be interrupted or joined).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

NGINX = "/usr/sbin/nginx"

CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format ranges '$remote_addr "$request" $status $body_bytes_sent range="$http_range"';
    access_log {d}/access.log ranges;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
        location /slow/ {{ alias {d}/www/; limit_rate {rate}; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    def __init__(self, d: Path, *, rate: str = "2m") -> None:
        self.dir, self.port = d, free_port()
        self.www = d / "www"
        self.www.mkdir(parents=True)
        (d / "tmp").mkdir()
        (d / "nginx.conf").write_text(CONFIG.format(d=d, port=self.port, rate=rate))
        self.proc = subprocess.Popen([NGINX, "-p", os.fspath(d), "-e", os.fspath(d / "error.log"), "-c",
                                      os.fspath(d / "nginx.conf")], stdout=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(d / 'error.log').read_text()}") from None
                time.sleep(0.05)

    def url(self, name: str, *, slow: bool = False) -> str:
        return f"http://127.0.0.1:{self.port}/{'slow/' if slow else ''}{name}"

    def log(self) -> list[str]:
        path = self.dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def gets(self, name: str) -> list[str]:
        return [ln for ln in self.log() if f"GET /{name} " in ln or f"GET /slow/{name} " in ln]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
