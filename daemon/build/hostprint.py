"""The ``host`` base's fingerprint: what the sandbox binds, every directory of it.

A step on the host base sees the host's system directories read-only, so its
cache key must change whenever anything under them does: a new
``/usr/lib/x86_64-linux-gnu/libfoo.so``, a changed ``/usr/include/zlib.h``.
The fingerprint hashes the path, identity and change times (mtime, ctime)
of every directory below them (``lstat``: no link is followed), plus the
package databases: an entry added, removed or renamed anywhere changes its
directory's mtime. Every file's own ``lstat`` as well (140,000 entries on
Debian) cost 0.45 s warm and 1 s cold at each amberd start, against 0.18 s
for the 15,700 directories; and it bought nothing between starts, since
the digest is kept while no directory changed.

The digest is kept with the stamps it was made of: as long as none of them
changed, it stands, and it is exactly what a new walk would give. inotify
watches on every directory (hostwatch.py) answer "none changed" without
looking while no event came; after an event, or without watches, the
stamps are compared (about 25 ms of ``lstat``). A directory is stat'ed before it is listed, so a
change during the walk shows at the next check. What this does not see is
a file rewritten or chmod'ed in place under the same name (``cp`` onto an
existing file): its directory does not change. Package managers and
``install`` write a new file and rename it, which changes the directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from amber.daemon.build.hostwatch import DirWatch
from amber.sandbox.digest import hash_bytes

__all__ = ["host_fingerprint", "tree_fingerprint"]

PACKAGE_DATABASES = ("/var/lib/dpkg/status", "/var/lib/rpm/rpmdb.sqlite")
_DIR = struct.Struct("=QQqq")  # dev, ino, mtime_ns, ctime_ns


@dataclass(frozen=True)
class _Walked:
    tops: tuple[str, ...]
    dirs: tuple[tuple[str, bytes], ...]  # (path, _DIR of its lstat)
    digest: str
    #: inotify watches on ``dirs``, taken before each was stat'ed (hostwatch.py).
    watch: DirWatch


_last: _Walked | None = None
_lock = threading.Lock()
_check_lock = threading.Lock()


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
    """The digest of every directory under ``tops``, walked again only when a
    directory among them changed (see the module notes)."""
    global _last
    key = tuple(tops)
    with _lock:
        last = _last
    if last is not None and last.tops == key:
        # One check at a time: an event drained by another check while this
        # one compares stamps must not be forgotten by this one's rearm.
        with _check_lock:
            if last.watch.quiet():
                return last.digest  # the kernel saw no change under any of them
            if not _changed(last.dirs):  # compared after quiet() drained the events
                last.watch.rearm()
                return last.digest
    walked = _walk(key)
    with _lock:
        replaced, _last = _last, walked
    if replaced is not None:
        # Under the check lock: a check still holding it must not read a closed
        # descriptor, whose number another open file may have taken meanwhile.
        with _check_lock:
            replaced.watch.close()
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
    """Hash the path and change stamp of every directory under ``tops``, depth first
    in name order (``d_type`` finds the subdirectories: no ``lstat`` of files)."""
    digest = hashlib.sha256()
    dirs: list[tuple[str, bytes]] = []
    watch = DirWatch()
    stack = list(reversed(tops))
    while stack:
        path = stack.pop()
        try:
            watch.add(path)  # before the stamp and the listing: a change after it is an event
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                continue
            stamp = _dir_stamp(st)  # before listing: see the notes
            with os.scandir(path) as it:
                below = sorted(e.path for e in it if e.is_dir(follow_symlinks=False))
        except OSError:
            digest.update(b"unreadable\0" + os.fsencode(path) + b"\0")
            continue
        dirs.append((path, stamp))
        digest.update(os.fsencode(path) + b"\0" + stamp)
        stack.extend(reversed(below))
    return _Walked(tops, tuple(dirs), digest.hexdigest(), watch)
