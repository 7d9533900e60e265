"""What changed between two trees.

Walks both trees together and descends only where subtree digests differ,
so comparing two snapshots costs what changed between them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from . import tree as treefmt
from .store import Store
from .tree import Entry

ADDED, MODIFIED, DELETED = "added", "modified", "deleted"


@dataclass(frozen=True)
class Change:
    kind: str  # ADDED, MODIFIED or DELETED
    path: bytes  # relative to the root
    old: Entry | None
    new: Entry | None


def diff_trees(
    store: Store, old: bytes, new: bytes, *, expand: bool = True, prefix: bytes = b""
) -> Iterator[Change]:
    """Changes from tree ``old`` to tree ``new``, in path order.

    With ``expand``, an added or deleted directory is followed by every path
    below it; without, it is one change.
    """
    if old == new:
        return
    old_entries = {e.name: e for e in store.get_tree(old)}
    new_entries = {e.name: e for e in store.get_tree(new)}
    for name in sorted(old_entries.keys() | new_entries.keys()):
        a = old_entries.get(name)
        b = new_entries.get(name)
        path = prefix + name
        if a is None:
            assert b is not None
            yield Change(ADDED, path, None, b)
            if expand and b.kind == treefmt.DIR:
                yield from _all_below(store, b.ref, path + b"/", ADDED, new_side=True)
        elif b is None:
            yield Change(DELETED, path, a, None)
            if expand and a.kind == treefmt.DIR:
                yield from _all_below(store, a.ref, path + b"/", DELETED, new_side=False)
        elif a.kind == treefmt.DIR and b.kind == treefmt.DIR:
            if _meta(a) != _meta(b):
                yield Change(MODIFIED, path, a, b)
            yield from diff_trees(store, a.ref, b.ref, expand=expand, prefix=path + b"/")
        elif not a.same_content(b):
            yield Change(MODIFIED, path, a, b)
            if expand and a.kind == treefmt.DIR:
                yield from _all_below(store, a.ref, path + b"/", DELETED, new_side=False)
            if expand and b.kind == treefmt.DIR:
                yield from _all_below(store, b.ref, path + b"/", ADDED, new_side=True)


def _meta(e: Entry) -> tuple:
    """A directory's own state, without its content."""
    return (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs)


def _all_below(store: Store, digest: bytes, prefix: bytes, kind: str, *, new_side: bool):
    for path, entry in store.walk(digest, prefix):
        yield Change(kind, path, None if new_side else entry, entry if new_side else None)
