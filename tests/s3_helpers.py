"""An S3 API on loopback for the object-store tests: moto's threaded server (one per test
session, the ``s3`` fixture in conftest.py) and a fault-injecting proxy in front of it.

Traffic goes only to 127.0.0.1; the proxy's faults are seeded and bounded in number.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# a credential pair no test output may contain (grepped for in OUT and in the logs)
ACCESS_KEY = "AKIADIGI2REALTESTKEY1"
SECRET_KEY = "d2r-secret/Not4Files+Or+Logs-9f3a1c77e2"
REGION = "us-east-1"


@dataclass
class S3:
    """The session's server: its endpoint, the environment that points a client at it, and
    a file system on it for the tests' own setup and checks."""

    endpoint: str
    env: dict[str, str]
    fs: Any
    buckets: set[str] = field(default_factory=set)

    def bucket(self, name: str) -> str:
        """``s3://name``, created once."""
        if name not in self.buckets:
            self.fs.mkdir(name)
            self.buckets.add(name)
        return f"s3://{name}"

    def upload(self, local: Path, url: str) -> str:
        """Every file under ``local`` to the prefix ``url`` (same relative names)."""
        key = url.removeprefix("s3://").rstrip("/")
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self.fs.pipe_file(f"{key}/{path.relative_to(local).as_posix()}", path.read_bytes())
        return url

    def keys(self, url: str) -> list[str]:
        key = url.removeprefix("s3://").rstrip("/")
        return sorted(self.fs.find(key)) if self.fs.exists(key) else []


def client_env(endpoint: str) -> dict[str, str]:
    """The standard variables that point botocore (and so s3fs) at ``endpoint``; nothing may
    reach a real account or the instance-metadata service."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
    "expired": (400, "ExpiredToken", "The provided token has expired."),
}
FLAKY_KINDS = ("slowdown", "internal", "drop-before", "drop-after")


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of ``upstream``.

    ``mode="flaky"``: a seeded ``share`` of requests (at most ``max_faults``) fails with 503
    SlowDown, 500 InternalError, or a connection closed without an answer, before or after
    the server applied the request. ``mode="deny-writes"``: every PUT/POST/DELETE is
    AccessDenied. ``mode="expired"``: every request is ExpiredToken.
    """

    def __init__(
        self,
        upstream: str,
        *,
        mode: str = "flaky",
        share: float = 0.12,
        seed: int = 0,
        max_faults: int = 60,
    ) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.mode, self.share, self.max_faults = mode, share, max_faults
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.faults: dict[str, int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            break
                        chunks.append(chunk)
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, kind: str) -> None:
                status, code, message = _ERRORS[kind]
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>d2r</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _drop(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                        headers.pop("Transfer-Encoding", None)
                        headers["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    return response.status, response.getheaders(), data
                finally:
                    connection.close()

            def _handle(self) -> None:
                body = self._body()
                kind = proxy.decide(self.command)
                if kind in _ERRORS:
                    return self._error(kind)
                if kind == "drop-before":
                    return self._drop()
                status, headers, data = self._forward(body)
                if kind == "drop-after":
                    return self._drop()
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def decide(self, method: str) -> str:
        with self.lock:
            self.requests += 1
            if self.mode == "expired":
                kind = "expired"
            elif self.mode == "deny-writes":
                kind = "denied" if method in ("PUT", "POST", "DELETE") else ""
            elif sum(self.faults.values()) < self.max_faults and self.rng.random() < self.share:
                kind = self.rng.choice(FLAKY_KINDS)
            else:
                kind = ""
            if kind:
                self.faults[kind] = self.faults.get(kind, 0) + 1
            return kind

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
