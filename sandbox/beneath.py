"""Root's file operations inside a tree a user controls, never following its links.

A mounted build tree holds whatever its steps or an imported image put
there: ``tmp -> /root`` or ``tmp/.amber_history -> /root/.bashrc``. Root
must not resolve such a path the host's way. ``openat2(2)`` resolves every
component relative to a directory fd: ``RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS`` for what root writes (no link at all, nothing above
the tree), ``RESOLVE_IN_ROOT`` to look a path up the way the sandbox will
(links resolved, but with the tree as ``/``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic)

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

#: For anything root creates or writes in a tree.
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
#: For looking a path up as the tree's own processes will see it.
IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(
    dir_fd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = STRICT
) -> int:
    """``openat2(2)``: an fd for ``path`` below ``dir_fd``, resolved as ``resolve`` says."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    raw = os.fsencode(path)
    while True:
        fd = _libc.syscall(_SYS_OPENAT2, dir_fd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err), os.fsdecode(raw))


def exists_in_root(root: str | bytes, path: str) -> bool:
    """Whether ``path`` (absolute inside the tree) names something, links followed inside it."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(openat2(root_fd, path.lstrip("/") or ".", os.O_PATH, resolve=IN_ROOT))
        return True
    except OSError:
        return False
    finally:
        os.close(root_fd)


def write_beneath(root: str | bytes, path: str, data: bytes, *, uid: int, gid: int) -> None:
    """Write a fresh ``path`` (relative to ``root``) for ``uid``: no link followed, none replaced.

    Missing directories are made (0755, root's); an entry already at
    ``path`` that is not a directory is replaced, so a link there is
    removed, never written through. Raises OSError if some directory on
    the way is a link or not a directory.
    """
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"not a plain relative path: {path!r}")
    dir_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=dir_fd)
            inner = openat2(dir_fd, part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            os.close(dir_fd)
            dir_fd = inner
        leaf = parts[-1]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leaf, dir_fd=dir_fd)  # unlinkat: a link goes, its target stays
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = openat2(dir_fd, leaf, flags, 0o600)
        try:
            os.fchown(fd, uid, gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
