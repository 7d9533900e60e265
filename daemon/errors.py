"""The daemon's own errors: what went wrong, in the daemon's words.

Handlers raise these; they know nothing of the wire. ``WIRE_CODES`` is the
one place that says which ``ErrorCode`` a client receives for each (see
``to_wire``, used by server.py at the API boundary), so every code a client
can get is a member of ``ErrorCode``. Only the protocol's own checks
(``client/protocol.py``: a malformed hello or request) raise ``AmberError``,
and only server.py turns those into replies.
"""

from __future__ import annotations

from amber.client.errors import AmberError, ErrorCode


class DaemonError(Exception):
    """Something the user should be told, with a message that says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(DaemonError):
    """A message that is not a request amberd understands (no hello first, ...)."""


class UnknownOperation(DaemonError):
    """An operation name amberd does not offer."""


class BadArgs(DaemonError):
    """Arguments that do not go together or do not make sense."""


class NotFound(DaemonError):
    """A build, step, image, pin, object or file that is not there (any more)."""


class PermissionDenied(DaemonError):
    """Something that belongs to another user, or that only root may do."""


class InvalidSpec(DaemonError):
    """A spec (or a base or source it names) that cannot be built."""


class Busy(DaemonError):
    """Something in use (a live build, a pin) or a daemon that is stopping."""


class SandboxFailed(DaemonError):
    """A sandbox that did not start (bwrap's message says why)."""


class ImageError(DaemonError):
    """An image to import that is not one amber can read."""


class ExportFailed(DaemonError):
    """An export that could not be written or sent."""


class TimedOut(DaemonError):
    """Something the request waits for did not answer in time (a stopped helper of the user's)."""


class Internal(DaemonError):
    """State amberd cannot make sense of: its own bug or damage to its files."""


#: The one map from the daemon's errors to the codes clients receive.
WIRE_CODES: dict[type[DaemonError], ErrorCode] = {
    BadRequest: ErrorCode.BAD_REQUEST,
    UnknownOperation: ErrorCode.UNKNOWN_OP,
    BadArgs: ErrorCode.BAD_ARGS,
    NotFound: ErrorCode.NOT_FOUND,
    PermissionDenied: ErrorCode.PERMISSION_DENIED,
    InvalidSpec: ErrorCode.SPEC_ERROR,
    Busy: ErrorCode.BUSY,
    SandboxFailed: ErrorCode.SANDBOX_FAILED,
    ImageError: ErrorCode.BAD_IMAGE,
    ExportFailed: ErrorCode.EXPORT_FAILED,
    TimedOut: ErrorCode.TIMEOUT,
    Internal: ErrorCode.INTERNAL,
}


def to_wire(exc: DaemonError) -> AmberError:
    """The error reply for ``exc``: its class's code (or its nearest base's), its message."""
    for cls in type(exc).__mro__:
        code = WIRE_CODES.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return AmberError(code, exc.message)
    return AmberError(ErrorCode.INTERNAL, exc.message)
