"""The amber wire protocol: framing and message shapes, with no I/O.

Both ends use this module: amberd (trio) feeds received bytes to a
``FrameDecoder`` and builds replies with the helpers below; the blocking
client in ``connection.py`` does the same from the other side. Keeping it
free of I/O lets the protocol be tested without sockets.

A frame is a 4-byte big-endian length followed by one msgpack map with str
keys. A conversation is::

    client: {"op": "hello", "id": 0, "versions": [1], "client": "amber/0.1.0"}
    server: {"id": 0, "ok": True, "version": 1, "server": "amberd/0.1.0"}
    client: {"op": "build", "id": 1, "args": {...}}
    server: {"id": 1, "event": "log", "data": {...}}        (zero or more)
    server: {"id": 1, "ok": True, "result": {...}}
         or {"id": 1, "ok": False, "error": {"code": "...", "message": "..."}}

A request that carries file descriptors (SCM_RIGHTS) says how many in an
``"fds"`` key, so the server can tell which descriptors belong to which
request and close any it did not ask for. The descriptors travel with the
frame's first byte, so they have arrived by the time the frame decodes.

Error replies are for requests; a broken frame (``ProtocolError``) means the
byte stream can no longer be trusted, and that one connection is closed.
"""

from __future__ import annotations

import struct

import msgpack

from . import __version__
from .errors import AmberError, ConnectionLost, DaemonUnreachable, ErrorCode, ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

__all__ = [
    "CLIENT_NAME",
    "MAX_DEPTH",
    "MAX_FRAME",
    "MAX_ITEMS",
    "MAX_REQUEST_FRAME",
    "SUPPORTED_VERSIONS",
    "AmberError",
    "ConnectionLost",
    "DaemonUnreachable",
    "ErrorCode",
    "Event",
    "FrameDecoder",
    "ProtocolError",
    "Reply",
    "Request",
    "encode_frame",
    "error_reply",
    "event",
    "hello_reply",
    "hello_request",
    "parse_hello",
    "parse_hello_reply",
    "parse_request",
    "parse_server_message",
    "pick_version",
    "request",
    "request_id",
    "result_reply",
]

SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
CLIENT_NAME = f"amber/{__version__}"

MAX_FRAME = 16 * 1024 * 1024
"""Default limit on a frame's body. Large data (blobs, images) never goes
through frames; they carry paths, digests and log lines."""

MAX_REQUEST_FRAME = 1024 * 1024
"""Default limit on a request's body, which amberd decodes from anyone: a
spec's worth of arguments. One byte of msgpack can become a 64-byte Python
object, so the frame limit is what bounds the memory a request costs."""

MAX_ITEMS = 100_000
"""Most containers plus their entries in one request (``FrameDecoder(max_items=)``)."""

MAX_DEPTH = 32
"""Deepest nesting of containers in one request."""

_HEADER = struct.Struct(">I")


# --- framing -----------------------------------------------------------------


def encode_frame(msg: Mapping[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """Serialise one message as a frame.

    Raises:
        ProtocolError: ``frame-too-large`` if the peer would refuse the frame;
            failing here names the culprit instead of losing the connection.
    """
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > max_frame:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"message of {len(body)} bytes exceeds {max_frame}"
        )
    return _HEADER.pack(len(body)) + body


def _reject_ext(code: int, data: bytes) -> object:
    # Extension types have no meaning in amber; refuse them rather than hand
    # an ExtType to code that expects plain data. (msgpack decodes its own
    # Timestamp without asking; schemas refuse it wherever types matter.)
    raise ValueError(f"msgpack extension type {code} not allowed")


class FrameDecoder:
    """Turns a byte stream, in chunks of any size, into messages.

    The length header is checked as soon as it is complete, before any of
    the body is buffered, so a peer cannot make us hold more than
    ``max_frame`` bytes. After a ``ProtocolError`` the stream is out of
    sync: the decoder refuses further input and the connection must close.
    """

    def __init__(self, max_frame: int = MAX_FRAME, *, max_items: int | None = None) -> None:
        """``max_items`` (amberd's side) also bounds what one frame decodes to:
        containers and their entries counted as they are built, and nesting
        depth; without it (the client, reading its daemon) only the size."""
        self.max_frame = max_frame
        self.max_items = max_items
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return every message they complete, in order.

        Raises:
            ProtocolError: ``frame-too-large``, ``malformed-frame`` or
                ``not-a-map``; raised again on any later call.
        """
        if self._error is not None:
            raise self._error
        self._buf += data
        messages: list[dict[str, Any]] = []
        pos = 0
        try:
            while len(self._buf) - pos >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buf, pos)
                if length > self.max_frame:
                    raise ProtocolError(
                        ErrorCode.FRAME_TOO_LARGE,
                        f"frame of {length} bytes exceeds the limit of {self.max_frame}",
                    )
                end = pos + _HEADER.size + length
                if len(self._buf) < end:
                    break
                messages.append(
                    self._decode(bytes(self._buf[pos + _HEADER.size : end]), self.max_items)
                )
                pos = end
        except ProtocolError as exc:
            # A copy without a traceback: the raised one's frames hold this
            # decoder, a cycle that kept every refused frame's objects alive
            # until the cyclic GC ran.
            self._error = ProtocolError(exc.code, exc.message)
            self._buf.clear()
            raise
        del self._buf[:pos]
        return messages

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a whole frame (0 at a frame boundary)."""
        return len(self._buf)

    @staticmethod
    def _decode(body: bytes, max_items: int | None = None) -> dict[str, Any]:
        if not body:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "empty frame")
        bounds: dict[str, Any] = {}
        if max_items is not None:
            counter = _ItemCounter(max_items)
            bounds = dict(
                max_array_len=max_items,
                max_map_len=max_items,
                object_hook=counter.container,
                list_hook=counter.container,
            )
        try:
            msg = msgpack.unpackb(
                body, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext, **bounds
            )
            if max_items is not None:
                _check_depth(msg, MAX_DEPTH)
        except _TooMany as exc:
            problem = str(exc)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # ValueError covers ExtraData, FormatError, StackError and invalid
            # UTF-8; TypeError covers unhashable map keys.
            problem = f"invalid msgpack: {str(exc) or type(exc).__name__}"
        else:
            problem = None
        if problem is not None:
            # Raised outside the except: chained to the original, the error
            # would keep its traceback, and with it the half-decoded objects.
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, problem)
        if not isinstance(msg, dict):
            raise ProtocolError(
                ErrorCode.NOT_A_MAP, f"frame holds a {type(msg).__name__}, not a map"
            )
        if not all(isinstance(key, str) for key in msg):
            raise ProtocolError(ErrorCode.NOT_A_MAP, "message keys must be strings")
        return msg


class _TooMany(Exception):
    """A frame that decodes to more than its bounds allow."""


class _ItemCounter:
    """Counts containers and entries as msgpack builds them, and stops it early."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def container(self, value: Any) -> Any:
        self.left -= 1 + len(value)
        if self.left < 0:
            raise _TooMany("too many items in one message")
        return value


def _check_depth(msg: object, limit: int) -> None:
    """Refuse containers nested deeper than ``limit`` (handlers recurse on them)."""
    stack: list[tuple[object, int]] = [(msg, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict | list):
            if depth > limit:
                raise _TooMany(f"containers nested deeper than {limit}")
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))  # type: ignore[union-attr]


# --- hello ---------------------------------------------------------------------


def hello_request(
    versions: Iterable[int] = SUPPORTED_VERSIONS, client: str = CLIENT_NAME
) -> dict[str, Any]:
    """The first message a client sends."""
    return {"op": "hello", "id": 0, "versions": list(versions), "client": client}


def parse_hello(untrusted: Mapping[str, Any]) -> tuple[list[int], str]:
    """Check a client's first message; return its (versions, client name).

    Raises:
        AmberError: ``bad-request`` if it is not a hello.
    """
    if untrusted.get("op") != "hello" or _int_or_none(untrusted.get("id")) != 0:
        raise AmberError(ErrorCode.BAD_REQUEST, "the first message must be a hello with id 0")
    versions = untrusted.get("versions")
    if not isinstance(versions, list) or not all(_is_int(v) for v in versions):
        raise AmberError(ErrorCode.BAD_REQUEST, "hello: versions must be a list of ints")
    client = untrusted.get("client", "")
    if not isinstance(client, str):
        raise AmberError(ErrorCode.BAD_REQUEST, "hello: client must be a str")
    return versions, client


def pick_version(offered: Iterable[int], supported: Iterable[int] = SUPPORTED_VERSIONS) -> int:
    """The highest version both sides speak.

    Raises:
        AmberError: ``protocol-version`` if there is none.
    """
    common = set(offered) & set(supported)
    if not common:
        raise AmberError(
            ErrorCode.PROTOCOL_VERSION,
            f"no common protocol version: peer speaks {sorted(set(offered))}, "
            f"we speak {sorted(set(supported))}",
        )
    return max(common)


def hello_reply(version: int, server: str) -> dict[str, Any]:
    """The server's answer to a hello it accepts (refusals use ``error_reply(0, ...)``)."""
    return {"id": 0, "ok": True, "version": version, "server": server}


def parse_hello_reply(
    untrusted: Mapping[str, Any], supported: Iterable[int] = SUPPORTED_VERSIONS
) -> tuple[int, str]:
    """Check the server's answer to our hello; return (version, server name).

    Raises:
        AmberError: the server's refusal, or ``protocol-version`` if it chose a
            version we did not offer.
        ProtocolError: ``bad-reply`` if the answer has the wrong shape.
    """
    reply = parse_server_message(untrusted)
    if not isinstance(reply, Reply) or reply.id != 0:
        raise ProtocolError(ErrorCode.BAD_REPLY, "expected the reply to hello")
    if reply.error is not None:
        raise reply.error
    version, server = untrusted.get("version"), untrusted.get("server", "")
    if not _is_int(version) or not isinstance(server, str):
        raise ProtocolError(ErrorCode.BAD_REPLY, "hello reply lacks version or server")
    if version not in set(supported):
        raise AmberError(
            ErrorCode.PROTOCOL_VERSION, f"server chose protocol version {version}, not offered"
        )
    return version, server


# --- requests ------------------------------------------------------------------


class Request:
    """A request whose envelope has been checked; ``args`` are still untrusted."""

    __slots__ = ("args", "fds", "id", "op")

    def __init__(self, id: int, op: str, args: dict[str, Any], fds: int = 0) -> None:
        self.id = id
        self.op = op
        self.args = args
        self.fds = fds

    def __repr__(self) -> str:
        return f"Request(id={self.id}, op={self.op!r}, fds={self.fds})"


def request(
    id: int, op: str, args: Mapping[str, Any] | None = None, fds: int = 0
) -> dict[str, Any]:
    """A request message; ``fds`` counts descriptors sent with it."""
    msg: dict[str, Any] = {"op": op, "id": id, "args": dict(args or {})}
    if fds:
        msg["fds"] = fds
    return msg


def request_id(untrusted: Mapping[str, Any]) -> int | None:
    """The id to answer a message with, even when the rest of it is bad."""
    return _int_or_none(untrusted.get("id"))


def parse_request(untrusted: Mapping[str, Any]) -> Request:
    """Check a request's envelope (op, id, args map, fds count).

    The arguments themselves are left to the handler's ``validate_args``
    schema. On failure, answer with ``error_reply(request_id(msg), exc)``.

    Raises:
        AmberError: ``bad-request``.
    """
    id_ = request_id(untrusted)
    if id_ is None or id_ < 1:
        raise AmberError(ErrorCode.BAD_REQUEST, "request id must be an int >= 1")
    op = untrusted.get("op")
    if not isinstance(op, str) or not op:
        raise AmberError(ErrorCode.BAD_REQUEST, "request op must be a non-empty str")
    args = untrusted.get("args", {})
    if not isinstance(args, dict):
        raise AmberError(ErrorCode.BAD_REQUEST, "request args must be a map")
    fds = untrusted.get("fds", 0)
    if not _is_int(fds) or fds < 0:
        raise AmberError(ErrorCode.BAD_REQUEST, "request fds must be an int >= 0")
    unknown = set(untrusted) - {"op", "id", "args", "fds"}
    if unknown:
        raise AmberError(ErrorCode.BAD_REQUEST, f"unexpected request keys {sorted(unknown)}")
    return Request(id_, op, args, fds)


# --- replies and events --------------------------------------------------------


def result_reply(id: int, result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The final, successful answer to request ``id``."""
    return {"id": id, "ok": True, "result": dict(result or {})}


def error_reply(id: int | None, error: AmberError) -> dict[str, Any]:
    """The final, failed answer to request ``id`` (``None`` if it had no usable id)."""
    return {"id": id, "ok": False, "error": error.to_wire()}


def event(id: int, name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A streamed event for request ``id``, sent before its final reply."""
    return {"id": id, "event": name, "data": dict(data or {})}


class Event:
    """A streamed event, as the client sees it."""

    __slots__ = ("data", "id", "name")

    def __init__(self, id: int, name: str, data: dict[str, Any]) -> None:
        self.id = id
        self.name = name
        self.data = data

    def __repr__(self) -> str:
        return f"Event(id={self.id}, name={self.name!r}, data={self.data!r})"


class Reply:
    """A final reply, as the client sees it: ``error`` is None on success."""

    __slots__ = ("error", "id", "result")

    def __init__(
        self, id: int | None, result: dict[str, Any] | None, error: AmberError | None
    ) -> None:
        self.id = id
        self.result = result
        self.error = error

    def __repr__(self) -> str:
        if self.error is None:
            return f"Reply(id={self.id}, result={self.result!r})"
        return f"Reply(id={self.id}, error={self.error!r})"


def parse_server_message(untrusted: Mapping[str, Any]) -> Event | Reply:
    """Classify a message from the server as an ``Event`` or a final ``Reply``.

    Raises:
        ProtocolError: ``bad-reply`` if it is neither.
    """
    id_ = request_id(untrusted)
    if id_ is None and untrusted.get("id") is not None:
        raise ProtocolError(ErrorCode.BAD_REPLY, "server message id must be an int or nil")
    if "event" in untrusted:
        name, data = untrusted["event"], untrusted.get("data", {})
        if id_ is None or not isinstance(name, str) or not isinstance(data, dict):
            raise ProtocolError(ErrorCode.BAD_REPLY, "malformed event")
        return Event(id_, name, data)
    ok = untrusted.get("ok")
    if ok is True:
        result = untrusted.get("result", {})
        if id_ is None or not isinstance(result, dict):
            raise ProtocolError(ErrorCode.BAD_REPLY, "malformed result reply")
        return Reply(id_, result, None)
    if ok is False:
        error = untrusted.get("error")
        if not isinstance(error, dict):
            raise ProtocolError(ErrorCode.BAD_REPLY, "error reply without an error map")
        code, message = error.get("code"), error.get("message", "")
        if not isinstance(code, str) or not isinstance(message, str):
            raise ProtocolError(ErrorCode.BAD_REPLY, "error reply with a malformed error map")
        return Reply(id_, None, AmberError(code, message))
    raise ProtocolError(ErrorCode.BAD_REPLY, "server message is neither an event nor a reply")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or_none(value: object) -> int | None:
    return value if _is_int(value) else None  # type: ignore[return-value]
