"""The sources layer: a build's tree as a small lower layer over a kept lower of its base.

A kept lower (``sharedlower.py``) is only worth keeping if the next build
can use it, and an edit-rebuild cycle changes the tree the build mounts
(the base with the sources laid out) every time, though the base stays.
So a build on tree ``view`` may be served by a lower of tree ``lower``
(its base) with what differs between the two made, at mount or attach, as
two more lower layers on a tmpfs above the eager layer::

    upper : sources (this) : shadows (this) : eager : FUSE lower (``lower``) :: blobs

The layer holds exactly what overlayfs needs for the merged lower to be
``view``: every directory on the way to a difference (with ``view``'s
metadata: overlayfs takes a merged directory's attributes from its topmost
layer), every entry that is new or differs (files as the same metadata-only
stubs the eager layer makes, their data redirected into the blob layer),
and a whiteout for every name of ``lower`` that ``view`` lacks. A directory
of ``view`` that ``lower`` lacks (a new one, or one in place of a file) also
gets an empty namesake in the shadows layer: overlayfs shows a directory
found in two layers as merged, with a link count of 1, as every directory of
a lower of ``view`` is (the eager layer holds them all); found in one layer,
it would show tmpfs's count. It needs no opaque mark: below the shadows, the
lookup stops at the lower's file of that name. A snapshot is then ``view``
plus the upper, as over a lower of ``view``.

Refused (``plan`` returns None; the build mounts a lower of ``view`` as
before) when the difference is larger than ``LIMIT`` entries (a state after
a big step: making thousands of stubs per build would cost what it saves),
or holds what one tmpfs layer cannot show exactly: a hard-link group (its
other names may be in the lower, a layer apart, not one inode), xattrs, or
a character device 0/0 (overlayfs would take it for a whiteout); and when it
hides or replaces a base entry in a hard-link group (the group's other
names in the lower would keep showing its old link count).
``AMBER_SOURCE_LAYER=0`` in amberd's environment turns the layer off.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from . import tree as treefmt
from .checkout import apply_metadata
from .eagerlayer import make_stub
from .store import MissingObject, Store
from .tree import Entry
from .userns import IdMap

#: Entries (directories on the way included) a sources layer may hold.
LIMIT = 5_000


def enabled_from_environment() -> bool:
    """``AMBER_SOURCE_LAYER=0`` turns the layer off (every changed tree mounts afresh)."""
    return os.environ.get("AMBER_SOURCE_LAYER", "1") != "0"


@dataclass(frozen=True, slots=True)
class Op:
    """One entry of the layer: ``entry`` at ``path`` (None: a whiteout)."""

    path: bytes
    entry: Entry | None
    #: A directory the lower lacks: shadowed, so that overlayfs merges it.
    alone: bool = False


class _Refused(Exception):
    pass


def plan(store: Store, lower: bytes, view: bytes, limit: int = LIMIT) -> list[Op] | None:
    """What a layer over a lower of ``lower`` needs to show ``view`` (None: refused).

    Parents come before their children. Reads only the trees that differ,
    and the whole of any directory ``view`` adds.
    """
    ops: list[Op] = []
    try:
        for op in _diff(store, lower, view, b""):
            ops.append(op)
            if len(ops) > limit:
                return None
    except (_Refused, MissingObject):
        # A tree the plan cannot read (a GC cycle set it aside, and the build that holds
        # it has not had it back yet): no layer; the mount of the whole tree reads it as
        # a mount always did, and its errors are the build's usual ones.
        return None
    return ops


def _diff(store: Store, old: bytes, new: bytes, prefix: bytes) -> Iterator[Op]:
    if old == new:
        return
    olds = {e.name: e for e in store.get_tree(old)}
    news = {e.name: e for e in store.get_tree(new)}
    for name in sorted(olds.keys() | news.keys()):
        a, b = olds.get(name), news.get(name)
        path = prefix + name
        if a is not None and (b is None or a.kind != treefmt.DIR or b.kind != treefmt.DIR):
            _unlinked(store, a)  # a base name hidden or replaced
        if b is None:
            yield Op(path, None)
        elif a is not None and a.kind == treefmt.DIR and b.kind == treefmt.DIR:
            if a != b:
                yield Op(path, _checked(b))
                yield from _diff(store, a.ref, b.ref, path + b"/")
        elif a is None or not a.same_content(b):
            yield Op(path, _checked(b), alone=b.kind == treefmt.DIR)
            if b.kind == treefmt.DIR:
                yield from _added(store, b.ref, path + b"/")


def _added(store: Store, tree: bytes, prefix: bytes) -> Iterator[Op]:
    for entry in store.get_tree(tree):
        yield Op(prefix + entry.name, _checked(entry), alone=entry.kind == treefmt.DIR)
        if entry.kind == treefmt.DIR:
            yield from _added(store, entry.ref, prefix + entry.name + b"/")


def _unlinked(store: Store, e: Entry, budget: list[int] | None = None) -> None:
    """Refuse when hiding base entry ``e`` would hide a member of a hard-link group: the
    group's other names, in the lower, would go on showing its old link count."""
    budget = [LIMIT] if budget is None else budget
    if treefmt.link_group(e) is not None:
        raise _Refused()
    if e.kind != treefmt.DIR:
        return
    for child in store.get_tree(e.ref):
        budget[0] -= 1
        if budget[0] < 0:
            raise _Refused()  # too much to look through: a lower of the whole tree
        _unlinked(store, child, budget)


def _checked(e: Entry) -> Entry:
    """``e``, if a tmpfs layer can show it exactly (see the module notes)."""
    if e.xattrs or treefmt.link_group(e) is not None:
        raise _Refused()
    if e.kind == treefmt.CHR and e.rdev == 0:
        raise _Refused()
    return e


def fill(root: bytes, shadows: bytes, ops: list[Op], ids: IdMap) -> None:
    """Make the layer under ``root`` and its shadows under ``shadows`` (empty
    directories of one tmpfs), in the order ``plan`` gave.

    Directories get their metadata last, deepest first, so their mtimes
    stay the tree's. Raises OSError when tmpfs refuses something: the
    caller mounts without the layer.
    """
    dirs = []
    for op in ops:
        path = root + b"/" + op.path
        entry = op.entry
        if entry is None:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            continue
        if entry.kind == treefmt.DIR:
            os.mkdir(path, 0o700)
            if op.alone:
                os.makedirs(shadows + b"/" + op.path, 0o755, exist_ok=True)
            dirs.append((path, entry))
            continue
        _leaf(path, entry)
        apply_metadata(path, entry, ids)
    for path, entry in reversed(dirs):
        apply_metadata(path, entry, ids)


def _leaf(path: bytes, entry: Entry) -> None:
    if entry.kind == treefmt.FILE:
        make_stub(path, entry)
    elif entry.kind == treefmt.SYMLINK:
        os.symlink(entry.ref, path)
    else:  # a fifo, socket or device node, as the FUSE lower would show it
        os.mknod(path, entry.st_mode & ~0o7777 | 0o600, entry.rdev)
