"""Opening a file a user named: a regular file or nothing.

A path checked when a spec was parsed may be something else by the time it
is read: ``/dev/zero`` never ends, a FIFO blocks the reading thread until
someone writes to it. So the check is made on what was opened: the open
itself must not block (``O_NONBLOCK``: a FIFO with no writer opens at once),
and ``fstat`` of the descriptor decides, not a ``stat`` of the name.
"""

from __future__ import annotations

import errno
import os
import stat

from amber.sandbox.asuser import Unreadable, UserReader, WrongKind

_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


class NotRegularFile(ValueError):
    """The path names something other than a regular file."""


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(
    path: str | os.PathLike[str], *, follow_symlinks: bool = False, allow_dir: bool = False
) -> int:
    """A read-only descriptor on ``path``, which must be a regular file (or a
    directory with ``allow_dir``); blocking mode is restored for reading.

    Raises ``NotRegularFile`` for anything else (a symbolic link too, unless
    ``follow_symlinks``), ``OSError`` when it cannot be opened.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:  # the last component is a link
            raise NotRegularFile(
                f"{os.fspath(path)} is a symbolic link, not a regular file"
            ) from None
        raise
    return _checked(fd, os.fspath(path), allow_dir)


def open_regular_as(
    reader: UserReader,
    path: str | os.PathLike[str],
    *,
    follow_symlinks: bool = False,
    allow_dir: bool = False,
) -> int:
    """``open_regular``, opened by ``reader``'s helper (the user for real, see
    sandbox/asuser.py) and checked again here: the helper is the user's.

    Raises ``NotRegularFile``, or ``Unreadable`` (``.missing`` for ENOENT).
    """
    name = os.fspath(path)
    try:
        fd = reader.open(name, follow_symlinks=follow_symlinks, allow_dir=allow_dir)
    except WrongKind as exc:
        raise NotRegularFile(f"{name} is {kind_of(exc.mode)}, not a regular file") from None
    except Unreadable as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise NotRegularFile(f"{name} is a symbolic link, not a regular file") from None
        raise
    return _checked(fd, name, allow_dir)


def _checked(fd: int, name: str, allow_dir: bool) -> int:
    """``fd`` in blocking mode if ``fstat`` says it is what may be read; else closed."""
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (allow_dir and stat.S_ISDIR(mode))):
            raise NotRegularFile(f"{name} is {kind_of(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
