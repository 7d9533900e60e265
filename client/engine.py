"""``amber export --to-engine``: load a build's state into Docker or podman over their API.

Who talks to the engine is the client, never amberd. amberd runs as root
and could open any engine socket on the machine; a user who may not use
docker must not get it through amber. So the client connects to the
engine's unix socket with the user's own permissions (and the engine sees
the user's credentials on that connection, as with the ``docker`` command),
hands amberd the write end of a pipe (SCM_RIGHTS, as ``amber shell`` does
with its terminal), and forwards what amberd streams into it (a docker
archive, see daemon/oci/stream.py) to the engine's ``POST /images/load`` in
chunked transfer encoding. The engine's reply, a stream of JSON messages,
is read here too, so amberd never parses what an engine (or whatever the
user's socket leads to) says.

The upload ends with the closing chunk only once amberd has said the
archive is whole: if amberd fails half-way, the connection is dropped
instead, and the engine throws away the truncated upload rather than
loading part of an image.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

from .errors import AmberError, ErrorCode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    from .connection import Connection

DOCKER_SOCKET = "/var/run/docker.sock"
PODMAN_SOCKET = "/run/podman/podman.sock"
ENGINE_FAILED = ErrorCode.ENGINE_FAILED
_CHUNK = 1 << 20
_MAX_REPLY = 16 << 20  # an engine's answer to a load is a few lines


class EngineError(AmberError):
    """The engine could not be reached, or refused the image."""

    def __init__(self, message: str) -> None:
        super().__init__(ENGINE_FAILED, message)


def default_socket(env: Mapping[str, str] | None = None) -> str:
    """$DOCKER_HOST when it names a unix socket, else docker's socket, else podman's."""
    env = os.environ if env is None else env
    host = env.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    if os.path.exists(DOCKER_SOCKET) or not os.path.exists(PODMAN_SOCKET):
        return DOCKER_SOCKET
    return PODMAN_SOCKET


class Engine:
    """One HTTP/1.1 connection to a Docker Engine API socket, opened as the user."""

    def __init__(self, path: str) -> None:
        import http.client  # only this command pays for it

        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise EngineError(
                f"no container engine socket at {path} (start the engine, or name its "
                "socket with --engine-socket or DOCKER_HOST=unix://PATH)"
            ) from None
        except PermissionError:
            sock.close()
            raise EngineError(
                f"cannot open {path}: permission denied (amber uses the engine with your own "
                "permissions: join the group that owns the socket, e.g. docker)"
            ) from None
        except OSError as exc:
            sock.close()
            raise EngineError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        self.http = http.client.HTTPConnection("localhost")  # the Host header engines expect
        self.http.sock = sock

    def close(self) -> None:
        self.http.close()

    def ping(self) -> None:
        """Check that the socket serves the Docker Engine API before amberd does any work."""
        try:
            self.http.request("GET", "/_ping")
            reply = self.http.getresponse()
            body = reply.read(1000)
        except (OSError, ValueError) as exc:  # http.client's errors are ValueErrors or OSErrors
            raise EngineError(
                f"{self.path} does not answer as a Docker Engine API: {exc}"
            ) from None
        if reply.status != 200 or body.strip() != b"OK":
            raise EngineError(
                f"{self.path} does not answer as a Docker Engine API "
                f"(GET /_ping: {reply.status} {body[:200]!r})"
            )

    def start_load(self) -> None:
        self.http.putrequest("POST", "/images/load?quiet=0")
        self.http.putheader("Content-Type", "application/x-tar")
        self.http.putheader("Transfer-Encoding", "chunked")
        self.http.endheaders()

    def send_chunk(self, data: bytes) -> None:
        self.http.send(b"%x\r\n%b\r\n" % (len(data), data))

    def finish_load(self, say: Callable[[str], None]) -> list[str]:
        """End the upload; read the engine's messages; return the images it says it loaded."""
        with contextlib.suppress(OSError):  # an engine that already answered may have hung up
            self.http.send(b"0\r\n\r\n")
        return self.read_reply(say)

    def read_reply(self, say: Callable[[str], None]) -> list[str]:
        try:
            reply = self.http.getresponse()
            body = reply.read(_MAX_REPLY)
        except (OSError, ValueError) as exc:
            raise EngineError(f"the engine at {self.path} did not answer the load: {exc}") from None
        messages = _json_messages(body)
        if reply.status != 200:
            detail = next((m.get("message") for m in messages if m.get("message")), None)
            text = detail or body.decode("utf-8", "replace").strip()[:500] or reply.reason
            raise EngineError(f"the engine refused the image ({reply.status}): {text}")
        loaded: list[str] = []
        for m in messages:
            error = m.get("error") or (m.get("errorDetail") or {}).get("message")
            if error:
                raise EngineError(f"the engine could not load the image: {error}")
            for line in str(m.get("stream") or "").splitlines():
                if line.strip():
                    say(f"engine: {line.strip()}")
                if line.startswith("Loaded image: "):
                    loaded.append(line.removeprefix("Loaded image: ").strip())
            if m.get("status") and not m.get("progressDetail"):
                say(f"engine: {m['status']} {m.get('id', '')}".rstrip())
        return loaded


def _json_messages(body: bytes) -> list[dict[str, Any]]:
    """The JSON objects of an engine's reply, one after another (newlines or not)."""
    text = body.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            break  # not JSON (a plain-text error): the caller shows the body
        if isinstance(value, dict):
            out.append(value)
    return out


def export_to_engine(
    conn: Connection,
    args: Mapping[str, Any],
    socket_path: str | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Stream the ``export`` amberd makes of ``args`` into the engine; amberd's result.

    The result gains ``socket`` and, if the engine named it, ``loaded``.
    """
    path = socket_path or default_socket()
    engine = Engine(path)
    try:
        engine.ping()
        read_end, write_end = os.pipe()
        try:
            stream = conn.request("export", {**args, "stream": True}, fds=[write_end])
        finally:
            os.close(write_end)  # amberd holds its own copy; EOF comes when it is done
        with open(read_end, "rb", buffering=0) as pipe:
            engine.start_load()
            refused = _forward(pipe, engine)
        if refused:  # the engine answered before taking the whole image: that is its error
            with contextlib.suppress(AmberError):
                stream.wait()
            engine.read_reply(say)
            raise EngineError(f"the engine at {path} stopped reading the image")
        for ev in stream:
            message = (ev.get("data") or {}).get("message")
            if ev.get("event") == "note" and message:
                say(f"amber: {message}")
        result = stream.wait()  # amberd's error, if any, is raised before the upload is ended
        loaded = engine.finish_load(say)
    finally:
        engine.close()
    result = dict(result)
    result["socket"] = path
    if loaded:
        result["loaded"] = loaded
    return result


def _forward(pipe, engine: Engine) -> bool:
    """Copy the pipe to the engine in chunks until EOF; True if the engine hung up first."""
    while True:
        data = pipe.read(_CHUNK)
        if not data:
            return False
        try:
            engine.send_chunk(data)
        except (BrokenPipeError, ConnectionResetError):
            return True
