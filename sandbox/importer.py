"""Turning directories on disk into trees.

``EntryMaker`` turns one ``lstat`` result into a tree entry (storing the
content of files); ``import_directory`` walks a whole directory with it, and
the snapshot code uses the same maker for an overlay's upper directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from . import tree as treefmt
from .digest import EMPTY
from .store import Batch, Store
from .tree import Entry
from .userns import IDENTITY, IdMap


def list_xattrs(path: bytes) -> list[str]:
    """A file's xattr names (none if it cannot have any)."""
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []


def read_xattrs(path: bytes, names: list[str] | None = None) -> tuple[tuple[bytes, bytes], ...]:
    """A file's xattrs, sorted, without overlayfs' own (``names``: already listed)."""
    if names is None:
        names = list_xattrs(path)
    if not names:
        return ()
    pairs = []
    for name in names:
        raw = os.fsencode(name)
        if raw.startswith(treefmt.OVERLAY_XATTR_PREFIX):  # overlayfs bookkeeping
            continue
        try:
            pairs.append((raw, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    pairs.sort()
    return tuple(pairs)


class EntryMaker:
    """Builds entries from ``lstat`` results, storing file content.

    Hard links: files with ``st_nlink > 1`` are grouped by inode; the group
    label is the first path seen, so a sorted walk gives canonical labels,
    followed by ``label_suffix``: a snapshot keeps the base's labels for
    what it did not touch, and its new groups must not take one of them.
    ``hash_cache`` maps ``(ino, size, mtime_ns, ctime_ns)`` to a digest and
    lets a repeated snapshot skip rehashing files that did not change.
    """

    def __init__(
        self,
        store: Store,
        batch: Batch,
        *,
        ids: IdMap = IDENTITY,
        hash_cache: dict[tuple[int, int, int, int], bytes] | None = None,
        label_suffix: bytes = b"",
    ):
        self.store = store
        self.batch = batch
        self.ids = ids
        self.hash_cache = hash_cache if hash_cache is not None else {}
        self._links: dict[tuple[int, int], bytes] = {}
        self.label_suffix = label_suffix
        self.files_hashed = 0

    def entry(
        self,
        path: bytes,
        rel: bytes,
        name: bytes,
        st: os.stat_result,
        ref: bytes = b"",
        xattr_names: list[str] | None = None,
    ) -> Entry:
        """The entry for ``path`` (``rel`` is its tree-relative path).

        Directories take ``ref`` (their subtree digest) from the caller; so
        do files whose content is known without reading them. A caller that
        listed the xattrs already passes ``xattr_names``: one syscall less a file.
        """
        kind = treefmt.kind_of_mode(st.st_mode)
        size = 0
        rdev = 0
        link = None
        if kind == treefmt.FILE:
            ref = ref or self._file_digest(path, st)
            size = st.st_size
            if st.st_nlink > 1:
                link = self._links.setdefault((st.st_dev, st.st_ino), rel + self.label_suffix)
        elif kind == treefmt.SYMLINK:
            ref = os.readlink(path)
            size = len(ref)
        elif kind in (treefmt.CHR, treefmt.BLK):
            rdev = st.st_rdev
        ids = self.ids
        return Entry(  # positional: this runs once a file of every snapshot
            name,
            kind,
            st.st_mode & 0o7777,
            ids.to_tree(st.st_uid),
            ids.to_tree(st.st_gid),
            st.st_mtime_ns,
            size,
            ref,
            rdev,
            read_xattrs(path, xattr_names) if xattr_names != [] else (),
            link,
        )

    def _file_digest(self, path: bytes, st: os.stat_result) -> bytes:
        if st.st_size == 0:  # nothing to read: a step's 20,000 `touch`es cost no open
            if not self.batch.has_blob(EMPTY):
                self.store.put_blob_bytes(b"", self.batch)
            return EMPTY
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest = self.hash_cache.get(key)
        if digest is None or not self.batch.has_blob(digest):
            digest, _ = self.store.put_blob_file(path, self.batch)
            self.hash_cache[key] = digest
            self.files_hashed += 1
        return digest


def import_directory(
    store: Store,
    path: str | Path,
    *,
    ids: IdMap = IDENTITY,
    batch: Batch | None = None,
) -> bytes:
    """Store the directory at ``path`` and return its tree digest.

    The directory's own metadata is not part of the result (a tree is the
    content of a directory); ``import_root`` records the root's metadata too.
    """
    if batch is None:
        with store.batch() as own:
            return import_directory(store, path, ids=ids, batch=own)
    maker = EntryMaker(store, batch, ids=ids)
    return _import_dir(store, maker, os.fsencode(path), b"")


def _import_dir(store: Store, maker: EntryMaker, path: bytes, rel: bytes) -> bytes:
    entries: list[Entry] = []
    with os.scandir(path) as it:
        children = sorted(it, key=lambda d: d.name)
    for child in children:
        st = child.stat(follow_symlinks=False)
        child_rel = rel + child.name
        ref = b""
        if stat.S_ISDIR(st.st_mode):
            ref = _import_dir(store, maker, child.path, child_rel + b"/")
        entries.append(maker.entry(child.path, child_rel, child.name, st, ref))
    return store.put_tree(entries, maker.batch)
