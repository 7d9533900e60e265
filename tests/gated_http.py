"""An HTTP server whose answer waits for the test: a download, or a step that
fetches, held at a known point until the test has done what it must first."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class GatedServer:
    """Answers every GET with ``payload`` once ``gate`` is set; ``asked`` says a GET came."""

    def __init__(self, payload: bytes, wait: float = 300) -> None:
        self.payload = payload
        self.asked = threading.Event()
        self.gate = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.asked.set()
                outer.gate.wait(wait)
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(outer.payload)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{path}"

    def __enter__(self) -> GatedServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.gate.set()  # a handler still waiting answers, so shutdown does not hang
        self._server.shutdown()
        self._server.server_close()
