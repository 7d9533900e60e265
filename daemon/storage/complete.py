"""The completeness record: trees whose whole closure is in the store.

A cache hit used to re-prove its trees' closures on every build, a walk
that grows with the base (13,000 entries for a root filesystem). Like Nix's
table of valid paths, the ``complete_trees`` table remembers a tree once it
is proved whole, and a hit checks the row (``sandbox/closure.py`` consults
it). A row means: every object of that tree's closure is in the store, or in
GC's quarantine from which the holder's hold brings it back.

**Rows are added** only by a ``ClosureCheck`` of a holder, for a tree it
holds: after a walk found the closure whole, or for a snapshot of a mount
opened on a tree that is itself recorded or proved (the snapshot is that
tree plus the upper layer: it wrote what changed and names the rest of that
tree by digest).

**Rows are deleted** before anything of their closure leaves the store:

- GC (``gc.py``), once marking has finished and before the sweep removes
  anything, deletes every row whose tree is not marked. The sweep and the
  purge remove only unmarked objects, and a marked tree's closure is marked,
  so a row that survives names a closure GC does not touch.
- A row added after that step, while the cycle still runs, is safe too. A
  walk's adder took its hold first, and a hold taken during a cycle marks
  its closure (bringing it back from quarantine) under ``Roots.lock``, so
  nothing of it goes; a hold taken before the cycle is one of its roots. A
  snapshot's objects, fresh or reused, are at worst quarantined (its writer
  is live), and come back when anyone holds the snapshot, and for good at
  the writer's next checkpoint, which holds it before any purge may run
  (``roots.py``).
- So the race of a GC against a hit about to trust a row is settled by the
  order of the hit: hold, then look the row up. A row present then names a
  closure that is in the store (or is brought back by that hold) and stays
  for as long as the hold lasts; a row GC deleted makes the hit walk, find
  what the cycle removed, and rerun the step saying why.
- fsck (``fsck.py``) re-proves every row after its scan, and deletes the
  rows it cannot prove (a missing object, or one it found corrupt); with
  ``--repair``, it first starts a new *epoch*, so that a walk that began
  before the repair removed an object cannot record its stale answer.

An object deleted behind amber's back is found by ``amber store fsck``,
which deletes the rows that named it (as ``nix-store --verify`` forgets a
path that disappeared); until then a hit trusts the row.
"""

from __future__ import annotations

import threading
from pathlib import Path

from amber.daemon.storage.db import Database


class CompleteTrees:
    """The daemon's ``CompletenessRecord`` (see ``sandbox/closure.py``).

    Called from the worker threads that check cache hits, so it has its own
    connection, used under a lock.
    """

    def __init__(self, db_path: Path):
        self._db = Database(db_path)
        self._lock = threading.Lock()

    def has(self, tree: bytes) -> bool:
        with self._lock:
            return self._db.tree_complete(tree.hex())

    def epoch(self) -> int:
        with self._lock:
            return self._db.complete_epoch()

    def add(self, tree: bytes, epoch: int) -> None:
        with self._lock:
            self._db.add_complete_tree(tree.hex(), epoch)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def forget_unmarked(db: Database, marked: set[bytes]) -> int:
    """GC, after marking: delete the rows of trees this cycle may remove from."""
    doomed = [tree for tree in db.complete_trees() if bytes.fromhex(tree) not in marked]
    if doomed:
        db.forget_complete_trees(doomed)
    return len(doomed)
