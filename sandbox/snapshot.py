"""Snapshot: the mount's base tree plus what overlayfs recorded in the upper.

The upper directory holds exactly what changed since the mount was made, in
overlayfs' format, which is interpreted here:

- a 0:0 character device is a *whiteout*: the name was deleted;
- a directory with ``trusted.overlay.opaque=y`` hides the lower one;
- ``trusted.overlay.redirect`` on a directory names the lower directory it
  was renamed from (absolute from the root, or relative to its parent);
- a file with ``trusted.overlay.metacopy`` changed only metadata: its data
  is still the lower file's, at the same path or at its redirect.

Only directories present in the upper are re-encoded; every other subtree
keeps its digest, so a snapshot costs what changed, not the tree's size.
Files are hashed once: ``EntryMaker``'s cache keeps digests of unchanged
upper files across the snapshots of one mount.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from stat import S_ISCHR, S_ISDIR, S_ISREG

from . import tree as treefmt
from .batch import Batch
from .fileio import start_syncfs
from .importer import EntryMaker, list_xattrs
from .owncwd import run_with_own_cwd
from .store import Store
from .tree import Entry
from .userns import IdMap

OPAQUE = "trusted.overlay.opaque"
REDIRECT = "trusted.overlay.redirect"
METACOPY = "trusted.overlay.metacopy"


#: Names an upper must hold before its snapshot flushes it early (``_listed_names``).
FLUSH_EARLY_AFTER = 1000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotError(Exception):
    """The upper directory holds something a snapshot cannot represent."""


@dataclass
class SnapshotStats:
    trees_written: int = 0
    blobs_written: int = 0
    bytes_written: int = 0
    files_hashed: int = 0
    seconds: float = 0.0


def commit(batch: Batch) -> None:
    """Make a walked snapshot durable (``Snapshotter.walk``); aborted if that fails."""
    try:
        batch.commit()
    except BaseException:
        batch.abort()
        raise


def _xattr(path: bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


class Snapshotter:
    """Produces trees for one mount: ``base`` tree + ``upper`` directory."""

    def __init__(self, store: Store, base: bytes, upper: str | os.PathLike, ids: IdMap):
        self.store = store
        self.base = base
        self.upper = os.fsencode(os.path.abspath(upper))
        self.ids = ids
        self._hash_cache: dict[tuple[int, int, int, int], bytes] = {}
        # Hard-link groups the step made are labelled path + "//" + the base's
        # digest: "//" is in no path, and no tree holds a label naming its own
        # digest, so they never take the label of a base group they did not
        # join (which would merge two inodes with equal content and metadata).
        self._label_suffix = b"//" + base.hex()[:32].encode()
        self._listed = 0  # names the walk has listed so far
        self._flush: threading.Thread | None = None
        self._own_cwd = False  # the walk's thread has a cwd of its own (``run_with_own_cwd``)

    def snapshot(self) -> tuple[bytes, SnapshotStats]:
        """The tree of the mount now, in the store; on a thread of its own, for its own cwd (``_merge``)."""
        digest, stats, batch = self.walk()
        started = time.monotonic()
        commit(batch)
        stats.seconds += time.monotonic() - started
        return digest, stats

    def walk(self) -> tuple[bytes, SnapshotStats, Batch]:
        """The tree of the mount now, its new objects written but not yet committed.

        The upper may change once this returns: everything the tree needs is
        in the batch's temporary files. ``commit(batch)`` makes it durable
        (two syncfs), which may overlap the next step; until then nothing
        may record the tree. On error the batch is aborted here.
        """
        return run_with_own_cwd(self._walk)

    def _walk(self, own_cwd: bool) -> tuple[bytes, SnapshotStats, Batch]:
        started = time.monotonic()
        # Every other path the walk uses is absolute: the store's and the upper's.
        self._own_cwd = own_cwd and os.path.isabs(self.store.tmp_dir)
        self._count_trees_written = 0
        self._listed = 0
        self._flush = None
        batch = self.store.batch()
        try:
            maker = EntryMaker(
                self.store,
                batch,
                ids=self.ids,
                hash_cache=self._hash_cache,
                label_suffix=self._label_suffix,
            )
            digest = self._merge(maker, self.base, self.upper, b"", b"")
        except BaseException:
            batch.abort()
            raise
        finally:
            if self._flush is not None:  # for its fd: the batch's syncfs covers its writes
                self._flush.join()
        stats = SnapshotStats(
            trees_written=self._count_trees_written,
            blobs_written=batch.written - self._count_trees_written,
            bytes_written=batch.bytes_written,
            files_hashed=maker.files_hashed,
            seconds=time.monotonic() - started,
        )
        return digest, stats, batch

    def _listed_names(self, upper: bytes) -> list[bytes]:
        """The names in upper directory ``upper``, sorted; may start the early flush.

        What the step wrote is still dirty in the upper. On the store's
        filesystem the batch's syncfs would write it all out after the walk;
        flushed from the moment the walk has met ``FLUSH_EARLY_AFTER``
        names, that I/O overlaps the rest of the walk instead. (A small
        upper is not worth a flush the batch may not even need.)
        """
        names = os.listdir(upper)
        names.sort()  # hard-link labels are the first path in this order
        self._listed += len(names)
        if self._flush is None and self._listed >= FLUSH_EARLY_AFTER and self._shares_store_fs():
            self._flush = start_syncfs(self.upper)
        return names

    def _shares_store_fs(self) -> bool:
        return os.stat(self.upper).st_dev == os.stat(self.store.tmp_dir).st_dev

    def _lower_dir(self, lower_path: bytes) -> bytes | None:
        if not lower_path:
            return self.base
        entry = self.store.lookup_path(self.base, lower_path)
        return entry.ref if entry is not None and entry.kind == treefmt.DIR else None

    def _merge(
        self, maker: EntryMaker, lower: bytes | None, upper: bytes, rel: bytes, lower_path: bytes
    ) -> bytes:
        """Tree for upper dir ``upper`` over lower tree ``lower``.

        ``rel`` is the path in the new tree, ``lower_path`` the path in the
        base tree this directory's lower part comes from.
        """
        merged: dict[bytes, Entry] = {}
        if lower is not None:
            merged = {e.name: e for e in self.store.get_tree(lower)}
        names = self._listed_names(upper)
        prefix = upper + b"/"
        plain_file, lstat, listxattr, isreg = maker.plain_file, os.lstat, os.listxattr, S_ISREG
        # This loop runs once a file of a step's output: a regular file
        # without xattrs, nearly every one, costs an lstat, a listxattr and
        # a tuple (hence the local names); everything else goes through
        # _other. Both calls name the file relative to the open directory,
        # the listxattr through the thread's own cwd (owncwd.py): no walk of
        # the whole path twice a file. A plain file's content is opened the
        # same way, by its name alone (``plain_file``).
        dfd = os.open(upper, _DIR_FLAGS)
        own = self._own_cwd
        try:
            if own:
                os.fchdir(dfd)
            else:
                lstat = partial(lstat, dir_fd=dfd)
            for name in names:
                path = prefix + name
                st = lstat(name)
                xattrs = None
                if isreg(st.st_mode):
                    try:
                        xattrs = listxattr(name if own else path, follow_symlinks=False)
                    except OSError:
                        xattrs = []
                    if not xattrs:
                        merged[name] = plain_file(name if own else path, rel, name, st)
                        continue
                entry = self._other(
                    maker, path, rel, name, st, xattrs, merged.get(name), lower_path
                )
                if own:
                    os.fchdir(dfd)  # a subdirectory's walk moved it
                if entry is None:
                    merged.pop(name, None)
                else:
                    merged[name] = entry
        finally:
            os.close(dfd)
        # Without a lower tree the names came in sorted and stayed so.
        entries = list(merged.values()) if lower is None else [merged[n] for n in sorted(merged)]
        digest, written = self.store.add_tree(entries, maker.batch)
        self._count_trees_written += written
        return digest

    def _other(
        self,
        maker: EntryMaker,
        path: bytes,
        rel: bytes,
        name: bytes,
        st: os.stat_result,
        xattrs: list[str] | None,
        lower_entry: Entry | None,
        lower_path: bytes,
    ) -> Entry | None:
        """The entry for anything but a plain new file (None: a whiteout).

        ``xattrs``: a regular file's xattr names, listed already.
        """
        mode = st.st_mode
        child_rel = rel + name
        if xattrs is not None:
            if METACOPY in xattrs:
                return self._metacopy_entry(
                    maker, path, child_rel, name, st, lower_path, lower_entry
                )
            return maker.entry(path, child_rel, name, st, xattr_names=xattrs)
        if S_ISDIR(mode):
            names = list_xattrs(path)
            child_lower, child_lower_path = self._dir_origin(
                path, names, lower_entry, lower_path, name
            )
            ref = self._merge(maker, child_lower, path, child_rel + b"/", child_lower_path)
            return maker.entry(path, child_rel, name, st, ref, xattr_names=names)
        if S_ISCHR(mode) and st.st_rdev == 0:
            return None  # whiteout
        return maker.entry(path, child_rel, name, st)

    def _dir_origin(
        self,
        path: bytes,
        xattrs: list[str],
        lower_entry: Entry | None,
        parent_lower: bytes,
        name: bytes,
    ) -> tuple[bytes | None, bytes]:
        """The lower tree a directory merges with, and its path in the base."""
        if OPAQUE in xattrs and _xattr(path, OPAQUE) == b"y":
            return None, b""
        redirect = _xattr(path, REDIRECT) if REDIRECT in xattrs else None
        if redirect:
            source = _redirect_source(redirect, parent_lower)
            return self._lower_dir(source), source
        if lower_entry is not None and lower_entry.kind == treefmt.DIR:
            return lower_entry.ref, _join(parent_lower, name)
        return None, b""

    def _metacopy_entry(
        self,
        maker: EntryMaker,
        path: bytes,
        rel: bytes,
        name: bytes,
        st: os.stat_result,
        parent_lower: bytes,
        lower_entry: Entry | None,
    ) -> Entry:
        """A file whose data overlayfs left in the lower layer.

        Without a redirect its origin is the same name in the lower
        directory (``lower_entry``, already in hand); with one, wherever the
        redirect points in the base.
        """
        redirect = _xattr(path, REDIRECT)
        if redirect:
            source = _redirect_source(redirect, parent_lower)
            origin = self.store.lookup_path(self.base, source)
        else:
            source, origin = _join(parent_lower, name), lower_entry
        if origin is None or origin.kind != treefmt.FILE:
            raise SnapshotError(
                f"{os.fsdecode(rel)}: overlayfs points its data at {os.fsdecode(source)!r}, "
                "which is not a file of the base tree"
            )
        return maker.entry(path, rel, name, st, origin.ref)


def _redirect_source(redirect: bytes, parent_lower: bytes) -> bytes:
    """The base path an overlayfs redirect names: absolute, or beside ``parent_lower``."""
    return redirect.lstrip(b"/") if redirect.startswith(b"/") else _join(parent_lower, redirect)


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name
