"""inotify watches on the host base's directories: "did anything change?" in one read.

The host fingerprint (hostprint.py) re-proves each build that none of the
15,700 directories it covers changed, one ``lstat`` each (25-70 ms of every
cached build on the host base). With a watch on each directory, taken
before the directory is stat'ed and listed, the kernel tells instead: no
event queued since the walk means nothing was created, removed, renamed,
written or chmod'ed in any of them, so the stamps are what they were.

Any event, a queue overflow, or no watches at all (the per-user limit,
``fs.inotify.max_user_watches``, reached) only sends the caller back to
comparing the stamps: the watch is a shortcut past that check, never a
replacement for it, so the fingerprint stays exactly what a new walk gives.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

__all__ = ["DirWatch"]

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
#: Every change of a directory's entries, or of a file in it, or of the directory itself.
_MASK = (
    0x00000002  # IN_MODIFY
    | 0x00000004  # IN_ATTRIB
    | 0x00000008  # IN_CLOSE_WRITE
    | 0x00000040  # IN_MOVED_FROM
    | 0x00000080  # IN_MOVED_TO
    | 0x00000100  # IN_CREATE
    | 0x00000200  # IN_DELETE
    | 0x00000400  # IN_DELETE_SELF
    | 0x00000800  # IN_MOVE_SELF
    | 0x01000000  # IN_ONLYDIR
    | 0x02000000  # IN_DONT_FOLLOW
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class DirWatch:
    """Watches on directories; ``quiet()`` while no event arrived since they were taken."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        #: None: no watch could be had (limits); every question is then "maybe changed".
        self._fd: int | None = fd if fd >= 0 else None
        self._dirty = False

    def add(self, path: str) -> None:
        """Watch ``path`` (call before stat'ing and listing it). Out of watches: give up."""
        if self._fd is None:
            return
        if _libc.inotify_add_watch(self._fd, os.fsencode(path), _MASK) < 0:
            if ctypes.get_errno() in (errno.ENOSPC, errno.ENOMEM):
                self.close()  # a partial set would vouch for directories it does not see
            else:
                self._dirty = True  # gone or unreadable: the walk records it; ask again next time

    def quiet(self) -> bool:
        """True: no event since the watches were taken or last re-armed. Drains the queue."""
        if self._fd is None:
            return False
        while True:
            try:
                if not os.read(self._fd, 65536):
                    break
            except BlockingIOError:
                break
            except OSError:
                self._dirty = True
                break
            self._dirty = True
        return not self._dirty

    def rearm(self) -> None:
        """The caller compared the stamps after ``quiet()`` drained the queue and found
        them unchanged: from here on, no event again means no change."""
        self._dirty = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
