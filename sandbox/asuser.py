"""Opening a user's paths in a process that really is that user.

A root daemon reading "as the user" by switching its filesystem uid still
passes every check a uid cannot change: its capabilities (``/proc/PID/cwd``
of another user's process reaches into that user's 0700 home with
CAP_SYS_PTRACE) and its own supplementary groups. So a user's paths are
opened by a helper (``asuser_helper``) that subprocess starts as the user,
with the user's groups and nothing else, which proves it has no capability
left before it opens anything, and passes the descriptors back over a
SOCK_SEQPACKET socketpair (SCM_RIGHTS).

One helper serves a whole request (``UserReader``: every path a build's
sources and base name, and every file of a directory walk), not one per
file: a ``dir:`` base has thousands of files, and the walk streams them in
batches of descriptors, each answered before the next is sent. The helper
is killed and reaped when the reader closes (a ``with`` block: on success,
error or cancellation alike), and dies with the daemon (PR_SET_PDEATHSIG).
``asuser_pool`` keeps idle helpers for the next request of the same user
(uid, gid and groups alike), so that a cached build starts no process.

Whatever the helper sends is the user's word (they may ptrace it): messages
are parsed with bounds and descriptors checked with ``fstat`` by the caller.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import asuser_helper

_HELPER_SOURCE = Path(asuser_helper.__file__).read_text()
#: The helper's interpreter: the system's, which every user can run (the
#: daemon's own may live where only root can, e.g. under /root); any Python
#: 3.9+ runs the helper, which uses the standard library alone.
_PYTHON = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)),
    os.path.realpath(sys.executable),
)
#: Paths in one ``open`` request (the helper's per-message descriptor cap).
MAX_PATHS = asuser_helper.MAX_FDS
_RECV = 256 * 1024


@dataclass(frozen=True)
class User:
    """Who a request reads as: the peer's uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class Unreadable(Exception):
    """A path the user cannot open (``errno`` says why; ENOENT: it does not exist)."""

    def __init__(self, path: str, uid: int, err: int):
        self.path, self.uid, self.errno = path, uid, err
        super().__init__(f"cannot read {path} as uid {uid}: {os.strerror(err)}")

    @property
    def missing(self) -> bool:
        return self.errno in (errno.ENOENT, errno.ENOTDIR)


class WrongKind(Exception):
    """The path opened, but is not a regular file (or an allowed directory)."""

    def __init__(self, path: str, mode: int):
        self.path, self.mode = path, mode
        super().__init__(f"{path} has mode {mode:o}")


class HelperError(Exception):
    """The helper did not start, died, or sent something that is not the protocol."""


class HelperTimeout(HelperError):
    """The helper did not answer in time: most likely its user stopped it (it is theirs)."""


#: How long a new helper may take to say it is ready (a Python start-up: 20-40 ms).
READY_SECONDS = 10.0
#: How long a helper may take over one message of a request (at most ``MAX_PATHS``
#: opens, or one walk batch: as many files, or ~96 KB of records): so a request's
#: bound grows with its work, and a helper its user stopped mid-request costs the
#: daemon a thread that long. Milliseconds on a local disk; room for a slow NFS home.
REPLY_SECONDS = 30.0
#: For tests only: a uid whose new helpers stop themselves before "ready", as their
#: user may (tests/test_asuser_stall.py). The daemon's environment is root's.
_HOLD_READY = os.environ.get("AMBER_TEST_HOLD_ASUSER_READY", "")


class UserReader:
    """One helper process running as ``user``; use as a context manager."""

    def __init__(self, user: User, *, handshake: bool = True):
        """Start the helper; ``handshake=False`` leaves ``handshake()`` to the caller's thread."""
        self.user = user
        #: No request half done: the helper waits for the next one (see asuser_pool).
        self.idle = True
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        ids: dict[str, Any] = {}
        if user.uid != 0:
            ids = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        try:
            self._proc = subprocess.Popen(
                [_PYTHON, "-I", "-S", "-c", _HELPER_SOURCE, str(theirs.fileno()), *_flags(user)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"}, cwd="/", **ids,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if handshake:
            self.handshake()

    def handshake(self) -> None:
        """Wait for the helper's "ready" and check its ids, at most ``READY_SECONDS``: the
        helper is the user's process, and one they stopped must not hold the daemon.
        Each later message has ``REPLY_SECONDS``, for the same reason."""
        user = self.user
        try:
            self._sock.settimeout(READY_SECONDS)
            ready = self._message([])["ready"]
            self._sock.settimeout(REPLY_SECONDS)
            if user.uid != 0 and ready != [user.uid, user.gid, sorted(set(user.groups))]:
                raise HelperError(f"the helper runs as {ready}, not {user}")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> UserReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alive(self) -> bool:
        """The helper still runs (the user may kill it: it is theirs)."""
        return self._proc.poll() is None

    def close(self) -> None:
        """Kill and reap the helper (it has nothing to finish)."""
        self._sock.close()
        self._proc.kill()
        self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    # -- the protocol ---------------------------------------------------------

    def _message(self, fds_out: list[int]) -> dict:
        """The next message, its descriptors appended to ``fds_out``."""
        try:
            data, fds, flags, _ = socket.recv_fds(self._sock, _RECV, asuser_helper.MAX_FDS)
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:
            raise HelperError(f"reading from the helper: {exc}") from None
        fds_out.extend(fds)
        if not data:
            why = self._proc.stderr.read(2000).decode(errors="replace") if self._proc.stderr else ""
            raise HelperError(f"the helper for uid {self.user.uid} ended: {why.strip()[-300:]}")
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise HelperError("the helper sent more than a message may hold")
        try:
            message = json.loads(data)
        except ValueError:
            raise HelperError("the helper sent something that is not JSON") from None
        if not isinstance(message, dict):
            raise HelperError("the helper sent something that is not a message")
        return message

    def _timed_out(self) -> HelperTimeout:
        return HelperTimeout(
            f"the helper for uid {self.user.uid} did not answer in "
            f"{self._sock.gettimeout():g} s (stopped?)"
        )

    def _send(self, request: dict) -> None:
        try:
            self._sock.send(json.dumps(request).encode())
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:
            raise HelperError(f"writing to the helper: {exc}") from None

    def open_many(
        self, paths: Sequence[tuple[str, bool, bool]]
    ) -> list[int | Unreadable | WrongKind]:
        """Each ``(path, follow_symlinks, allow_dir)`` opened read-only, non-blocking, as the user."""
        if len(paths) > MAX_PATHS:
            raise ValueError(f"at most {MAX_PATHS} paths a request, not {len(paths)}")
        self.idle = False
        self._send({"op": "open", "paths": [list(p) for p in paths]})
        fds: list[int] = []
        try:
            results = self._message(fds).get("results")
            if not isinstance(results, list) or len(results) != len(paths):
                raise HelperError("the helper's answer does not match the request")
            out: list[int | Unreadable | WrongKind] = []
            given = iter(fds)
            for (path, _, _), result in zip(paths, results, strict=True):
                out.append(self._result(path, result, given))
            if next(given, None) is not None:
                raise HelperError("the helper sent more descriptors than it opened")
            self.idle = True
            return out
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _result(self, path: str, result: Any, fds: Iterator[int]) -> int | Unreadable | WrongKind:
        if not isinstance(result, dict):
            raise HelperError("the helper sent a result that is not a record")
        if "ok" in result:
            fd = next(fds, None)
            if fd is None:
                raise HelperError("the helper sent fewer descriptors than it opened")
            return fd
        if isinstance(result.get("mode"), int):
            return WrongKind(path, result["mode"])
        err = result.get("errno")
        return Unreadable(
            path, self.user.uid, err if isinstance(err, int) and err > 0 else errno.EIO
        )

    def open(self, path: str, *, follow_symlinks: bool = False, allow_dir: bool = False) -> int:
        """One path (see ``open_many``); raises ``Unreadable`` or ``WrongKind``."""
        (result,) = self.open_many([(path, follow_symlinks, allow_dir)])
        if isinstance(result, Exception):
            raise result
        return result

    def walk(self, path: str, *, follow_symlinks: bool = True) -> Iterator[tuple[list, int | None]]:
        """Every entry under the directory ``path``, depth first in byte order of names.

        Yields ``(record, fd)``: ``["d", name, meta, xattrs]`` (a directory, its
        entries follow until ``["u"]``), ``["f", ...]`` with the file's
        descriptor (closed by the caller), ``["l", ..., target]``, ``["o", ...]``
        for anything else; ``meta`` is (mode, uid, gid, mtime_ns, size, rdev).
        Raises ``Unreadable`` naming the path that could not be opened.
        """
        self.idle = False
        self._send({"op": "walk", "path": path, "follow": follow_symlinks})
        while True:
            fds: list[int] = []
            message = self._message(fds)
            if "errno" in message:
                for fd in fds:
                    os.close(fd)
                where = message.get("where")
                name = f"{path.rstrip('/')}/{where}" if isinstance(where, str) and where else path
                err = message["errno"]
                self.idle = True  # the helper has ended the walk
                raise Unreadable(
                    name, self.user.uid, err if isinstance(err, int) and err > 0 else errno.EIO
                )
            yield from _paired(message.get("records"), fds)
            if not message.get("more"):
                self.idle = True
                return
            self._send_ack()

    def _send_ack(self) -> None:
        try:
            self._sock.send(b"n")
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:
            raise HelperError(f"writing to the helper: {exc}") from None


def _flags(user: User) -> list[str]:
    """The helper's arguments after its descriptor: ``root`` (it serves root), ``hold``."""
    return (["root"] if user.uid == 0 else []) + (["hold"] if str(user.uid) == _HOLD_READY else [])


def _paired(records: Any, fds: list[int]) -> Iterator[tuple[list, int | None]]:
    """The batch's records, each file's with its descriptor; all closed on the way out."""
    pending = list(fds)
    try:
        if not isinstance(records, list):
            raise HelperError("the helper sent a batch without records")
        for record in records:
            if not isinstance(record, list) or not record:
                raise HelperError("the helper sent a record that is not a list")
            fd = None
            if record[0] == "f":
                if not pending:
                    raise HelperError("the helper sent a file without its descriptor")
                fd = pending.pop(0)
            yield record, fd
        if pending:
            raise HelperError("the helper sent descriptors no record names")
    finally:
        for fd in pending:
            os.close(fd)
