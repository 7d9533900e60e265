"""A batch: objects written to the store together and made durable together.

Crash safety: an object is written to the store's ``tmp/``, all of a
batch's temporary files are made durable with one ``syncfs``, and only then
renamed to their digest; a second ``syncfs`` makes the renames durable
before the caller records anything that refers to them. So a digest path
never holds partial content, and one batch costs two syncs however many
objects it writes (``commit_all``: however many batches; a pull commits
its layers together). Only ``Store`` (store.py) makes batches: ``Store.batch()``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .fileio import syncfs
from .fsidentity import as_store_owner

if TYPE_CHECKING:
    from .store import Store


class Batch:
    """Objects written together and made durable together (see module doc)."""

    def __init__(self, store: Store):
        self._store = store
        self._pending: list[tuple[str, str]] = []
        self.pending_trees: set[bytes] = set()  # readable through this store, not yet on disk
        self.pending_blobs: set[bytes] = set()  # written to temp files, not yet renamed
        # Blobs seen in the store by this batch: its lease keeps GC from taking
        # them, so a snapshot of 20,000 equal files asks the disk once, not 20,000 times.
        self._present: set[bytes] = set()
        self.written = 0  # objects this batch added to the store
        self.bytes_written = 0
        self._temp_prefix = os.path.join(store.tmp_dir, secrets.token_hex(12))
        self._temps = 0

    # The store is root's even while this thread reads a user's files as
    # that user (fsidentity.py): every write to it goes through as_store_owner.

    def new_temp(self) -> tuple[int, str]:
        # A random name per batch, counted per file: a pull makes thousands.
        self._temps += 1
        path = f"{self._temp_prefix}-{self._temps}"
        with as_store_owner():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        return fd, path

    def add(self, temp_path: str, final: str, size: int) -> None:
        self._pending.append((temp_path, final))
        self.written += 1
        self.bytes_written += size

    def has_blob(self, digest: bytes) -> bool:
        """In the store, or on its way there in this batch."""
        if digest in self.pending_blobs or digest in self._present:
            return True
        if self._store.has_blob(digest):
            self._present.add(digest)
            return True
        return False

    def adopt_blob(self, temp_path: str, digest: bytes, size: int, *, absent: bool = False) -> None:
        """Keep the temp file as blob ``digest``, unless the store or this batch has it.

        ``absent``: the caller's ``has_blob`` said no just before (one stat
        less a blob; should another writer store it meanwhile, the rename
        replaces it with the same bytes).
        """
        if not absent and self.has_blob(digest):
            self.discard(temp_path)
        else:
            self.add(temp_path, self._store.blob_file(digest), size)
            self.pending_blobs.add(digest)

    def discard(self, temp_path: str) -> None:
        with as_store_owner():
            os.unlink(temp_path)

    def commit(self) -> None:
        commit_all([self])

    def _committed(self) -> None:
        self._pending.clear()
        self.pending_trees.clear()
        self.pending_blobs.clear()

    def abort(self) -> None:
        self._store._forget(self.pending_trees)
        self.pending_trees.clear()
        self.pending_blobs.clear()
        with as_store_owner():
            for temp, _ in self._pending:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        self._pending.clear()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def commit_all(batches: Sequence[Batch]) -> None:
    """Commit ``batches`` (of one store) with one pair of syncfs for them all.

    A pull writes each layer in a batch of its own, so one that fails leaves
    nothing, and commits the layers that arrived together: two syncs a pull,
    not two a layer (each syncfs flushes the whole filesystem, other writers'
    data included).
    """
    batches = [b for b in batches if b._pending]
    if not batches:
        return
    for batch in batches:
        batch._store.check_lease()  # the renames are what a GC could race with
    with as_store_owner():
        fd = os.open(batches[0]._store.tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(fd)
            for batch in batches:
                for temp, final in batch._pending:
                    os.rename(temp, final)
            syncfs(fd)
        finally:
            os.close(fd)
    for batch in batches:
        batch._committed()
