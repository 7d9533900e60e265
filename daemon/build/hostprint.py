"""The ``host`` base's fingerprint: what the sandbox binds, every entry of it.

A step on the host base sees the host's system directories read-only, so its
cache key must change whenever anything under them does: a new
``/usr/lib/x86_64-linux-gnu/libfoo.so``, a changed ``/usr/include/zlib.h``.
The fingerprint hashes the path, size, mode, inode, mtime and ctime of every
entry (``lstat``: no link is followed), plus the package databases.

That walk takes about 0.4 s for Debian's 140,000 entries, too much for every
build, so the digest is kept with the identity and change times of every
directory it walked: as long as none of them changed (about 25 ms of
``lstat``), no entry was added, removed or renamed, and the digest stands.
A directory is stat'ed before it is listed, so a change during the walk
shows at the next check. What this does not see is a file rewritten in
place under the same name (``cp`` onto an existing file): its directory
does not change. Package managers and ``install`` write a new file and
rename it, which changes the directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from amber.sandbox.digest import hash_bytes

__all__ = ["host_fingerprint", "tree_fingerprint"]

PACKAGE_DATABASES = ("/var/lib/dpkg/status", "/var/lib/rpm/rpmdb.sqlite")
_ENTRY = struct.Struct("=QQQIqq")  # size, dev, ino, mode, mtime_ns, ctime_ns
_DIR = struct.Struct("=QQqq")  # dev, ino, mtime_ns, ctime_ns


@dataclass(frozen=True)
class _Walked:
    tops: tuple[str, ...]
    dirs: tuple[tuple[str, bytes], ...]  # (path, _DIR of its lstat)
    digest: str


_last: _Walked | None = None
_lock = threading.Lock()


def host_fingerprint(tops: Sequence[str]) -> str:
    """Changes when a package or any entry under the directories ``tops`` changes.

    Blocking (a walk of the directories when one of them changed): call from
    a worker thread.
    """
    parts = [tree_fingerprint(tops).encode()]
    for database in PACKAGE_DATABASES:
        try:
            with open(database, "rb") as f:
                parts.append(hash_bytes(f.read()))
        except OSError:
            continue
    return hash_bytes(b"\0".join(parts)).hex()


def tree_fingerprint(tops: Sequence[str]) -> str:
    """The digest of every entry under ``tops``, walked again only when a
    directory among them changed (see the module notes)."""
    global _last
    key = tuple(tops)
    with _lock:
        last = _last
    if last is not None and last.tops == key and not _changed(last.dirs):
        return last.digest
    walked = _walk(key)
    with _lock:
        _last = walked
    return walked.digest


def _changed(dirs: Sequence[tuple[str, bytes]]) -> bool:
    for path, stamp in dirs:
        try:
            if _dir_stamp(os.lstat(path)) != stamp:
                return True
        except OSError:
            return True
    return False


def _dir_stamp(st: os.stat_result) -> bytes:
    return _DIR.pack(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _walk(tops: tuple[str, ...]) -> _Walked:
    """Hash every entry under ``tops``, depth first in name order."""
    digest = hashlib.sha256()
    dirs: list[tuple[str, bytes]] = []
    stack = list(reversed(tops))
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                continue
            dirs.append((path, _dir_stamp(st)))  # before listing: see the notes
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            digest.update(b"unreadable\0" + os.fsencode(path) + b"\0")
            continue
        parts = [os.fsencode(path)]
        below = []
        for entry in entries:
            try:
                est = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since the listing: its directory changed
            parts.append(os.fsencode(entry.name))
            parts.append(_ENTRY.pack(est.st_size, est.st_dev, est.st_ino, est.st_mode,
                                     est.st_mtime_ns, est.st_ctime_ns))  # fmt: skip
            if stat.S_ISDIR(est.st_mode):
                below.append(entry.path)
        digest.update(b"\0".join(parts) + b"\0\0")
        stack.extend(reversed(below))
    return _Walked(tops, tuple(dirs), digest.hexdigest())
