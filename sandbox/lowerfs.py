"""The read-only lower filesystem: a stored tree presented as inodes.

This model knows nothing of pyfuse3 (``fuseops.py`` is the thin adapter) so
it can be tested without a kernel.

Design (the reason amber meets its speed target): the kernel overlayfs that
sits on top of this filesystem is given the store's blob directory as a
*data-only lower layer* (Linux 6.5+, the composefs arrangement). Every file
here is a metadata-only stub carrying ``trusted.overlay.metacopy`` and
``trusted.overlay.redirect = /ab/<digest>``: overlayfs takes names and
attributes from us, once per inode thanks to infinite entry/attr timeouts,
and opens and reads the blob directly from the store's filesystem. Opens,
reads, releases and flushes, the bulk of a build's filesystem traffic, never
reach Python. The tree is immutable, so nothing is ever invalidated.

On kernels without data-only layers (before 6.5; ``fsmode.py``) the model
is made with ``serve_data=True``: no stubs, files are opened and read here,
from their blobs, and overlayfs sees them as ordinary lower files.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from . import tree as treefmt
from .store import MissingObject, Store
from .tree import Entry
from .userns import IDENTITY, IdMap

ROOT_INODE = 1
#: Seconds the kernel may cache names and attributes: the tree never changes.
FOREVER = 1e9

METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"


def redirect_of(blob: bytes) -> bytes:
    """The absolute redirect that finds ``blob`` in the data-only layer (the blob directory)."""
    return Store.blob_redirect(blob)


class LowerError(Exception):
    """A request the model refuses; ``errno`` says why."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err))
        self.errno = err


@dataclass(slots=True)
class Attr:
    """What the kernel is told about an inode (host ids, nanosecond times)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime_ns: int


_ROOT_ENTRY = Entry(b"", treefmt.DIR, 0o755, 0, 0, 0, 0, treefmt.EMPTY_TREE)


class LowerModel:
    """Inodes over one immutable tree, created lazily as directories are read.

    Inodes are never forgotten: the kernel caches them forever anyway and
    each costs a few hundred bytes. Hard-link groups (entries with equal
    ``tree.link_group``) share one inode.
    """

    def __init__(
        self,
        store: Store,
        root: bytes,
        *,
        ids: IdMap = IDENTITY,
        serve_data: bool = False,
    ):
        self.store = store
        self.ids = ids
        #: Files are ordinary files whose data is read here, not metacopy stubs.
        self.serve_data = serve_data
        self._entries: list[Entry] = [_ROOT_ENTRY._replace(ref=root)]  # index = ino - 1
        self._children: dict[int, dict[bytes, int]] = {}
        self._order: dict[int, list[bytes]] = {}
        self._links: dict[tuple, int] = {}
        self._fds: dict[bytes, int] = {}
        #: ino -> (parent ino, name), for ``met_files``' paths.
        self._parents: dict[int, tuple[int, bytes]] = {}
        #: Files whose metacopy xattr overlayfs asked for since ``met_files`` last ran.
        self._met: set[int] = set()

    # -- inode table -------------------------------------------------------

    def entry(self, ino: int) -> Entry:
        try:
            return self._entries[ino - 1]
        except IndexError:
            raise LowerError(errno.ENOENT) from None

    def _load(self, ino: int) -> dict[bytes, int]:
        children = self._children.get(ino)
        if children is not None:
            return children
        entry = self.entry(ino)
        if entry.kind != treefmt.DIR:
            raise LowerError(errno.ENOTDIR)
        children = {}
        for child in self.store.get_tree(entry.ref):
            key = treefmt.link_group(child)
            child_ino = self._links.get(key) if key else None
            if child_ino is None:
                self._entries.append(child)
                child_ino = len(self._entries)
                if key:
                    self._links[key] = child_ino
                self._parents[child_ino] = (ino, child.name)
            children[child.name] = child_ino
        self._children[ino] = children
        self._order[ino] = list(children)
        return children

    # -- requests ----------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Attr | None:
        """Attributes of ``name`` in ``parent``; None if absent (cache that)."""
        ino = self._load(parent).get(name)
        return None if ino is None else self.getattr(ino)

    def getattr(self, ino: int) -> Attr:
        e = self.entry(ino)
        nlink = 2 if e.link is not None else 1
        return Attr(
            ino=ino,
            mode=e.st_mode,
            nlink=nlink,
            uid=self.ids.to_host(e.uid),
            gid=self.ids.to_host(e.gid),
            size=e.size,
            rdev=e.rdev,
            mtime_ns=e.mtime_ns,
        )

    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries from offset ``start``, each with the offset of the next.

        Lazy: the kernel's buffer takes a few dozen entries per request, so a
        large directory is listed in many requests, each from its offset.
        Raises ``LowerError`` at once, not on the first entry.
        """
        children = self._load(ino)
        names = self._order[ino]
        return (
            (names[i], self.getattr(children[names[i]]), i + 1) for i in range(start, len(names))
        )

    def readlink(self, ino: int) -> bytes:
        e = self.entry(ino)
        if e.kind != treefmt.SYMLINK:
            raise LowerError(errno.EINVAL)
        return e.ref

    def getxattr(self, ino: int, name: bytes) -> bytes:
        e = self.entry(ino)
        if e.kind == treefmt.FILE and not self.serve_data:
            if name == METACOPY:
                self._met.add(ino)
                return b""
            if name == REDIRECT:
                return redirect_of(e.ref)
        for key, value in e.xattrs:
            if key == name:
                return value
        raise LowerError(errno.ENODATA)

    def met_files(self) -> list[tuple[bytes, Entry]]:
        """The files overlayfs met since the last call (path from the root, entry), once each.

        A new overlay asks the lower for the metacopy and redirect xattrs of
        every file it meets, and FUSE caches no xattrs: what the eager layer
        is told of these (``EagerLayer.promote``) the next overlay finds on
        tmpfs instead, in the kernel. Hard-link groups are left out: their
        members must stay one inode, in one layer.
        """
        met, self._met = self._met, set()
        found = []
        for ino in met:
            entry = self.entry(ino)
            if treefmt.link_group(entry) is None:
                found.append((self._path(ino), entry))
        return found

    def _path(self, ino: int) -> bytes:
        names = []
        while ino in self._parents:
            ino, name = self._parents[ino]
            names.append(name)
        return b"/".join(reversed(names))

    def listxattr(self, ino: int) -> list[bytes]:
        return [key for key, _ in self.entry(ino).xattrs]

    def check_open(self, ino: int, flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise LowerError(errno.EROFS)
        if self.entry(ino).kind != treefmt.FILE:
            raise LowerError(errno.EINVAL)

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """File content: every read in ``serve_data`` mode, else only direct readers'.

        A blob that cannot be read (lost from the store, an I/O error) is
        EIO to the reader, never a short file.
        """
        e = self.entry(ino)
        if e.kind != treefmt.FILE:
            raise LowerError(errno.EINVAL)
        try:
            fd = self._fds.get(e.ref)
            if fd is None:
                if len(self._fds) >= 256:
                    for old in list(self._fds)[:64]:
                        os.close(self._fds.pop(old))
                fd = self._fds[e.ref] = self.store.open_blob(e.ref)
            return os.pread(fd, size, offset)
        except (OSError, MissingObject):
            raise LowerError(errno.EIO) from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
