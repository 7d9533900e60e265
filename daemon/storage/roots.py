"""Temp roots and write leases: what GC must leave alone while work is live.

Live work protects store objects from garbage collection in two ways:

- A **hold** (temp root) names trees and blobs that a live build, shell or
  export uses; GC keeps their whole closure for as long as the hold lasts.
  Work takes a hold on what it is about to use *before* it checks that it is
  present (``Executor._missing``, the shell's completeness check), so a GC
  running at the same moment has either seen the hold or already removed
  the object, and then the check finds it missing: a cache miss and a
  rerun, never a false hit.
- A **writer** is a hold whose owner may also put objects into the store, or
  reuse objects already there, before it holds them. A build is a writer
  from start to end: its snapshots are written by a separate filesystem
  process and the daemon learns the tree only afterwards, and every write
  (snapshot, log, source) skips an object whose digest already exists, so a
  writer can come to rely on an object that GC has just found unreachable.

A GC cycle (``gc.py``) marks everything reachable from the database's roots
(pins, out-links, images, live and retained builds) and from every hold,
then sweeps the store shard by shard. The protocol between them:

1. Taking or growing a hold happens under ``Roots.lock``. While a cycle
   runs, it also marks the hold's closure in the cycle and puts back any of
   its objects the cycle has quarantined.
2. GC removes objects only under ``Roots.lock``, a chunk at a time, and
   only objects that are not marked and were not written since the cycle
   began.
3. While any writer is live, a chunk is **quarantined** (renamed into
   ``cas/quarantine/``) instead of deleted. Quarantined objects are deleted
   for good only when every writer that was live at the time has ended or
   taken a **checkpoint**: a hold on everything it relies on so far (a build
   takes one at every step boundary, before its cache check, and when it
   ends). A writer that starts after the chunk cannot come to rely on it:
   the object is no longer in the store for its existence checks to find
   (and the daemon's tree cache forgets removed trees).
4. A writer that has not taken its first checkpoint yet (a build resolving
   its base and laying out its sources) *reads* trees it found present
   moments before; while one is live, GC removes nothing at all, not even
   into quarantine, and waits for it to reach its first step boundary.

**Invariant**: an object leaves the store for good only when no hold reaches
it and no live writer can have come to rely on it without a hold. So GC
never takes what a pin, an existing out-link, a live build, a shell or an
export uses; at worst a cached result whose objects were collected before
anyone held them is a miss, and its step reruns.

Work that writes to the store outside a build (an image import, verify)
runs as a writer too, or it can lose an object it deduplicated against to a
concurrent GC. This is enforced, not a convention: ``Roots`` guards its
store (``Store.guard``), which then writes only through ``writer.store``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from amber.daemon.storage.db import Database
from amber.sandbox import tree as treefmt
from amber.sandbox.digest import EMPTY
from amber.sandbox.store import KINDS, Lease, Store, StoreError, digest_of_name

log = logging.getLogger("amber.roots")

__all__ = ["KINDS", "Cycle", "Hold", "Roots", "build_state"]


class Hold(Lease):
    """A temp root: trees and blobs GC keeps (with their closures) until released.

    A writer's hold is also the lease its writes show the store (``store``).
    ``add`` and ``checkpoint`` may walk trees and move files while a GC cycle
    runs: call them from a worker thread, never from the trio thread.
    """

    def __init__(self, roots: Roots, label: str, *, writer: bool, build_id: str | None):
        self._roots = roots
        self.label = label
        self.writer = writer
        self.build_id = build_id
        self.trees: set[bytes] = set()
        self.blobs: set[bytes] = set()
        self.checkpoint_seq = 0
        self.released = False
        self.lease_issuer = roots if writer else None

    def lease_live(self) -> bool:
        return self.writer and not self.released

    @property
    def store(self) -> Store:
        """The store, writing under this writer's lease (a reader's refuses writes)."""
        return self._roots.store.leased(self)

    def add(self, trees: Iterable[bytes] = (), blobs: Iterable[bytes] = ()) -> None:
        """Hold these too (blocking)."""
        self._roots._add(self, set(trees), set(blobs), checkpoint=False)

    def checkpoint(self, trees: Iterable[bytes] = (), blobs: Iterable[bytes] = ()) -> None:
        """Hold these, and declare that they are everything this writer relies on so far."""
        self._roots._add(self, set(trees), set(blobs), checkpoint=True)

    def complete(self, trees: Iterable[bytes] = (), blobs: Iterable[bytes] = ()) -> bool:
        """Hold these, then tell whether everything they need is in the store (blocking)."""
        trees, blobs = set(trees), set(blobs)
        self.add(trees, blobs)
        return self._roots.complete(trees, blobs)

    def complete_one(self, tree: bytes) -> bool:
        """``complete`` for one tree (what a pulled base's record is checked with)."""
        return self.complete([tree])

    def release(self) -> None:
        self._roots._release(self)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Hold {self.label}: {len(self.trees)} trees, {len(self.blobs)} blobs>"


@dataclass
class Cycle:
    """What a running GC shares with holds (guarded by ``Roots.lock``)."""

    started_ns: int = field(default_factory=time.time_ns)
    trees: set[bytes] = field(default_factory=set)  # marked: kept with their closures
    blobs: set[bytes] = field(default_factory=set)
    #: writer -> the sequence number when a chunk was last quarantined under it
    blockers: dict[Hold, int] = field(default_factory=dict)
    quarantined: int = 0  # objects in quarantine now


class Roots:
    """Every hold of this daemon, and the running GC cycle if any.

    ``lock`` orders holds against GC removals (see the module docstring);
    it is held for short stretches only (one chunk of removals, one slice of
    marking, one hold's walk), and only from worker threads when it may wait.
    """

    def __init__(self, store: Store):
        self.store = store
        store.guard(self)  # from now on it writes only under our writers' leases
        self.lock = threading.Lock()
        self._registry = threading.Lock()  # guards the two dicts below; taken after ``lock``
        self._holds: dict[int, Hold] = {}
        self._by_build: dict[str, Hold] = {}
        self._seq = 0
        self.cycle: Cycle | None = None

    # -- taking and releasing holds ------------------------------------------

    def hold(self, label: str) -> Hold:
        """A temp root for a shell, an export, a pin being added..."""
        return self._open(Hold(self, label, writer=False, build_id=None))

    def writer(self, label: str, *, build_id: str | None = None) -> Hold:
        """A temp root for work that also writes to the store (a build)."""
        return self._open(Hold(self, label, writer=True, build_id=build_id))

    def of_build(self, build_id: str) -> Hold | None:
        """The writer hold of a live build."""
        return self._by_build.get(build_id)

    def _open(self, hold: Hold) -> Hold:
        # A new writer must be seen by the next chunk GC removes (it decides
        # between quarantine and deletion by whether writers are live), so
        # it registers under the main lock; other holds are empty at first
        # and only need the registry's.
        with self.lock if hold.writer else contextlib.nullcontext(), self._registry:
            self._holds[id(hold)] = hold
            if hold.build_id is not None:
                self._by_build[hold.build_id] = hold
        return hold

    def _release(self, hold: Hold) -> None:
        with self._registry:
            hold.released = True
            self._holds.pop(id(hold), None)
            if hold.build_id is not None and self._by_build.get(hold.build_id) is hold:
                del self._by_build[hold.build_id]

    def _add(self, hold: Hold, trees: set[bytes], blobs: set[bytes], *, checkpoint: bool) -> None:
        with self.lock:
            hold.trees |= trees
            hold.blobs |= blobs
            if self.cycle is not None:
                self._mark_locked(list(trees), blobs, budget=None)
            if checkpoint:
                self._seq += 1
                hold.checkpoint_seq = self._seq

    def holds(self) -> list[Hold]:
        with self._registry:
            return list(self._holds.values())

    # -- presence ---------------------------------------------------------------

    def complete(self, trees: Iterable[bytes], blobs: Iterable[bytes] = ()) -> bool:
        """True when every tree and blob needed by these is in the store."""
        return self.store.closure_check().missing(trees, blobs) is None

    # -- what a GC cycle calls ------------------------------------------------

    def begin_cycle(self) -> tuple[Cycle, set[bytes], set[bytes]]:
        """Start a cycle; returns it with the trees and blobs every hold has now."""
        with self.lock:
            if self.cycle is not None:
                raise RuntimeError("a GC cycle is already running")
            self.cycle = Cycle()
            self.cycle.trees.add(treefmt.EMPTY_TREE)
            self.cycle.blobs.add(EMPTY)
            trees: set[bytes] = set()
            blobs: set[bytes] = set()
            for hold in self.holds():
                trees |= hold.trees
                blobs |= hold.blobs
            return self.cycle, trees, blobs

    def mark(self, trees: Iterable[bytes], blobs: Iterable[bytes] = (), slice_: int = 256) -> None:
        """Mark closures in the running cycle, releasing the lock every ``slice_`` trees."""
        stack = list(trees)
        blob_set = set(blobs)
        while True:
            with self.lock:
                assert self.cycle is not None
                self._mark_locked(stack, blob_set, budget=slice_)
            blob_set = set()
            if not stack:
                return

    def _mark_locked(self, stack: list[bytes], blobs: set[bytes], *, budget: int | None) -> None:
        """Mark (and bring back from quarantine) closures; consumes ``stack``.

        With a budget, stops after that many trees, leaving the rest in
        ``stack``. A tree already marked is skipped with its subtree: outside
        the cycle's own marking (which finishes before anything is removed)
        a marked tree's closure is marked too.
        """
        cycle = self.cycle
        assert cycle is not None
        marked_trees, marked_blobs = cycle.trees, cycle.blobs
        restore = cycle.quarantined > 0
        for blob in blobs:
            if blob not in marked_blobs:
                marked_blobs.add(blob)
                if restore:
                    self.restore("blobs", blob)
        walked = 0
        while stack:
            if budget is not None and walked >= budget:
                return
            digest = stack.pop()
            if digest in marked_trees:
                continue
            marked_trees.add(digest)
            walked += 1
            if restore:
                self.restore("trees", digest)
            try:
                # No hash check: a corrupt tree can only make GC keep more.
                subtrees, files = self.store.tree_refs(digest)
            except StoreError:
                continue  # missing or corrupt: whoever checks presence will say so
            for sub in subtrees:
                if sub not in marked_trees:
                    stack.append(sub)
            for blob in files:
                if blob not in marked_blobs:
                    marked_blobs.add(blob)
                    if restore:
                        self.restore("blobs", blob)

    def writers_locked(self) -> list[Hold]:
        """Live writers (call with ``lock`` held, so none can start meanwhile)."""
        return [h for h in self.holds() if h.writer]

    def note_quarantine_locked(self, writers: list[Hold]) -> None:
        """A chunk is about to be quarantined while these writers are live."""
        assert self.cycle is not None
        for hold in writers:
            self.cycle.blockers[hold] = self._seq

    def waiting_for(self) -> list[str]:
        """Writers that must still end or checkpoint before the quarantine may go."""
        with self.lock:
            if self.cycle is None:
                return []
            return [
                hold.label
                for hold, seq in self.cycle.blockers.items()
                if not hold.released and hold.checkpoint_seq <= seq
            ]

    def end_cycle(self) -> None:
        """Finish the cycle; anything still quarantined goes back into the store."""
        with self.lock:
            self.restore_all_locked()
            self.cycle = None

    # -- quarantine -------------------------------------------------------------

    def quarantine_path(self, kind: str, digest: bytes) -> Path:
        return self.store.quarantine_path(kind, digest)

    def store_path(self, kind: str, digest: bytes) -> Path:
        return self.store.object_path(kind, digest)

    def restore(self, kind: str, digest: bytes) -> bool:
        """Put a quarantined object back (no-op when it is not quarantined)."""
        source = self.quarantine_path(kind, digest)
        try:
            os.link(source, self.store_path(kind, digest))
        except FileNotFoundError:
            return False  # not quarantined (the usual case)
        except FileExistsError:
            pass  # written again meanwhile: same digest, same content
        os.unlink(source)
        if self.cycle is not None:
            self.cycle.quarantined -= 1
        return True

    def restore_all_locked(self) -> int:
        """Every quarantined object back into the store."""
        restored = 0
        for kind in KINDS:
            for _name, shard in self.store.shards(kind, quarantined=True):
                for obj in os.scandir(shard):
                    digest = digest_of_name(obj.name)
                    if digest is None:
                        os.unlink(obj.path)
                        continue
                    if self.restore(kind, digest):
                        restored += 1
        if self.cycle is not None:
            self.cycle.quarantined = 0
        return restored

    def recover(self) -> int:
        """At start-up: put back what a GC left in quarantine when the daemon stopped.

        No writer of the previous daemon is alive, but some finished ones may
        still need these objects; restoring is always safe and the next GC
        decides again.
        """
        with self.lock:
            restored = self.restore_all_locked()
        if restored:
            log.info("restored %d objects left in quarantine by an interrupted gc", restored)
        return restored


def build_state(db: Database, build_id: str) -> tuple[set[bytes], set[bytes]]:
    """Every tree and log a build has recorded so far (call from the trio thread)."""
    trees: set[bytes] = set()
    blobs: set[bytes] = set()
    record = db.get_build(build_id)
    if record is not None:
        for value in (record.base_tree, record.final_tree):
            if value:
                trees.add(bytes.fromhex(value))
    for _bid, _key, before, after, log_digest in db.step_refs([build_id]):
        for value in (before, after):
            if value:
                trees.add(bytes.fromhex(value))
        if log_digest:
            blobs.add(bytes.fromhex(log_digest))
    return trees, blobs
