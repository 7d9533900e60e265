"""The canonical tree encoding: one directory, addressed by its digest.

A tree is a msgpack array ``[FORMAT, [entry, ...]]`` with entries sorted by
name (raw bytes, as the kernel knows them). Each entry is the array::

    [name, kind, mode, uid, gid, mtime_ns, size, ref, rdev, xattrs, link]

- ``ref``: raw 32-byte digest of the blob (files) or subtree (directories),
  the link target (symlinks), empty otherwise.
- ``xattrs``: ``[[name, value], ...]`` sorted by name; never overlayfs' own.
- ``link``: ``None``, or a hard-link group label. Entries of one tree state
  with equal label, content and metadata (``link_group``) are one inode.
  The label is the tree-relative path of the group's first member when the
  group was recorded (a snapshot appends ``//`` and its base's digest);
  only its equality matters.

Ids are recorded as the sandbox sees them (not shifted host ids). The digest
of a tree is BLAKE3 of exactly these bytes, so equal directories share a
digest and unchanged subtrees are shared between snapshots (a Merkle tree).
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from typing import NamedTuple

import msgpack

from .digest import EMPTY, hash_bytes

FORMAT = 1

FILE, DIR, SYMLINK, FIFO, CHR, BLK, SOCK = range(1, 8)

KIND_NAMES = {
    FILE: "file",
    DIR: "dir",
    SYMLINK: "symlink",
    FIFO: "fifo",
    CHR: "chardev",
    BLK: "blockdev",
    SOCK: "socket",
}

_KIND_OF_MODE = {
    stat.S_IFREG: FILE,
    stat.S_IFDIR: DIR,
    stat.S_IFLNK: SYMLINK,
    stat.S_IFIFO: FIFO,
    stat.S_IFCHR: CHR,
    stat.S_IFBLK: BLK,
    stat.S_IFSOCK: SOCK,
}
MODE_OF_KIND = {kind: fmt for fmt, kind in _KIND_OF_MODE.items()}

#: The tree with no entries; every store holds it.
EMPTY_TREE_BYTES = msgpack.packb([FORMAT, []], use_bin_type=True)
EMPTY_TREE = hash_bytes(EMPTY_TREE_BYTES)
DIGEST_SIZE = len(EMPTY)


class TreeFormatError(ValueError):
    """Bytes that are not a canonical tree (corruption or a hostile peer)."""


class Entry(NamedTuple):
    name: bytes
    kind: int
    mode: int  # permission bits only (0o7777)
    uid: int
    gid: int
    mtime_ns: int
    size: int
    ref: bytes = b""
    rdev: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    link: bytes | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def st_mode(self) -> int:
        return MODE_OF_KIND[self.kind] | self.mode

    def same_content(self, other: Entry) -> bool:
        """True when the two entries describe identical state (name aside)."""
        return self[1:] == other[1:]


def link_group(e: Entry) -> tuple | None:
    """What makes names one inode: the same label, content and metadata.

    Labels are only unique within the history that made them, so an entry
    whose metadata differs from its label's group is an inode of its own;
    every reader of trees (lower, eager layer, checkout, export) groups by
    this, so they all show the same inodes.
    """
    if e.link is None:
        return None
    return (e.link, e.ref, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.xattrs)


def kind_of_mode(st_mode: int) -> int:
    return _KIND_OF_MODE[stat.S_IFMT(st_mode)]


def encode(entries: list[Entry]) -> bytes:
    """Canonical bytes of a directory. ``entries`` must be sorted by name.

    msgpack packs a tuple as the array a list would be, so an ``Entry`` is
    its own row and its ``xattrs`` pairs their arrays: one C call for the
    whole directory, no row built in Python (a snapshot encodes 20,000 new
    files this way; tests/test_snapshot.py holds digests from before).
    """
    return msgpack.packb([FORMAT, entries], use_bin_type=True)


#: Whether ``decode`` should build the entry of a row, from its kind and mode.
Selector = Callable[[int, int], bool]


def decode(data: bytes, select: Selector | None = None) -> list[Entry]:
    """Parse and validate a tree; raises ``TreeFormatError`` on anything off.

    With ``select``, rows it refuses are skipped unparsed (a tenth of the
    cost); the entries returned are validated as always.
    """
    try:
        fmt, rows = msgpack.unpackb(data, raw=True, use_list=True, strict_map_key=True)
    except Exception as exc:
        raise TreeFormatError(f"undecodable tree: {exc}") from None
    if fmt != FORMAT or not isinstance(rows, list):
        raise TreeFormatError(f"unknown tree format {fmt!r}")
    entries: list[Entry] = []
    previous = b""
    for row in rows:
        if select is not None and not (
            type(row) is list and len(row) > 2 and select(row[1], row[2])
        ):
            continue
        try:
            name, kind, mode, uid, gid, mtime, size, ref, rdev, xattrs, link = row
            entry = Entry(
                name, kind, mode, uid, gid, mtime, size, ref, rdev,
                tuple((k, v) for k, v in xattrs), link,
            )  # fmt: skip
        except (TypeError, ValueError):
            raise TreeFormatError("malformed tree entry") from None
        _check_entry(entry, previous)
        previous = entry.name
        entries.append(entry)
    return entries


def refs(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """``(subtrees, blobs)`` the tree encoded in ``data`` refers to.

    For marking and presence walks over every tree of a large root: no
    entry objects and no validation, a few times faster than ``decode``;
    raises ``TreeFormatError`` on bytes it cannot read at all.
    """
    try:
        _fmt, rows = msgpack.unpackb(data, raw=True, use_list=True)
        subtrees = [row[7] for row in rows if row[1] == DIR]
        blobs = [row[7] for row in rows if row[1] == FILE]
    except Exception as exc:
        raise TreeFormatError(f"undecodable tree: {exc}") from None
    return subtrees, blobs


#: overlayfs reads these on the layers amber builds from trees (it mounts
#: without ``userxattr``): a tree must never carry them. Importers drop them;
#: a hostile peer's tree is refused.
OVERLAY_XATTR_PREFIX = b"trusted.overlay."


def _check_entry(e: Entry, previous: bytes) -> None:
    # Runs for every entry of every tree read (a mount reads thousands), so
    # the common case is a handful of type checks; ``type() is int`` also
    # refuses bools.
    name = e.name
    if type(name) is not bytes or name in (b"", b".", b"..") or b"/" in name:
        raise TreeFormatError(f"bad entry name {name!r}")
    if name <= previous or b"\0" in name:
        raise TreeFormatError(f"entry names not sorted or not unique at {name!r}")
    kind = e.kind
    if kind not in KIND_NAMES:
        raise TreeFormatError(f"unknown entry kind {kind!r} for {name!r}")
    if not (
        type(e.mode) is int
        and type(e.uid) is int
        and type(e.gid) is int
        and type(e.mtime_ns) is int
        and type(e.size) is int
        and type(e.rdev) is int
    ):
        raise TreeFormatError(f"non-integer field in {name!r}")
    ref = e.ref
    if kind in (FILE, DIR):
        if type(ref) is not bytes or len(ref) != DIGEST_SIZE:
            raise TreeFormatError(f"bad digest in {name!r}")
    elif kind == SYMLINK and type(ref) is not bytes:
        raise TreeFormatError(f"bad link target in {name!r}")
    if e.link is not None and type(e.link) is not bytes:
        raise TreeFormatError(f"bad hard-link label in {name!r}")
    for key, value in e.xattrs:
        if (
            type(key) is not bytes
            or type(value) is not bytes
            or key.startswith(OVERLAY_XATTR_PREFIX)
        ):
            raise TreeFormatError(f"bad xattr {key!r} on {name!r}")


def digest_of(entries: list[Entry]) -> tuple[bytes, bytes]:
    """Encode ``entries`` and return ``(digest, encoding)``."""
    data = encode(entries)
    return hash_bytes(data), data
