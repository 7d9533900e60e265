"""The Unix socket server: framing, hello, identity, dispatch, error mapping.

Each connection is read with ``recvmsg`` so that file descriptors passed
with SCM_RIGHTS (``amber shell`` sends its terminal) are collected as they
arrive. The peer's identity comes from SO_PEERCRED, never from the request.
This module is the one place where exceptions become wire replies: a
``DaemonError`` goes through ``errors.to_wire`` (the one table of wire
codes), an ``AmberError`` from the protocol's checks of a hello or request
is sent as it is, a malformed frame closes that connection only, and
anything unexpected is logged and answered with an opaque ``internal``
error; other clients never notice.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import math
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from amber.client import __version__
from amber.client.errors import AmberError, ErrorCode, ProtocolError
from amber.client.protocol import (
    MAX_FRAME,
    MAX_ITEMS,
    MAX_REQUEST_FRAME,
    FrameDecoder,
    encode_frame,
    error_reply,
    hello_reply,
    parse_hello,
    parse_request,
    pick_version,
    request_id,
    result_reply,
)
from amber.daemon.api.registry import Api
from amber.daemon.errors import BadRequest, Busy, DaemonError, Internal, NotFound, to_wire
from amber.sandbox.store import MissingObject

if TYPE_CHECKING:
    from amber.daemon.config import Config

log = logging.getLogger("amber.server")
_RECV = 256 * 1024
_MAX_FDS = 16
_LAST_WORD = 1.0  # seconds a client has to take an error before we hang up


@dataclass
class Peer:
    pid: int
    uid: int
    gid: int
    #: Supplementary groups when it connected (SO_PEERGROUPS): for ``admin-group``, and
    #: what a helper reading as the peer gets.
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


@dataclass
class Connection:
    sock: trio.socket.SocketType
    peer: Peer
    max_frame: int
    fds: deque[int] = field(default_factory=deque)
    closed: bool = False
    request_id: int = 0  # the request being served (one at a time per connection)
    request_fds: int = 0  # how many descriptors that request announced

    async def send(self, message: dict) -> None:
        data = encode_frame(message, self.max_frame)
        try:
            view = memoryview(data)
            while view:
                n = await self.sock.send(view)
                view = view[n:]
        except OSError as exc:
            self.closed = True
            raise ConnectionGone(str(exc)) from None

    def take_fds(self, count: int) -> list[int]:
        if count > len(self.fds):
            raise BadRequest(
                f"request announced {count} file descriptors, {len(self.fds)} arrived",
            )
        return [self.fds.popleft() for _ in range(count)]

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.popleft())


class ConnectionGone(Exception):
    """The client went away; whatever it asked for carries on without it."""


def peer_of(sock: trio.socket.SocketType) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, peer_groups(sock))


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python names it from 3.14


def peer_groups(sock: trio.socket.SocketType) -> tuple[int, ...]:
    """The peer's supplementary groups as the kernel recorded them at connect.

    Read from the socket, never asked of the client; none on a kernel without
    SO_PEERGROUPS (then only the primary gid counts for ``admin-group``).
    """
    size = 256 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < (1 << 20):
                size *= 16  # NGROUPS_MAX is 65536: 256 KiB is the most it can need
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                return ()
            raise
        return tuple(array.array("I", raw[: len(raw) // 4 * 4]))


@dataclass(frozen=True)
class Limits:
    """What one client may cost amberd (see the config options of the same names)."""

    max_frame: int = MAX_FRAME  # replies
    max_request_frame: int = MAX_REQUEST_FRAME
    max_connections: int = 512
    max_connections_per_uid: int = 64
    hello_timeout: float = 10.0

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(
            max_frame=config.max_frame,
            max_request_frame=min(config.max_request_frame, config.max_frame),
            max_connections=config.max_connections,
            max_connections_per_uid=config.max_connections_per_uid,
            hello_timeout=config.hello_timeout,
        )


class _Slots:
    """Connections open, in all and per uid; root is never refused one."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.by_uid: dict[int, int] = {}

    def refusal(self, peer: Peer) -> str | None:
        if peer.is_root:
            return None
        if self.total >= self.limits.max_connections:
            return f"amberd has {self.total} connections open, its limit (max-connections)"
        if self.by_uid.get(peer.uid, 0) >= self.limits.max_connections_per_uid:
            return (
                f"uid {peer.uid} has {self.by_uid[peer.uid]} connections open to amberd, "
                "its limit (max-connections-per-uid); close some"
            )
        return None

    def take(self, peer: Peer) -> None:
        self.total += 1
        self.by_uid[peer.uid] = self.by_uid.get(peer.uid, 0) + 1

    def give_back(self, peer: Peer) -> None:
        self.total -= 1
        left = self.by_uid[peer.uid] - 1
        if left:
            self.by_uid[peer.uid] = left
        else:
            del self.by_uid[peer.uid]


async def _receive(conn: Connection) -> tuple[bytes, list[int]]:
    """Bytes and the descriptors that came with them (closed on exec, not kept yet)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = await conn.sock.recvmsg(
        _RECV, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    for fd in fds:
        os.set_inheritable(fd, False)
    return data, list(fds)


async def serve_connection(
    api: Api, sock: trio.socket.SocketType, limits: Limits, peer: Peer
) -> None:
    """Serve one client until it hangs up, or breaks the protocol or its time limits.

    The hello, and the rest of any frame once its first byte has arrived,
    must come within ``hello_timeout``: a client that stops half-way holds
    nothing for long (descriptors it sent included). Descriptors ride only
    on the first byte of a request after the hello; any others close the
    connection at once. Requests run outside those time limits.
    """
    conn = Connection(sock, peer, limits.max_frame)
    decoder = FrameDecoder(limits.max_request_frame, max_items=MAX_ITEMS)
    greeted = False
    deadline = trio.current_time() + limits.hello_timeout
    try:
        while not conn.closed:
            received = None
            with trio.move_on_at(deadline):
                received = await _receive(conn)
            if received is None:
                await _hang_up_late(
                    conn, "a hello" if not greeted else "the rest of a frame", limits
                )
                return
            data, fds = received
            if not data:
                _close_all(fds)
                return
            problem = _misplaced_fds(fds, greeted, decoder, conn)
            if problem:
                _close_all(fds)
                raise ProtocolError(ErrorCode.BAD_REQUEST, problem)
            conn.fds.extend(fds)
            for message in decoder.feed(data):
                if not greeted:
                    greeted = await _hello(conn, message)
                    if not greeted:
                        return
                    continue
                await _dispatch(api, conn, message)
            if decoder.buffered == 0 and greeted:
                deadline = math.inf
            elif deadline == math.inf:
                deadline = trio.current_time() + limits.hello_timeout
    except ProtocolError as exc:
        log.warning("pid %d uid %d: closing connection: %s", peer.pid, peer.uid, exc.message)
        await _send_quietly(conn, error_reply(None, exc))
    except (ConnectionGone, OSError):
        return
    finally:
        conn.close_fds()
        sock.close()


async def _hang_up_late(conn: Connection, what: str, limits: Limits) -> None:
    peer = conn.peer
    log.warning("pid %d uid %d: closing connection: no %s in time", peer.pid, peer.uid, what)
    late = AmberError(ErrorCode.TIMEOUT, f"no {what} within {limits.hello_timeout:g}s")
    await _send_quietly(conn, error_reply(None, late))


def _misplaced_fds(
    fds: list[int], greeted: bool, decoder: FrameDecoder, conn: Connection
) -> str | None:
    """Why descriptors that just arrived cannot belong to a request, if they cannot."""
    if not fds:
        return None
    if not greeted:
        return "file descriptors sent before the hello"
    if decoder.buffered or conn.fds:
        return "file descriptors sent in the middle of a frame"
    return None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


async def _hello(conn: Connection, message: dict) -> bool:
    try:
        if message.get("op") != "hello":
            raise BadRequest("the first message must be a hello")
        versions, _client = parse_hello(message)
        version = pick_version(versions)
    except AmberError as exc:
        await _send_quietly(conn, error_reply(request_id(message), exc))
        return False
    except DaemonError as exc:
        await _send_quietly(conn, error_reply(request_id(message), to_wire(exc)))
        return False
    await conn.send(hello_reply(version, f"amberd/{__version__}"))
    return True


async def _dispatch(api: Api, conn: Connection, message: dict) -> None:
    rid = request_id(message)
    try:
        request = parse_request(message)
        # Descriptors the request did not announce are closed now, not when it ends.
        while len(conn.fds) > request.fds:
            os.close(conn.fds.pop())
        reply = result_reply(request.id, await api.handle(conn, request))
    except DaemonError as exc:
        reply = error_reply(rid, to_wire(exc))
    except AmberError as exc:
        reply = error_reply(rid, exc)
    except ConnectionGone:
        raise
    except MissingObject as exc:
        # Collected by GC or deleted behind amber's back: the user's answer,
        # not amberd's bug.
        gone = NotFound(f"{exc}; it was garbage-collected or removed")
        reply = error_reply(rid, to_wire(gone))
    except Exception:
        log.exception("request %r from uid %d failed", message.get("op"), conn.peer.uid)
        reply = error_reply(rid, to_wire(Internal("amberd hit an internal error; see its log")))
    finally:
        # Descriptors nobody took are closed, not leaked, and before the
        # reply: a client that has it may count on them being gone.
        conn.close_fds()
    await conn.send(reply)


async def _send_quietly(conn: Connection, message: dict) -> None:
    """A last word before hanging up, if the client takes it soon: one that
    reads nothing must not keep the connection (and its slot) open."""
    with contextlib.suppress(ConnectionGone, ProtocolError), trio.move_on_after(_LAST_WORD):
        await conn.send(message)


def listen(path: Path, *, mode: int, group: str | None) -> trio.socket.SocketType:
    """Bind the socket, replacing a stale file but never a live daemon's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            path.unlink(missing_ok=True)
        else:
            raise OSError(errno.EADDRINUSE, f"another amberd is listening on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock._sock.bind(str(path))  # sync bind: no await needed before serving
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if group:
        import grp

        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(128)
    return sock


async def serve(
    api: Api,
    listener: trio.socket.SocketType,
    limits: Limits,
    connections: trio.Nursery | None = None,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections until cancelled; each is served in its own task.

    Connection tasks run in ``connections`` when given, so that cancelling
    the accept loop (a daemon stopping) leaves clients that follow a build
    connected until they have its outcome.
    """
    slots = _Slots(limits)
    async with trio.open_nursery() as own:
        where = connections or own
        task_status.started()
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; pausing", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            where.start_soon(_serve_counted, api, sock, limits, slots)


async def _serve_counted(
    api: Api, sock: trio.socket.SocketType, limits: Limits, slots: _Slots
) -> None:
    """Serve a connection in one of the slots its uid may have, or refuse it."""
    try:
        peer = peer_of(sock)
    except OSError:
        sock.close()
        return
    refusal = slots.refusal(peer)
    if refusal is not None:
        log.warning("pid %d uid %d: refused: %s", peer.pid, peer.uid, refusal)
        conn = Connection(sock, peer, limits.max_frame)
        # Read the hello first: closing on unread data resets the connection,
        # and the client would never see why. Id 0 answers that hello.
        with contextlib.suppress(OSError), trio.move_on_after(_LAST_WORD):
            _close_all((await _receive(conn))[1])
        await _send_quietly(conn, error_reply(0, to_wire(Busy(refusal))))
        sock.close()
        return
    slots.take(peer)
    try:
        await serve_connection(api, sock, limits, peer)
    finally:
        slots.give_back(peer)
