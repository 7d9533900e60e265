"""A blocking client for amberd's Unix socket.

Synchronous on purpose: the ``amber`` command makes one or two requests and
exits, and must start in a few milliseconds, so no event loop (and no trio)
is imported. One request is in flight at a time; its events are read as
they arrive, which is all a CLI needs to print build logs live.

Usage::

    with Connection.open(retry_for=5) as conn:
        info = conn.call("status")
        stream = conn.stream("build", spec="spec.toml")
        for ev in stream:               # raises AmberError if the build errs
            print(ev["data"]["line"])
        result = stream.wait()
        conn.request("shell", {"build": bid}, fds=[0, 1, 2]).wait()
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import deque

from .errors import AmberError, ConnectionLost, DaemonUnreachable, ErrorCode, ProtocolError
from .protocol import (
    CLIENT_NAME,
    MAX_FRAME,
    SUPPORTED_VERSIONS,
    Event,
    FrameDecoder,
    Reply,
    encode_frame,
    hello_request,
    parse_hello_reply,
    parse_server_message,
    request,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from types import TracebackType
    from typing import Any, Self

__all__ = [
    "SYSTEM_SOCKET",
    "AmberError",
    "Connection",
    "ConnectionLost",
    "DaemonUnreachable",
    "Stream",
    "default_socket_path",
    "system_socket_path",
]

# Connect errors that mean "the daemon is not there yet": no socket file, or
# a stale one nobody accepts on. Worth retrying while a daemon restarts.
_RETRY_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED})
_RECV_SIZE = 256 * 1024


#: Where the system daemon listens (amberd.socket, or amberd run by root).
SYSTEM_SOCKET = "/run/amber/amberd.sock"


def system_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """The system daemon's socket: ``$AMBER_SYSTEM_SOCKET`` if set, else ``SYSTEM_SOCKET``.

    The variable is for tests and packagers that put the system socket
    elsewhere; a user pointing amber at one daemon sets ``AMBER_SOCKET``.
    """
    env = os.environ if environ is None else environ
    return env.get("AMBER_SYSTEM_SOCKET") or SYSTEM_SOCKET


def user_socket_path(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """A per-user daemon's socket, in the user's runtime directory."""
    env = os.environ if environ is None else environ
    if euid is None:
        euid = os.geteuid()
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):  # the XDG spec says to ignore relative values
        return os.path.join(runtime, "amber", "amberd.sock")
    return f"/tmp/amber-{euid}/amberd.sock"


def default_socket_path(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """Where amberd listens: ``$AMBER_SOCKET``, else the system daemon's socket.

    As with docker and podman's system service, every user talks to the one
    daemon root runs, through the socket its group may use. A non-root user
    whose runtime directory holds a socket while the system one is absent
    (a daemon root started for them) gets that one; with neither, the system
    socket, so that the error names the socket the user should ask for.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("AMBER_SOCKET")
    if explicit:
        return explicit
    system = system_socket_path(env)
    if euid is None:
        euid = os.geteuid()
    if euid == 0 or os.path.lexists(system):
        return system
    user = user_socket_path(env, euid)
    return user if os.path.lexists(user) else system


class _Closing:
    """``with`` closes it, whatever happened inside."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Connection(_Closing):
    """One conversation with amberd. Not thread-safe; one request at a time."""

    def __init__(self, sock: socket.socket, *, max_frame: int = MAX_FRAME) -> None:
        """Wrap a connected socket. ``open()`` also does the hello; call ``hello()`` otherwise."""
        self._sock = sock
        self._max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._inbox: deque[dict[str, Any]] = deque()
        self._next_id = 1
        self._current: Stream | None = None
        # Requests given up on (closed stream, timeout): their remaining
        # messages are read and dropped until their final reply.
        self._abandoned: set[int] = set()
        self._dead: AmberError | None = None
        self.version: int | None = None
        self.server: str | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        retry_for: float = 0,
        *,
        max_frame: int = MAX_FRAME,
    ) -> Self:
        """Connect to amberd and say hello.

        Args:
            path: the socket; ``default_socket_path()`` if None.
            timeout: seconds for each blocking socket operation (None: wait
                forever), until changed with ``settimeout()``.
            retry_for: keep trying for this many seconds while the socket is
                missing or refuses connections, or the daemon hangs up before
                answering the hello: a daemon that is (re)starting.

        Raises:
            DaemonUnreachable: nobody answered in time.
            AmberError: the daemon refused the hello (``protocol-version``) or
                did not answer it in ``timeout`` (``timeout``).
        """
        where = os.fspath(path) if path is not None else default_socket_path()
        deadline = time.monotonic() + retry_for
        delay = 0.005
        while True:
            try:
                sock = _connect(where, timeout)
            except OSError as exc:
                reason: AmberError = DaemonUnreachable(
                    f"cannot reach amberd at {where}: {_describe(exc)}",
                    path=where,
                    errno=exc.errno,
                )
                retriable = exc.errno in _RETRY_ERRNOS
            else:
                conn = cls(sock, max_frame=max_frame)
                try:
                    conn.hello()
                    return conn
                except ConnectionLost:
                    conn.close()
                    reason = DaemonUnreachable(
                        f"amberd at {where} hung up before answering", path=where
                    )
                    retriable = True
                except BaseException:
                    conn.close()
                    raise
            remaining = deadline - time.monotonic()
            if not retriable or remaining <= 0:
                raise reason
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    def hello(self, versions: Iterable[int] = SUPPORTED_VERSIONS, client: str = CLIENT_NAME) -> int:
        """Agree on a protocol version with the daemon; return it."""
        versions = tuple(versions)
        self._send(encode_frame(hello_request(versions, client), self._max_frame))
        try:
            self.version, self.server = parse_hello_reply(self._receive_raw(), versions)
        except ProtocolError as exc:
            raise self._fail(exc) from None
        return self.version

    def request(
        self, op: str, args: Mapping[str, Any] | None = None, *, fds: Sequence[int] = ()
    ) -> Stream:
        """Send a request; return the ``Stream`` that reads its events and reply.

        ``fds`` are sent along with the frame (SCM_RIGHTS), e.g. the user's
        terminal for ``shell``; the daemon gets duplicates, ours stay open.
        A request still unfinished is abandoned: its remaining messages are
        dropped as they arrive.
        """
        if self._current is not None:
            self._current.close()
        id_ = self._next_id
        self._next_id += 1
        frame = encode_frame(request(id_, op, args, len(fds)), self._max_frame)
        self._send(frame, fds)
        self._current = Stream(self, id_)
        return self._current

    def call(self, op: str, /, **args: Any) -> dict[str, Any]:
        """Make a request and return its result, ignoring any events.

        Raises:
            AmberError: the daemon's error reply, with its code.
        """
        with self.request(op, args) as stream:
            return stream.wait()

    def stream(self, op: str, /, **args: Any) -> Stream:
        """Make a request whose events the caller wants to see as they come."""
        return self.request(op, args)

    def settimeout(self, timeout: float | None) -> None:
        """Change the limit on each blocking operation, e.g. none while a build streams."""
        self._sock.settimeout(timeout)

    def close(self) -> None:
        """Close the socket; the daemon cancels whatever it was doing for us."""
        if self._dead is None:
            self._dead = ConnectionLost("the connection is closed")
        self._sock.close()

    # --- internals, used by Stream -------------------------------------------

    def _send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        if self._dead is not None:
            raise self._dead
        try:
            sent = 0
            if fds:
                # The descriptors ride on the first bytes; the kernel may take
                # only part of a large frame, so finish with sendall.
                sent = socket.send_fds(self._sock, [frame], list(fds), socket.MSG_NOSIGNAL)
            if sent < len(frame):
                # Never send zero bytes: that fails with EPIPE once the
                # daemon has answered and hung up.
                self._sock.sendall(memoryview(frame)[sent:], socket.MSG_NOSIGNAL)
        except TimeoutError:
            # Part of the frame may be out: the stream is out of sync.
            raise self._fail(AmberError(ErrorCode.TIMEOUT, "timed out sending to amberd")) from None
        except OSError as exc:
            raise self._fail(ConnectionLost(f"lost amberd: {_describe(exc)}")) from None

    def _receive(self) -> Event | Reply:
        """The next message from the daemon, whichever request it is for."""
        try:
            return parse_server_message(self._receive_raw())
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def _receive_raw(self) -> dict[str, Any]:
        """The next message from the daemon, as decoded, before any checks."""
        while not self._inbox:
            if self._dead is not None:
                raise self._dead
            try:
                data = self._sock.recv(_RECV_SIZE)
            except TimeoutError:
                # Nothing was consumed, so the connection is still usable.
                raise AmberError(ErrorCode.TIMEOUT, "timed out waiting for amberd") from None
            except OSError as exc:
                raise self._fail(ConnectionLost(f"lost amberd: {_describe(exc)}")) from None
            if not data:
                raise self._fail(ConnectionLost())
            try:
                self._inbox.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                raise self._fail(exc) from None
        return self._inbox.popleft()

    def _receive_for(self, id_: int) -> Event | Reply:
        """The next message for request ``id_``, dropping those of abandoned ones."""
        while True:
            msg = self._receive()
            if msg.id == id_:
                return msg
            if msg.id in self._abandoned:
                if isinstance(msg, Reply):
                    self._abandoned.discard(msg.id)
                continue
            if msg.id is None and isinstance(msg, Reply):
                # The daemon could not read the request's id; it can only be ours.
                return msg
            raise self._fail(
                ProtocolError(ErrorCode.BAD_REPLY, f"message for unknown request {msg.id}")
            )

    def _abandon(self, stream: Stream) -> None:
        self._abandoned.add(stream.id)
        if self._current is stream:
            self._current = None

    def _finish(self, stream: Stream) -> None:
        if self._current is stream:
            self._current = None

    def _fail(self, exc: AmberError) -> AmberError:
        """Close the connection for good after ``exc``; return it for raising."""
        self._dead = exc
        self._sock.close()
        return exc


class Stream(_Closing):
    """The events and final reply of one request.

    Iterating yields each event as its message dict (``{"id", "event",
    "data"}``) as soon as it arrives. The iteration ends with the final
    reply: it stops (with the result as ``StopIteration.value``, so ``result
    = yield from stream`` works) on success, and raises the ``AmberError``
    on an error reply. ``wait()`` returns the result afterwards, or skips
    the remaining events to get it. A ``timeout`` error leaves the stream
    usable: iterate again to keep waiting.
    """

    def __init__(self, conn: Connection, id: int) -> None:
        self._conn = conn
        self.id = id
        self.done = False
        self._result: dict[str, Any] | None = None
        self._error: AmberError | None = None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.done:
            raise StopIteration(self._result)
        msg = self._conn._receive_for(self.id)
        if isinstance(msg, Event):
            return {"id": msg.id, "event": msg.name, "data": msg.data}
        self.done = True
        self._conn._finish(self)
        if msg.error is not None:
            self._error = msg.error
            raise msg.error
        self._result = msg.result
        raise StopIteration(self._result)

    def wait(self) -> dict[str, Any]:
        """The final result, skipping events not yet read.

        Raises:
            AmberError: the daemon's error reply (again, if iteration already
                raised it), or a connection failure.
        """
        for _ in self:
            pass
        if self._error is not None:
            raise self._error
        if self._result is None:  # closed before the reply came
            raise AmberError(ErrorCode.CONNECTION_LOST, "the request was abandoned")
        return self._result

    def close(self) -> None:
        """Stop caring about this request; its remaining messages will be dropped."""
        if not self.done:
            self.done = True
            self._conn._abandon(self)


def _connect(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)
