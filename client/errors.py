"""Error codes and exceptions shared by amberd and its clients.

Errors cross the wire as data (``{"code": ..., "message": ...}``), so the
code is the contract: tests assert it, the CLI maps it to exit codes and
messages. Codes are plain strings; a client must accept codes it does not
know (a newer daemon may add some), which is why ``AmberError.code`` is a
``str`` and not an ``ErrorCode``.
"""

from __future__ import annotations

from enum import StrEnum

# `typing` costs ~5 ms to import and the CLI has a tight start-up budget.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ErrorCode(StrEnum):
    """Stable error codes. Members compare equal to their string values."""

    # Sent by the daemon in error replies.
    BAD_REQUEST = "bad-request"  # a frame that is not a request (no op, bad id, ...)
    UNKNOWN_OP = "unknown-op"
    BAD_ARGS = "bad-args"  # arguments missing, unexpected or of the wrong type
    NOT_FOUND = "not-found"
    PERMISSION_DENIED = "permission-denied"
    SPEC_ERROR = "spec-error"
    BUSY = "busy"
    INTERNAL = "internal"  # a bug in amberd; the details are in its log only
    PROTOCOL_VERSION = "protocol-version"  # no protocol version in common
    SANDBOX_FAILED = "sandbox-failed"  # a sandbox did not start (bwrap's message says why)
    BAD_IMAGE = "bad-image"  # an image to import that amber cannot read
    EXPORT_FAILED = "export-failed"  # an export that could not be written or sent
    TIMEOUT = (
        "timeout"  # no hello in time, a stopped helper of the user (client: no answer in time)
    )

    # Framing errors: the connection is closed after one of these.
    FRAME_TOO_LARGE = "frame-too-large"
    MALFORMED_FRAME = "malformed-frame"  # not valid msgpack, or extra bytes
    NOT_A_MAP = "not-a-map"  # valid msgpack, but not a map with str keys

    # Raised on the client side only; never sent by the daemon.
    BAD_REPLY = "bad-reply"  # a well-framed message of the wrong shape
    UNREACHABLE = "unreachable"  # nobody listens on the socket
    CONNECTION_LOST = "connection-lost"  # the daemon hung up mid-conversation
    ENGINE_FAILED = "engine-failed"  # the container engine refused an image amber sent it


class AmberError(Exception):
    """An error with a stable code: raised by handlers, sent as a reply, re-raised by clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        # str() turns an ErrorCode member into its plain value, so the code
        # serialises the same whichever form the raiser used.
        self.code: str = str(code)
        self.message: str = message

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` map of an error reply."""
        return {"code": self.code, "message": self.message}


class ProtocolError(AmberError):
    """The byte stream or a message in it is broken.

    The peer cannot be trusted to be in sync any more, so whoever catches
    this closes that one connection rather than replying on it.
    """


class DaemonUnreachable(AmberError):
    """Nobody accepts connections on the socket (the CLI exits with 3).

    ``path`` and ``errno`` say which socket was tried and how connecting
    failed, so the CLI can tell the user what to do (join the group, start
    the socket unit, ...) without parsing the message.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(ErrorCode.UNREACHABLE, message)
        self.path = path
        self.errno = errno


class ConnectionLost(AmberError):
    """The daemon closed the connection before answering."""

    def __init__(self, message: str = "amberd closed the connection") -> None:
        super().__init__(ErrorCode.CONNECTION_LOST, message)
