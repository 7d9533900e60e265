"""An HTTP proxy in front of a real registry, for the tests of lazy pulls.

It forwards reads (GET, HEAD) as they are, records which blobs were asked
for, and can cut a big blob off midway: after ``cut_after`` bytes of a blob
of at least ``cut_size`` it calls ``on_cut`` (the test kills the registry)
and drops the connection, as a registry that dies mid-pull does.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

_PASSED = (
    "Content-Type",
    "Content-Length",
    "Docker-Content-Digest",
    "Location",
    "WWW-Authenticate",
)


class RegistryProxy:
    """Forwards to ``upstream`` (``HOST:PORT``); ``blob_gets`` lists the blob digests asked for."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.blob_gets: list[str] = []
        self.requests = 0
        self.cut_size: int | None = None
        self.cut_after = 0
        self.on_cut: Callable[[], None] = lambda: None
        self.cut = threading.Event()
        #: Seconds each blob's answer waits (so that parallel fetches overlap), and the
        #: most blob GETs that were in flight at once.
        self.blob_delay = 0.0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.forward(self, "GET")

            def do_HEAD(self) -> None:
                outer.forward(self, "HEAD")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def forward(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        blob = method == "GET" and "/blobs/" in handler.path
        with self._lock:
            self.requests += 1
            if blob:
                self.blob_gets.append(handler.path.rsplit("/", 1)[1])
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if blob:
                time.sleep(self.blob_delay)
            self._forward(handler, method)
        finally:
            if blob:
                with self._lock:
                    self._in_flight -= 1

    def _forward(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() != "host"}
            conn.request(method, handler.path, headers=headers)
            resp = conn.getresponse()
        except OSError:
            handler.close_connection = True
            handler.send_error(502)
            return
        handler.send_response(resp.status)
        for name in _PASSED:
            if resp.getheader(name) is not None:
                handler.send_header(name, resp.getheader(name))
        handler.end_headers()
        if method == "GET":
            self._copy_body(handler, resp)
        conn.close()

    def _copy_body(self, handler: BaseHTTPRequestHandler, resp: http.client.HTTPResponse) -> None:
        size = int(resp.getheader("Content-Length") or 0)
        cutting = self.cut_size is not None and size >= self.cut_size and "/blobs/" in handler.path
        sent = 0
        while chunk := resp.read(64 << 10):
            if cutting and sent + len(chunk) > self.cut_after:
                handler.wfile.write(chunk[: self.cut_after - sent])
                handler.wfile.flush()
                self.cut.set()
                self.on_cut()
                handler.close_connection = True
                return
            handler.wfile.write(chunk)
            sent += len(chunk)

    def __enter__(self) -> RegistryProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


def registry_pid(config: Path) -> int:
    """The docker-registry process serving ``config`` (the fixture's), found in /proc."""
    wanted = f"docker-registry\0serve\0{config}\0".encode()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read().endswith(wanted):
                        return int(name)
            except OSError:
                continue
    raise LookupError(f"no docker-registry serves {config}")


def kill_registry(config: Path) -> None:
    """SIGKILL the registry serving ``config``: it dies mid-answer, as a crashed one does."""
    os.kill(registry_pid(config), signal.SIGKILL)


def restart_registry(config: Path, address: str) -> subprocess.Popen:
    """A new docker-registry on ``config`` (same storage, same address), once it answers."""
    proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/v2/", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"docker-registry did not start again on {address}") from None
            time.sleep(0.1)
