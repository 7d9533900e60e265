"""The Unix socket server: framing, hello, identity, dispatch, error mapping.

Each connection is read with ``recvmsg`` so that file descriptors passed
with SCM_RIGHTS (``amber shell`` sends its terminal) are collected as they
arrive. The peer's identity comes from SO_PEERCRED, never from the request.
This module is the one place where exceptions become wire replies: a
``DaemonError`` goes through ``errors.to_wire`` (the one table of wire
codes), an ``AmberError`` from code not converted yet is sent as it is, a
malformed frame closes that connection
only, and anything unexpected is logged and answered with an opaque
``internal`` error; other clients never notice.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import trio

from amber.client import __version__
from amber.client.errors import AmberError, ProtocolError
from amber.client.protocol import (
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
from amber.daemon.errors import BadRequest, DaemonError, Internal, NotFound, to_wire
from amber.sandbox.store import MissingObject

log = logging.getLogger("amber.server")
_RECV = 256 * 1024
_MAX_FDS = 16


@dataclass
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


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
    return Peer(pid, uid, gid)


async def _receive(conn: Connection) -> bytes:
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
        conn.fds.append(fd)
    return data


async def serve_connection(api: Api, sock: trio.socket.SocketType, max_frame: int) -> None:
    try:
        peer = peer_of(sock)
    except OSError:
        sock.close()
        return
    conn = Connection(sock, peer, max_frame)
    decoder = FrameDecoder(max_frame)
    greeted = False
    try:
        while not conn.closed:
            try:
                data = await _receive(conn)
            except OSError:
                return
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except ProtocolError as exc:
                log.warning(
                    "pid %d uid %d: closing connection: %s", peer.pid, peer.uid, exc.message
                )
                await _send_quietly(conn, error_reply(None, exc))
                return
            for message in messages:
                if not greeted:
                    greeted = await _hello(conn, message)
                    if not greeted:
                        return
                    continue
                await _dispatch(api, conn, message)
    except ConnectionGone:
        return
    finally:
        conn.close_fds()
        sock.close()


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
        result = await api.handle(conn, request)
    except DaemonError as exc:
        await conn.send(error_reply(rid, to_wire(exc)))
    except AmberError as exc:
        await conn.send(error_reply(rid, exc))
    except ConnectionGone:
        raise
    except MissingObject as exc:
        # Collected by GC or deleted behind amber's back: the user's answer,
        # not amberd's bug.
        gone = NotFound(f"{exc}; it was garbage-collected or removed")
        await conn.send(error_reply(rid, to_wire(gone)))
    except Exception:
        log.exception("request %r from uid %d failed", message.get("op"), conn.peer.uid)
        bug = Internal("amberd hit an internal error; see its log")
        await conn.send(error_reply(rid, to_wire(bug)))
    else:
        await conn.send(result_reply(request.id, result))
    finally:
        conn.close_fds()  # descriptors nobody took are closed, not leaked


async def _send_quietly(conn: Connection, message: dict) -> None:
    with contextlib.suppress(ConnectionGone):
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
    max_frame: int,
    connections: trio.Nursery | None = None,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections until cancelled; each is served in its own task.

    Connection tasks run in ``connections`` when given, so that cancelling
    the accept loop (a daemon stopping) leaves clients that follow a build
    connected until they have its outcome.
    """
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
            where.start_soon(serve_connection, api, sock, max_frame)
