"""Reading a user's files with the user's rights, on one thread, while root keeps the store.

The daemon runs as root and reads files on behalf of the users who ask for
them (local sources, ``dir:`` and ``oci:`` bases, export outputs): those
must be read with *their* rights, or root's would put into a build what its
user could not read. ``filesystem_identity`` switches this thread's
filesystem uid and gid (setfsuid(2): other threads, and everything that is
not a file access, are unaffected). The store, though, is root's, and its
writes happen in the middle of such reads (a file is hashed into the store
as it is read): ``as_store_owner`` switches back around them. A thread-local
record of the identity makes that free when no identity is in effect.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_libc = ctypes.CDLL(None, use_errno=True)
_current = threading.local()
#: setgroups(2) by number: the raw system call changes the calling thread's
#: groups only (glibc's wrapper would change every thread's).
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}.get(platform.machine())


def _thread_groups(groups: list[int]) -> None:
    if _SYS_SETGROUPS is None:
        raise OSError(f"no per-thread setgroups on {platform.machine()}")
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _libc.syscall(_SYS_SETGROUPS, len(groups), array) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setgroups: {os.strerror(err)}")


@contextmanager
def filesystem_identity(uid: int, gid: int, groups: tuple[int, ...] = ()) -> Iterator[None]:
    """Access files as ``uid``/``gid`` with supplementary ``groups``, on this thread only
    (a no-op for root).

    The groups matter as much as the uid: amberd's own (group 0, or whatever
    the shell that started it had) would otherwise open to the user every
    directory those groups may write.
    """
    if uid == 0:
        yield
        return
    outer = getattr(_current, "ids", None)
    old_groups = os.getgroups()
    _thread_groups(list(groups))
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    _current.ids = (uid, gid)
    try:
        yield
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)
        _thread_groups(old_groups)
        _current.ids = outer


@contextmanager
def as_store_owner() -> Iterator[None]:
    """Root's rights again, for the store's own writes inside ``filesystem_identity``."""
    ids = getattr(_current, "ids", None)
    if ids is None:
        yield
        return
    _libc.setfsuid(0)
    _libc.setfsgid(0)
    _current.ids = None  # nested: free, and not ended by the inner one
    try:
        yield
    finally:
        _current.ids = ids
        _libc.setfsgid(ids[1])
        _libc.setfsuid(ids[0])


def store_owner_thread() -> None:
    """Root's file rights for the rest of this thread, one of the store's own.

    Linux keeps the filesystem ids per thread and a new thread starts with
    its creator's, so a thread started inside ``filesystem_identity`` (the
    hashing of an export's blobs) would open the store as the user.
    """
    _libc.setfsgid(0)
    _libc.setfsuid(0)
