"""Editing trees without a filesystem: put an entry at a path.

Used to lay sources and the work directory onto a base tree. Rewrites only
the directories on the path, like a snapshot does.
"""

from __future__ import annotations

from . import tree as treefmt
from .store import Batch, Store
from .tree import Entry


class TreeEditError(ValueError):
    pass


def _split(path: str) -> list[bytes]:
    parts = [p for p in path.encode().split(b"/") if p]
    if any(p in (b".", b"..") for p in parts):
        raise TreeEditError(f"path {path!r} leaves the tree")
    return parts


def put_entry(
    store: Store, root: bytes, path: str, entry: Entry, batch: Batch, *, dir_template: Entry
) -> bytes:
    """``root`` with ``entry`` (renamed to the last component) at ``path``.

    Missing directories on the way are created from ``dir_template``; an
    existing non-directory on the way is an error, an existing entry at
    ``path`` is replaced.
    """
    parts = _split(path)
    if not parts:
        raise TreeEditError("cannot replace the root itself")
    return _put(store, root, parts, entry._replace(name=parts[-1]), batch, dir_template, path)


def _put(store, digest, parts, entry, batch, template, path) -> bytes:
    entries = {e.name: e for e in store.get_tree(digest)}
    name = parts[0]
    if len(parts) == 1:
        entries[name] = entry
    else:
        current = entries.get(name)
        if current is None:
            sub = treefmt.EMPTY_TREE
            current = template._replace(name=name)
        elif current.kind != treefmt.DIR:
            raise TreeEditError(f"{path}: {name.decode(errors='replace')} is not a directory")
        else:
            sub = current.ref
        entries[name] = current._replace(
            ref=_put(store, sub, parts[1:], entry, batch, template, path)
        )
    return store.put_tree([entries[n] for n in sorted(entries)], batch)


def ensure_dir(store: Store, root: bytes, path: str, template: Entry, batch: Batch) -> bytes:
    """``root`` with a directory at ``path`` (kept as is if it exists)."""
    parts = _split(path)
    if not parts:
        return root
    existing = store.lookup_path(root, b"/".join(parts))
    if existing is not None:
        if existing.kind != treefmt.DIR:
            raise TreeEditError(f"{path} exists and is not a directory")
        return root
    return put_entry(
        store, root, path, template._replace(ref=treefmt.EMPTY_TREE), batch, dir_template=template
    )


def chown_dir(store: Store, root: bytes, path: str, uid: int, gid: int, batch: Batch) -> bytes:
    """``root`` with the existing directory at ``path`` owned by ``uid``/``gid``."""
    parts = _split(path)
    existing = store.lookup_path(root, b"/".join(parts))
    if existing is None or existing.kind != treefmt.DIR:
        raise TreeEditError(f"{path} is not a directory")
    if (existing.uid, existing.gid) == (uid, gid):
        return root
    return put_entry(
        store, root, path, existing._replace(uid=uid, gid=gid), batch, dir_template=existing
    )
