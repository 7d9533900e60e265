"""What is missing from a closure: the one answer, for every part that asks.

A tree's closure is the tree, its subtrees and every blob they name. The
executor (a cache hit's trees), roots (a shell's), GC (results to drop) and
fsck all ask ``ClosureCheck`` whether one is whole, and why not.

Proving a closure whole walks it: thousands of trees and stats on a root
filesystem base. A ``CompletenessRecord`` (the daemon's is
``daemon/storage/complete.py``) remembers trees proved whole across builds,
so a cache hit checks a row instead; the record's keeper invalidates a row
before anything of that closure leaves the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import TYPE_CHECKING, Protocol

from .store import CorruptObject, MissingObject

if TYPE_CHECKING:
    from .store import Store


class CompletenessRecord(Protocol):
    """Trees known to have their whole closure in the store (see module docstring)."""

    def has(self, tree: bytes) -> bool:
        """Whether ``tree`` is recorded whole."""
        ...

    def epoch(self) -> int:
        """A token read before a walk, handed back to ``add`` after it."""
        ...

    def add(self, tree: bytes, epoch: int) -> None:
        """Record ``tree`` whole (ignored if the record was invalidated since ``epoch``)."""
        ...


class ClosureCheck:
    """What is missing from closures.

    Remembers the trees and blobs it found complete, so many closures that
    share subtrees cost one walk; a caller relying on that must hold them
    (``roots.py``). With ``settled`` (nothing is written meanwhile: fsck) it
    remembers what is missing too. ``bad`` digests count as corrupt.

    With a ``record``, a tree asked about at the top (``tree``, ``missing``)
    is looked up there first, and recorded when a walk proves it whole; the
    caller must hold it before asking (``roots.py``, ``complete.py``).
    Subtrees met during a walk are only remembered here.
    """

    def __init__(
        self,
        store: Store,
        *,
        bad: Set[bytes] = frozenset(),
        settled: bool = False,
        record: CompletenessRecord | None = None,
    ):
        self.store = store
        self.bad = bad
        self._settled = settled
        self._record = record
        self._blobs: set[bytes] = set()
        self._trees: set[bytes] = set()  # proved whole (walked, or in the record)
        self._written: set[bytes] = set()  # taken as whole on a writer's word
        self._recorded: set[bytes] = set()  # in the record (looked up or added)
        self._missing: dict[bytes, str] = {}

    def known_complete(self, tree: bytes, *, over: bytes | None = None) -> None:
        """``tree`` is complete: this caller just wrote it and holds it.

        A snapshot writes only what changed and names the rest of ``over``
        (the tree its mount was opened on) by digest, so ``tree`` is proved whole,
        and recorded, only when ``over`` is; otherwise it is taken as whole
        for this check's life alone, as before there was a record.
        """
        record = self._record
        if record is None or over is None:
            self._written.add(tree)
            return
        epoch = record.epoch()
        if over in self._trees or record.has(over):
            self._trees.add(tree)
            self._recorded.add(tree)
            record.add(tree, epoch)
        else:
            self._written.add(tree)

    def blob(self, digest: bytes) -> str | None:
        """Why blob ``digest`` is not usable (None: it is)."""
        if digest in self._blobs:
            return None
        if digest in self.bad:
            return f"blob {digest.hex()[:12]} is corrupt"
        if not self.store.has_blob(digest):
            return f"blob {digest.hex()[:12]} is missing"
        self._blobs.add(digest)
        return None

    def tree(self, digest: bytes) -> str | None:
        """Why the closure of tree ``digest`` is not complete (None: it is)."""
        record = self._record
        if record is None or digest in self._written:
            return self._closure(digest)
        if digest in self._recorded:
            return None
        if record.has(digest):
            self._trees.add(digest)
            self._recorded.add(digest)
            return None
        epoch = record.epoch()  # before the walk: an fsck repair meanwhile voids it
        why = self._closure(digest)
        if why is None:
            record.add(digest, epoch)
            self._recorded.add(digest)
        return why

    def _closure(self, digest: bytes) -> str | None:
        """``tree`` without the record: subtrees of a walk are not recorded."""
        if digest in self._trees or digest in self._written:
            return None
        why = self._missing.get(digest)
        if why is not None:
            return why
        why = self._walk(digest)
        if why is None:
            self._trees.add(digest)
        elif self._settled:
            self._missing[digest] = why
        return why

    def _walk(self, digest: bytes) -> str | None:
        if digest in self.bad:
            return f"tree {digest.hex()[:12]} is corrupt"
        try:
            subtrees, blobs = self.store.tree_refs(digest, verify=True)
        except MissingObject:
            return f"tree {digest.hex()[:12]} is missing"
        except CorruptObject:
            return f"tree {digest.hex()[:12]} is corrupt"
        for blob in blobs:
            why = self.blob(blob)
            if why is not None:
                return why
        for sub in subtrees:
            why = self._closure(sub)
            if why is not None:
                return why
        return None

    def missing(self, trees: Iterable[bytes], blobs: Iterable[bytes] = ()) -> str | None:
        """What the first incomplete one of these lacks; None when all are complete."""
        for blob in blobs:
            why = self.blob(blob)
            if why is not None:
                return why
        for tree in trees:
            why = self.tree(tree)
            if why is not None:
                return why
        return None
