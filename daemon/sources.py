"""Laying a spec's work directory and sources onto the base tree.

Sources are read by the daemon, never by the sandbox. Files and directories
named by ``path`` are read with the *client's* filesystem identity
(``setfsuid``/``setfsgid`` on the worker thread), so a user cannot make a
root daemon copy a file they could not read themselves.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from amber.client.errors import AmberError
from amber.sandbox import tree as treefmt
from amber.sandbox.importer import import_directory
from amber.sandbox.runner import BUILD_GID, BUILD_UID
from amber.sandbox.store import Batch, Store
from amber.sandbox.tree import Entry
from amber.sandbox.treeedit import TreeEditError, ensure_dir, put_entry

from .spec import Source, Spec

ROOT_DIR = Entry(b"", treefmt.DIR, 0o755, 0, 0, 0, 0, treefmt.EMPTY_TREE)
BUILD_DIR = ROOT_DIR._replace(uid=BUILD_UID, gid=BUILD_GID)

_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def filesystem_identity(uid: int, gid: int) -> Iterator[None]:
    """Access files as ``uid``/``gid`` on this thread only (a no-op for root)."""
    if uid == 0:
        yield
        return
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    try:
        yield
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)


def lay_out(store: Store, base: bytes, spec: Spec, *, uid: int, gid: int) -> bytes:
    """``base`` + the work directory + every source. Blocking: run in a thread."""
    with store.batch() as batch:
        try:
            tree = _ensure_parents(store, base, spec.workdir, batch)
            for source in spec.sources:
                tree = _add_source(store, tree, source, batch, uid=uid, gid=gid)
        except TreeEditError as exc:
            raise AmberError("spec-error", str(exc)) from None
    return tree


def _ensure_parents(store: Store, tree: bytes, workdir: str, batch: Batch) -> bytes:
    # Parents of the work directory belong to root; the directory itself to
    # the build user, who must be able to create files in it.
    parts = [p for p in workdir.split("/") if p]
    for i in range(1, len(parts)):
        tree = ensure_dir(store, tree, "/".join(parts[:i]), ROOT_DIR, batch)
    return ensure_dir(store, tree, workdir, BUILD_DIR, batch)


def _add_source(
    store: Store, tree: bytes, source: Source, batch: Batch, *, uid: int, gid: int
) -> bytes:
    if source.path is None:
        raise AmberError("spec-error", f"source {source.url}: downloads are not supported yet")
    with filesystem_identity(uid, gid):
        try:
            st = os.stat(source.path)
            if stat.S_ISDIR(st.st_mode):
                ref = import_directory(store, source.path, batch=batch)
                entry = BUILD_DIR._replace(ref=ref, mtime_ns=st.st_mtime_ns)
            else:
                digest, size = store.put_blob_file(source.path, batch)
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                entry = Entry(
                    b"", treefmt.FILE, mode, BUILD_UID, BUILD_GID, st.st_mtime_ns, size, digest
                )
        except PermissionError:
            raise AmberError(
                "permission-denied", f"source {source.path}: permission denied"
            ) from None
        except FileNotFoundError:
            raise AmberError("spec-error", f"source {source.path} does not exist") from None
    parent = source.dest.rsplit("/", 1)[0] or "/"
    tree = _ensure_parents(store, tree, parent, batch) if parent != "/" else tree
    return put_entry(store, tree, source.dest, entry, batch, dir_template=BUILD_DIR)
