"""Paths the user names for amberd to write to, opened here, by the user.

amberd runs as root. Resolving a user's path there, even with only the
filesystem uid switched, keeps root's other rights (CAP_SYS_PTRACE lets
``/proc/PID/cwd`` of a third user's process reach into that user's 0700
home). So the client, which *is* the user, opens what the user names and
passes the descriptor over the socket: amberd writes to it, or relative to
it, and never looks a user's path up.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .cli import UsageError


@contextlib.contextmanager
def output_file(path: str) -> Iterator[int]:
    """A fresh file next to ``path`` for amberd to fill; it becomes ``path`` only if all went well.

    Like the daemon's own writes before, ``path`` never holds half an
    archive: the file is written aside and renamed over ``path`` at the end
    (by us, as the user), and removed if anything failed.
    """
    parent, name = os.path.split(os.path.abspath(path))
    part = os.path.join(parent, f".{name}.{os.urandom(6).hex()}.part")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(part, flags, 0o666)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    done = False
    try:
        yield fd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # unlinking first spares ext4's flush of data renamed over a file
        os.rename(part, path)
        done = True
    finally:
        os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(part)


def parent_directory(path: str) -> int:
    """An ``O_PATH`` descriptor of ``path``'s directory, for amberd to work below (by its final name)."""
    parent, name = os.path.split(os.path.normpath(os.path.abspath(path)))
    if not name or name in (".", ".."):
        raise UsageError(f"{path} names no entry in a directory")
    try:
        return os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot use {path}: {exc.strerror or exc}") from None
