"""The eager layer: the parts of a tree that are cheap to make and costly to serve lazily.

The FUSE lower (``lowerfs.py``) serves a tree lazily, one request per name
the build first touches, and that is right for the bulk of a tree: headers,
libraries, data, most of which a build never opens. Three kinds of entry
are different: the kernel asks for them *again and again*, and pyfuse3
gives no way to let it cache the answers:

* **symlinks**: path walks resolve them constantly (``/usr/bin/cc`` ->
  ``/etc/alternatives/cc`` -> ..., library sonames), and pyfuse3 cannot set
  FUSE_CAP_CACHE_SYMLINKS, so each resolution would be a READLINK;
* **directories**: every ``open(dir)`` reaches the filesystem, and glibc
  opens ``/usr/lib/locale/C.utf8/LC_MESSAGES`` in every process that has a
  UTF-8 locale: an OPENDIR and a RELEASEDIR per exec;
* **executables**: every exec reads ``security.capability`` and the kernel
  never caches xattrs of a FUSE file: a GETXATTR per exec.

So before the overlay is mounted, these entries, and only these, are made
on a tmpfs stacked between the upper and the FUSE lower, each with exactly
the tree's metadata. Executables become the same metadata-only stubs the
FUSE lower serves (``trusted.overlay.metacopy`` plus an absolute redirect
into the data-only blob layer), sparse at their full size, so their content
still comes straight from the store. Measured on the Debian buildd rootfs
(13,000 entries; 1,340 directories, 990 symlinks and 600 executables are
made eagerly): 0.08 s per mount; in exchange a zlib build sends 930
requests to Python instead of 1,956 and runs about 5% faster.

A lower kept for the next build (``sharedlower.py``) also learns: the
files a build met on the FUSE lower are added as stubs between two overlays
(``promote``), since a new overlay would ask FUSE for two xattrs of each.

Being a lower layer, none of this enters a snapshot, and a step may change
or delete any of it as usual. An entry tmpfs cannot hold exactly (an xattr
it refuses, the layer's size cap reached) is left to the FUSE lower, which
serves everything anyway.

In the ``hidden-data`` mode (``fsmode.py``) the layer also carries a
whiteout for each of the blob directory's shards, which is then a plain
layer below. In the ``fuse-data`` mode (kernels without either)
there is no blob layer for a stub to redirect into, so executables are left
to the FUSE lower: ``EagerLayer(..., executables=False)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import tree as treefmt
from .checkout import apply_metadata
from .lowerfs import METACOPY, REDIRECT, redirect_of
from .store import Store
from .tree import Entry
from .userns import IdMap

#: What tmpfs may refuse, which leaves an entry (a directory: its subtree) to
#: the FUSE lower, which serves everything anyway. Making an entry: the layer
#: is full (long symlink targets take a page each) or a link count is. Its
#: xattrs: a namespace or size tmpfs does not take. Anything else, and any
#: error giving an entry its owner, mode or mtime, is a real failure.
_CANNOT_MAKE = (errno.ENOSPC, errno.EMLINK)
_XATTR_REFUSED = (errno.EPERM, errno.ENOTSUP, errno.EINVAL, errno.E2BIG, errno.ERANGE, errno.ENOSPC)


class _Refused(Exception):
    """tmpfs cannot hold this entry exactly."""


def _refuse_xattr(name: bytes, exc: OSError) -> None:
    if exc.errno in _XATTR_REFUSED:
        raise _Refused(name) from exc
    raise exc


@contextlib.contextmanager
def _making() -> Iterator[None]:
    """Making an entry: a full layer is a refusal, anything else a failure."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _CANNOT_MAKE:
            raise _Refused() from exc
        raise


@dataclass
class EagerStats:
    dirs: int = 0
    symlinks: int = 0
    executables: int = 0
    left_to_lower: int = 0  # entries (directories: subtrees) tmpfs could not hold exactly


def belongs(kind: int, mode: int) -> bool:
    """Whether an entry of this kind and mode belongs on the eager layer."""
    return (
        kind == treefmt.DIR
        or kind == treefmt.SYMLINK
        or (kind == treefmt.FILE and type(mode) is int and bool(mode & 0o111))
    )


def belongs_without_executables(kind: int, mode: int) -> bool:
    """The same, when executables cannot be stubs (no data-only layer)."""
    return kind == treefmt.DIR or kind == treefmt.SYMLINK


class EagerLayer:
    """Writes a tree's directories, symlinks and executable stubs under a directory."""

    def __init__(self, store: Store, ids: IdMap, *, executables: bool = True):
        self.store = store
        self.ids = ids
        self._belongs = belongs if executables else belongs_without_executables
        self.stats = EagerStats()
        self._link_groups: dict[tuple, bytes] = {}

    def fill(self, tree: bytes, root: bytes) -> EagerStats:
        """Fill ``root`` (an empty directory: the layer's root) from ``tree``."""
        self._fill(tree, root)
        return self.stats

    def promote(self, root: bytes, files: list[tuple[bytes, Entry]]) -> int:
        """Stubs at ``root``/path for files the FUSE lower has served (``LowerModel.met_files``).

        Only between two overlays: a lower layer must not change under a
        mounted one. A file already here, or whose directory was left to the
        FUSE lower, is skipped. Returns how many were made.
        """
        made = 0
        for path, entry in files:
            target = root + b"/" + path
            try:
                if not stat.S_ISDIR(os.lstat(os.path.dirname(target)).st_mode):
                    continue
            except FileNotFoundError:
                continue  # its directory was left to the FUSE lower
            try:
                os.lstat(target)
                continue  # already here
            except FileNotFoundError:
                pass
            refused = self.stats.left_to_lower
            self._leaf(entry, target)
            made += self.stats.left_to_lower == refused
        return made

    def hide(self, root: bytes, names: list[bytes]) -> None:
        """Whiteouts at the layer's root: names of a layer below that the build must not see.

        The hidden-data mode's data layer is the blob directory; these hide
        its shards. The caller has checked the tree's root holds none of them.
        """
        for name in names:
            os.mknod(root + b"/" + name, stat.S_IFCHR | 0o600, os.makedev(0, 0))

    def _fill(self, tree: bytes, path: bytes) -> None:
        prefix = path + b"/"
        # Every tree of the root is read, but only the entries made here are
        # decoded: the FUSE lower decodes (and caches) the trees it serves.
        for entry in self.store.get_tree_entries(tree, self._belongs):
            if entry.kind == treefmt.DIR:
                self._directory(entry, prefix + entry.name)
            else:
                self._leaf(entry, prefix + entry.name)

    def _directory(self, entry: Entry, path: bytes) -> None:
        before = dataclasses.replace(self.stats)
        try:
            with _making():
                os.mkdir(path, 0o700)
        except _Refused:
            self.stats.left_to_lower += 1
            return
        self._fill(entry.ref, path)
        try:
            # after the children, so the mtime stays the tree's
            apply_metadata(path, entry, self.ids, xattr_refused=_refuse_xattr)
        except _Refused:
            shutil.rmtree(path)  # the whole subtree is left to the lower
            inside = path + b"/"
            self._link_groups = {
                group: first
                for group, first in self._link_groups.items()
                if not first.startswith(inside)
            }
            self.stats = before
            self.stats.left_to_lower += 1
            return
        self.stats.dirs += 1

    def _leaf(self, entry: Entry, path: bytes) -> None:
        group = treefmt.link_group(entry)
        first = self._link_groups.get(group) if group else None
        try:
            with _making():
                if first is not None:
                    os.link(first, path)  # one inode for the group, as in the FUSE lower
                    return
                if entry.kind == treefmt.SYMLINK:
                    os.symlink(entry.ref, path)
                else:
                    make_stub(path, entry, xattr_refused=_refuse_xattr)
            apply_metadata(path, entry, self.ids, xattr_refused=_refuse_xattr)
        except _Refused:
            _remove(path)
            self.stats.left_to_lower += 1
            return
        if entry.kind == treefmt.SYMLINK:
            self.stats.symlinks += 1
        else:
            self.stats.executables += 1
        if group:
            self._link_groups[group] = path


def _remove(path: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def make_stub(
    path: bytes, entry: Entry, *, xattr_refused: Callable[[bytes, OSError], None] | None = None
) -> None:
    """An empty sparse file of the entry's size, its content redirected to the blob.

    ``xattr_refused`` decides about an xattr the filesystem refuses (by default
    the error is raised). Also the sources layer's (``sourcelayer.py``).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, entry.size)
        for name, value in ((METACOPY, b""), (REDIRECT, redirect_of(entry.ref))):
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                if xattr_refused is None:
                    raise
                xattr_refused(name, exc)
    finally:
        os.close(fd)
