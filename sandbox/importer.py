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
from .asuser import UserReader
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


#: ``Entry`` from a tuple of all its fields without the named tuple's
#: Python-level ``__new__`` (half an entry's cost in a snapshot's loop).
_new_entry = tuple.__new__
_FILE = treefmt.FILE


class _TreeIds(dict[int, int]):
    """Host id -> tree id, each computed once (a snapshot maps two ids a file)."""

    def __init__(self, ids: IdMap):
        super().__init__()
        self._ids = ids

    def __missing__(self, host_id: int) -> int:
        tree_id = self[host_id] = self._ids.to_tree(host_id)
        return tree_id


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
        self._empty_stored = False
        self._tree_ids = _TreeIds(ids)

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

    def link_label(self, inode: tuple[int, int], rel: bytes) -> bytes:
        """The hard-link group label of ``inode`` (the first path seen of it)."""
        return self._links.setdefault(inode, rel + self.label_suffix)

    def file_digest_fd(self, fd: int, size: int) -> bytes:
        """Store an open file's ``size`` bytes (a user's, opened by their helper)."""
        if size == 0:
            return self._empty_blob()
        self.files_hashed += 1
        return self.store.put_blob_fd(fd, size, self.batch)

    def plain_file(self, path: bytes, rel_dir: bytes, name: bytes, st: os.stat_result) -> Entry:
        """``entry`` of a regular file without xattrs, cut short.

        A snapshot makes one a new file (20,000 for a step that touches
        20,000 files), so this is ``entry`` without its dispatch: the
        digest, the link label (``rel_dir + name``) when linked, one tuple.
        """
        size = st.st_size
        if size:
            ref = self._file_digest(path, st)
        else:
            ref = EMPTY if self._empty_stored else self._empty_blob()
        link = None
        if st.st_nlink > 1:
            link = self.link_label((st.st_dev, st.st_ino), rel_dir + name)
        tree_id = self._tree_ids
        return _new_entry(
            Entry,
            (name, _FILE, st.st_mode & 0o7777, tree_id[st.st_uid], tree_id[st.st_gid],
             st.st_mtime_ns, size, ref, 0, (), link),
        )  # fmt: skip

    def _empty_blob(self) -> bytes:
        """EMPTY, stored: a step's 20,000 `touch`es cost no open and one check."""
        if not self._empty_stored:
            if not self.batch.has_blob(EMPTY):
                self.store.put_blob_bytes(b"", self.batch)
            self._empty_stored = True
        return EMPTY

    def _file_digest(self, path: bytes, st: os.stat_result) -> bytes:
        if st.st_size == 0:
            return self._empty_blob()
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


# --------------------------------------------------------------------------- as the user

_RECORD_KIND = {"d": stat.S_ISDIR, "f": stat.S_ISREG, "l": stat.S_ISLNK}
_OTHER = (stat.S_ISCHR, stat.S_ISBLK, stat.S_ISFIFO, stat.S_ISSOCK)
_MAX_XATTRS = 64


class WalkError(ValueError):
    """The helper's walk broke the protocol (wrong kinds, bad names, unbalanced)."""


def import_user_directory(
    store: Store, reader: UserReader, path: str, *, batch: Batch, follow_symlinks: bool = True
) -> bytes:
    """``import_directory`` of a user's directory, walked by ``reader``'s helper as the user.

    Files are stored from the descriptors it passes, with their ``fstat``;
    the rest of the metadata is what the helper reports, checked for shape:
    it describes only what the user could read anyway. Raises ``Unreadable``
    (sandbox/asuser.py) naming the first path the user cannot open.
    """
    maker = EntryMaker(store, batch)
    stack: list[tuple[list[Entry], Entry | None, bytes]] = [([], None, b"")]
    for record, fd in reader.walk(path, follow_symlinks=follow_symlinks):
        try:
            if record == ["u"]:
                if len(stack) < 2:
                    raise WalkError("the walk left its top directory")
                entries, entry, _ = stack.pop()
                assert entry is not None
                tree = store.put_tree(sorted(entries, key=lambda e: e.name), batch)
                stack[-1][0].append(entry._replace(ref=tree))
                continue
            entry = _user_entry(maker, record, fd, stack[-1][2])
            if record[0] == "d":
                stack.append(([], entry, stack[-1][2] + entry.name + b"/"))
            else:
                stack[-1][0].append(entry)
        finally:
            if fd is not None:
                os.close(fd)
    if len(stack) != 1:
        raise WalkError("the walk ended inside a directory")
    return store.put_tree(sorted(stack[0][0], key=lambda e: e.name), batch)


def _user_entry(maker: EntryMaker, record: list, fd: int | None, rel: bytes) -> Entry:
    """The entry one walk record describes (a directory's without its ``ref`` yet)."""
    if len(record) < 4 or not isinstance(record[1], str) or not isinstance(record[2], list):
        raise WalkError(f"a walk record of the wrong shape: {str(record)[:80]}")
    tag, name, meta, raw_xattrs = record[0], os.fsencode(record[1]), record[2], record[3]
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        raise WalkError(f"a walk record names {name!r}")
    if len(meta) != 6 or not all(isinstance(v, int) and v >= 0 for v in meta):
        raise WalkError(f"a walk record with bad metadata: {meta!r}")
    if fd is not None:  # the descriptor's own word, not the helper's
        st = os.fstat(fd)
        meta = [st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, 0]
    mode, uid, gid, mtime_ns, size, rdev = meta
    check = _RECORD_KIND.get(tag)
    if not (check(mode) if check else tag == "o" and any(c(mode) for c in _OTHER)):
        raise WalkError(f"{(rel + name).decode(errors='replace')}: not what the walk said")
    kind = treefmt.kind_of_mode(mode)
    ref, link = b"", None
    if tag == "f":
        assert fd is not None
        ref = maker.file_digest_fd(fd, size)
        if st.st_nlink > 1:
            link = maker.link_label((st.st_dev, st.st_ino), rel + name)
    elif tag == "l":
        if len(record) != 5 or not isinstance(record[4], str):
            raise WalkError("a symbolic link without its target")
        ref, size = os.fsencode(record[4]), len(os.fsencode(record[4]))
    if kind not in (treefmt.CHR, treefmt.BLK):
        rdev = 0
    if kind == treefmt.DIR:
        size = 0
    entry = Entry(name, kind, mode & 0o7777, uid, gid, mtime_ns, size, ref, rdev,
                  _xattrs(raw_xattrs), link)  # fmt: skip
    return entry


def _xattrs(raw: object) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_XATTRS:
        raise WalkError("a walk record with bad extended attributes")
    pairs = []
    for pair in raw:
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        ):
            raise WalkError("a walk record with bad extended attributes")
        name = os.fsencode(pair[0])
        if name.startswith(treefmt.OVERLAY_XATTR_PREFIX):
            continue
        try:
            pairs.append((name, bytes.fromhex(pair[1])))
        except ValueError:
            raise WalkError("a walk record with bad extended attributes") from None
    return tuple(sorted(pairs))
