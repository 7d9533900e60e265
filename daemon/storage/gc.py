"""Garbage collection: mark from the roots, sweep the rest, while builds run.

A cycle, one at a time (``Collector.lock``; ``fsck`` takes it too):

1. **Mark** (worker thread). Roots are the holds of live work (``roots.py``)
   and, from the database: pins, out-links whose path is still the checkout
   amber made (the others are dropped), named images, builds queued or
   running, and the retention policy: frozen failures younger than
   ``keep-failed-days`` and the newest ``keep-failed-per-spec`` of each spec
   name. Everything reachable from them is marked; holds taken during the
   cycle mark themselves. The logs of every build record that stays are
   kept too (not its states), so ``amber log`` works for every build
   ``amber builds`` lists. Then, before anything is removed, the
   completeness rows of unmarked trees are deleted (``complete.py``).
2. **Sweep** (worker thread), one store shard at a time, in chunks under
   ``Roots.lock``: unmarked objects older than the cycle are deleted, or
   quarantined while builds are live, and nothing is removed while a build
   is laying out its first state (see ``roots.py`` for why, and for the
   invariant). ``--max-freed`` stops the sweep once enough is freed.
   Unlinking runs on ``REMOVERS`` threads: on a disk that discards freed
   blocks, each unlink waits on the device.
3. **Purge**: once every build that was live during a quarantined chunk has
   passed a step boundary or ended, quarantined objects nobody held since
   are deleted; the others went back when they were held. A cycle waits
   ``QUARANTINE_WAIT`` at most, then gives the quarantine back: the next
   cycle collects it.
4. **Trim the database**: results whose objects are gone (not those a
   remote cache holds, found within ``keep-failed-days``: they stay lazy
   hits, ``remote/lazy.py``; an older one is found again by a lookup), and
   build records (with their logs) older than ``keep-failed-days`` that
   nothing keeps.

The trio thread only waits: the daemon keeps serving while a cycle runs.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from amber.daemon.storage.complete import forget_unmarked
from amber.daemon.storage.db import Database
from amber.daemon.storage.fsck import check_store
from amber.daemon.storage.pins import out_link_alive
from amber.daemon.storage.roots import Cycle, Roots
from amber.sandbox.store import KINDS, Store, digest_of_name

if TYPE_CHECKING:
    from amber.daemon.context import DaemonContext

log = logging.getLogger("amber.gc")

CHUNK = 512  # objects removed per acquisition of Roots.lock
REMOVERS = 32  # threads unlinking at once: freeing blocks waits on the disk, not the CPU
QUARANTINE_WAIT = 600.0  # seconds a cycle waits for live builds to reach a step boundary
AUTO_INTERVAL = 10.0  # seconds between free-space checks
AUTO_RETRY = 300.0  # seconds before an automatic GC that fell short tries again anyway

Progress = Callable[[str], Awaitable[None]]


@dataclass
class GcOptions:
    max_freed: int | None = None
    keep_failed_days: float = 14.0
    keep_failed_per_spec: int = 5
    dry_run: bool = False


@dataclass
class GcReport:
    objects: int = 0  # removed (or, dry run, that would be)
    freed_bytes: int = 0
    trees: int = 0
    blobs: int = 0
    kept_objects: int = 0  # marked live
    results: int = 0  # result records dropped
    builds: int = 0  # build records dropped
    out_links: int = 0  # out-links dropped (their path is gone or was replaced)
    quarantined: int = 0  # objects that waited for live builds (and went, or came back)
    waited_for: list[str] = field(default_factory=list)
    complete: bool = True  # False when --max-freed stopped the sweep, or a build kept it waiting
    dry_run: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class DatabaseRoots:
    trees: set[bytes] = field(default_factory=set)
    blobs: set[bytes] = field(default_factory=set)
    results: set[str] = field(default_factory=set)  # result keys whose records stay
    builds: set[str] = field(default_factory=set)  # build records that stay
    old_builds: list[str] = field(default_factory=list)  # build records to drop
    dropped_out_links: list[str] = field(default_factory=list)
    max_rowid: int = 0
    #: Results a remote holds, found within keep-failed-days: lazy hits, whatever is gone here.
    remote: set[str] = field(default_factory=set)

    def tree(self, *values: str | None) -> None:
        """Keep these trees (hex digests; empty and None are skipped)."""
        self.trees.update(bytes.fromhex(v) for v in values if v)

    def blob(self, *values: str | None) -> None:
        self.blobs.update(bytes.fromhex(v) for v in values if v)


class Collector:
    """Runs GC cycles and fsck for one daemon, one at a time."""

    def __init__(self, ctx: DaemonContext):
        self.ctx = ctx
        self.lock = trio.Lock()

    async def collect(self, options: GcOptions, progress: Progress | None = None) -> GcReport:
        """One cycle. Cancellation puts everything quarantined back."""
        async with self.lock:
            return await collect(self.ctx.store, self.ctx.roots, self.ctx.db.path, options,
                                 progress=progress, record=self.ctx.db)  # fmt: skip

    async def fsck(self, repair: bool) -> dict[str, Any]:
        """``amber store fsck``: no GC cycle runs meanwhile (nothing is in quarantine)."""
        async with self.lock:
            return await trio.to_thread.run_sync(
                check_store, self.ctx.store, self.ctx.db.path, repair
            )


async def collect(
    store: Store,
    roots: Roots,
    db_path: Path,
    options: GcOptions,
    *,
    progress: Progress | None = None,
    record: Database | None = None,
) -> GcReport:
    """Run one GC cycle over ``store`` (see the module docstring).

    Blocking work runs in worker threads with their own database connection.
    ``record``, when given, gets ``last_gc`` in its meta table.
    """
    started = time.monotonic()
    report = GcReport(dry_run=options.dry_run)
    say = progress or _quiet
    cycle, held_trees, held_blobs = roots.begin_cycle()
    try:
        db_roots = await trio.to_thread.run_sync(_database_roots, db_path, options)
        report.out_links = len(db_roots.dropped_out_links)
        await trio.to_thread.run_sync(
            _mark, roots, held_trees | db_roots.trees, held_blobs | db_roots.blobs
        )
        report.kept_objects = len(cycle.trees) + len(cycle.blobs)
        if not options.dry_run:
            # Before anything is removed: see complete.py for why this is enough.
            await trio.to_thread.run_sync(_forget_complete, db_path, cycle)
        await say(f"gc: {report.kept_objects} objects are live; sweeping the rest")
        report.complete = await trio.to_thread.run_sync(
            _sweep, store, roots, cycle, options, report
        )
        if cycle.quarantined and await _quarantine_released(roots, report, say):
            await trio.to_thread.run_sync(_purge, roots, cycle, report)
        if not options.dry_run:
            dropped = await trio.to_thread.run_sync(
                _trim_database, store, db_path, cycle, db_roots, report.complete
            )
            report.results, report.builds = dropped
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(roots.end_cycle)
    report.seconds = time.monotonic() - started
    if record is not None and not options.dry_run:
        record.set_meta("last_gc", repr(time.time()))
    log.info(
        "gc%s: %d objects (%d bytes) %s, %d kept, %d results and %d builds dropped, %.2f s",
        " (dry run)" if options.dry_run else "", report.objects, report.freed_bytes,
        "would go" if options.dry_run else "freed", report.kept_objects, report.results,
        report.builds, report.seconds,
    )  # fmt: skip
    return report


async def _quarantine_released(roots: Roots, report: GcReport, say: Progress) -> bool:
    """Wait for the writers a quarantined chunk blocks; False when they took too long."""
    waiting = await trio.to_thread.run_sync(roots.waiting_for)
    if waiting:
        report.waited_for = waiting
        await say(f"gc: waiting for {', '.join(waiting)} to reach a step boundary")
    with trio.move_on_after(QUARANTINE_WAIT):
        while waiting:
            await trio.sleep(0.1)
            waiting = await trio.to_thread.run_sync(roots.waiting_for)
    if waiting:
        # A step that runs for hours: give the quarantine back (end_cycle in
        # collect); the next cycle collects it.
        report.complete = False
        await say(f"gc: gave up waiting for {', '.join(waiting)}; the next gc frees the rest")
        return False
    return True


async def _quiet(_message: str) -> None:
    return None


# -- mark ------------------------------------------------------------------------------


def _database_roots(db_path: Path, options: GcOptions) -> DatabaseRoots:
    """What the database keeps alive (own connection: runs in a worker thread)."""
    db = Database(db_path)
    try:
        return database_roots(db, options, time.time())
    finally:
        db.close()


def database_roots(db: Database, options: GcOptions, now: float) -> DatabaseRoots:
    out = DatabaseRoots(max_rowid=db.results_rowid_max())
    out.remote = db.remote_keys(found_since=now - options.keep_failed_days * 86400)
    for pin in db.list_pins():
        pinned = pin.roots_dict()
        out.tree(*pinned.get("trees", ()))
        out.blob(*pinned.get("blobs", ()))
        out.results.update(pinned.get("results", ()))
        out.builds.update(pinned.get("builds", ()))
    for link in db.list_out_links():
        if out_link_alive(link):
            out.tree(link.tree)
        else:
            if not options.dry_run:
                db.delete_out_link(link.path)
            out.dropped_out_links.append(link.path)
    for image in db.list_images():
        out.tree(image["tree"])
    _build_roots(db, out, options, now)
    for result in db.results_by_keys(sorted(out.results)):
        out.tree(result.before_tree, result.after_tree)
        out.blob(result.log)
    return out


def _build_roots(db: Database, out: DatabaseRoots, options: GcOptions, now: float) -> None:
    """What build records keep: live and retained builds' states, every kept record's logs."""
    builds = db.all_builds()  # newest first
    cutoff = now - options.keep_failed_days * 86400
    per_spec: dict[str, int] = {}
    keep: list[str] = []
    for b in builds:
        if b.status in ("queued", "running"):
            keep.append(b.id)
            continue
        if b.frozen and b.status == "failed":
            rank = per_spec.get(b.name, 0)
            per_spec[b.name] = rank + 1
            if b.created >= cutoff or rank < options.keep_failed_per_spec:
                keep.append(b.id)
                continue
        if b.id not in out.builds and (b.finished or b.created) < cutoff:
            out.old_builds.append(b.id)
    # Pins hold what they resolved to (already in ``out``); live and
    # retained builds hold everything their records name; every build
    # record that stays keeps its logs, so `amber log` works for all of
    # `amber builds`.
    out.builds.update(keep)
    out.old_builds = [b for b in out.old_builds if b not in out.builds]
    kept, old = set(keep), set(out.old_builds)
    for b in builds:
        if b.id in kept:
            out.tree(b.base_tree, b.final_tree)
    for bid, key, before, after, log_digest in db.step_refs([b.id for b in builds]):
        if bid in old:
            continue
        out.blob(log_digest)
        if bid in kept:
            out.tree(before, after)
            if key and (before or after):
                out.results.add(key)


def _mark(roots: Roots, trees: set[bytes], blobs: set[bytes]) -> None:
    roots.mark(trees, blobs)


def _forget_complete(db_path: Path, cycle: Cycle) -> None:
    """Delete completeness rows of unmarked trees (own connection: a worker thread)."""
    db = Database(db_path)
    try:
        forget_unmarked(db, cycle.trees)
    finally:
        db.close()


# -- sweep and purge ---------------------------------------------------------------------


def _sweep(store: Store, roots: Roots, cycle: Cycle, options: GcOptions, report: GcReport) -> bool:
    """Remove (or quarantine) unmarked objects; False when ``max_freed`` stopped it."""
    with ThreadPoolExecutor(REMOVERS, thread_name_prefix="amber-gc") as pool:
        for kind in KINDS:
            marked = cycle.trees if kind == "trees" else cycle.blobs
            for shard, path in store.shards(kind):
                shard_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    # Marks only grow: what is marked now stays marked; the
                    # rest is checked again under the lock.
                    candidates = [
                        n for n in os.listdir(shard_fd) if digest_of_name(n) not in marked
                    ]
                    for i in range(0, len(candidates), CHUNK):
                        chunk = candidates[i : i + CHUNK]
                        deadline = time.monotonic() + QUARANTINE_WAIT
                        while not _sweep_chunk(pool, store, roots, cycle, kind, shard, shard_fd,
                                               chunk, options.dry_run, report):  # fmt: skip
                            if time.monotonic() > deadline:
                                return False  # builds kept starting: the next cycle goes on
                            time.sleep(0.05)
                        if (
                            options.max_freed is not None
                            and report.freed_bytes >= options.max_freed
                        ):
                            return False
                finally:
                    os.close(shard_fd)
    return True


def _sweep_chunk(
    pool: ThreadPoolExecutor,
    store: Store,
    roots: Roots,
    cycle: Cycle,
    kind: str,
    shard: str,
    shard_fd: int,
    names: list[str],
    dry_run: bool,
    report: GcReport,
) -> bool:
    """Remove one chunk; False (and nothing done) while a build is starting.

    A build between its start and its first checkpoint (resolving its base,
    laying out its sources) reads trees it found present moments before;
    taking any of them away now, even into quarantine, would fail it.
    """
    marked = cycle.trees if kind == "trees" else cycle.blobs
    quarantine_fd: int | None = None
    with roots.lock:
        writers = [] if dry_run else roots.writers_locked()
        if any(w.checkpoint_seq == 0 for w in writers):
            return False
        try:
            if writers:
                roots.note_quarantine_locked(writers)
                qdir = store.quarantine_shard(kind, shard)
                quarantine_fd = os.open(qdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            doomed = [(n, d) for n, d in ((n, digest_of_name(n)) for n in names)
                      if d is not None and d not in marked]  # fmt: skip
            remove = functools.partial(_remove, shard_fd, quarantine_fd, cycle.started_ns, dry_run)
            # Removal (unlink frees blocks: slow on some disks) runs in
            # parallel, and is over before the lock is released.
            spread = map if dry_run else pool.map  # a stat alone is not worth a thread
            sizes = spread(remove, [n for n, _ in doomed])
            for (_name, digest), size in zip(doomed, sizes, strict=True):
                if size is None:
                    continue
                if quarantine_fd is not None:
                    cycle.quarantined += 1
                    report.quarantined += 1
                else:
                    _count(report, kind, size)
                if kind == "trees" and not dry_run:
                    store.forget_tree(digest)
        finally:
            if quarantine_fd is not None:
                os.close(quarantine_fd)
    return True


def _remove(
    dir_fd: int, quarantine_fd: int | None, started_ns: int, dry_run: bool, name: str
) -> int | None:
    """Unlink (or quarantine) one object; its size, or None when it stays."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if st.st_mtime_ns >= started_ns:
            return None  # written since the cycle began: the next cycle decides
        if dry_run:
            pass
        elif quarantine_fd is not None:
            os.rename(name, name, src_dir_fd=dir_fd, dst_dir_fd=quarantine_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    return st.st_blocks * 512


def _count(report: GcReport, kind: str, size: int) -> None:
    report.objects += 1
    report.freed_bytes += size
    if kind == "trees":
        report.trees += 1
    else:
        report.blobs += 1


def _purge(roots: Roots, cycle: Cycle, report: GcReport) -> None:
    """Delete what is still quarantined and unmarked (every blocking writer has moved on)."""
    with ThreadPoolExecutor(REMOVERS, thread_name_prefix="amber-gc") as pool:
        for kind in KINDS:
            marked = cycle.trees if kind == "trees" else cycle.blobs
            for _shard, path in roots.store.shards(kind, quarantined=True):
                shard_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    names = os.listdir(shard_fd)
                    for i in range(0, len(names), CHUNK):
                        with roots.lock:
                            doomed = []
                            for name in names[i : i + CHUNK]:
                                digest = digest_of_name(name)
                                if digest is not None and digest in marked:
                                    roots.restore(kind, digest)  # held since: back it goes
                                else:
                                    doomed.append(name)
                            remove = functools.partial(
                                _remove, shard_fd, None, time.time_ns(), False
                            )
                            for size in pool.map(remove, doomed):
                                if size is not None:
                                    cycle.quarantined -= 1
                                    _count(report, kind, size)
                finally:
                    os.close(shard_fd)


# -- the database ------------------------------------------------------------------------


def _trim_database(
    store: Store, db_path: Path, cycle: Cycle, db_roots: DatabaseRoots, complete: bool
) -> tuple[int, int]:
    """Drop results whose objects are gone, old build records and downloads
    whose content is gone; returns the counts of the first two."""
    db = Database(db_path)
    check = store.closure_check()
    try:
        # A result a remote cache holds stays a (lazy) hit whatever this cycle took
        # of its closure (remote/lazy.py); the packs pulls applied may be gone now.
        db.forget_applied_packs()
        doomed: list[str] = []
        for rowid, key, before, after, log_digest in db.result_refs():
            if rowid > db_roots.max_rowid or key in db_roots.results or key in db_roots.remote:
                continue
            trees = (bytes.fromhex(before), bytes.fromhex(after))
            blob = bytes.fromhex(log_digest)
            if complete:
                alive = all(t in cycle.trees for t in trees) and blob in cycle.blobs
            else:
                # The sweep stopped early: ask the store what is still there.
                alive = check.missing(trees, [blob]) is None
            if not alive:
                doomed.append(key)
        results = db.delete_results(doomed, max_rowid=db_roots.max_rowid) if doomed else 0
        if db_roots.old_builds:
            db.delete_builds(db_roots.old_builds)
        gone = [b for b in db.download_blobs() if not store.has_blob(bytes.fromhex(b))]
        if gone:
            db.delete_downloads(gone)
        return results, len(db_roots.old_builds)
    finally:
        db.close()


# -- automatic collection -------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def serve_auto_gc(ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Collect when free space drops below ``min-free``, until ``max-free`` is free.

    Free space is checked every ``AUTO_INTERVAL`` seconds. When a cycle could
    not free enough, the next one waits for new garbage (a build started
    since) or ``AUTO_RETRY`` seconds, rather than marking the whole store
    again and again for nothing. Never returns unless ``min-free`` is 0.
    """
    task_status.started()
    config = ctx.config
    if config.min_free <= 0:
        return
    last_try: tuple[float, int] | None = None  # (when, next build seq) of a cycle that fell short
    while True:
        free = await trio.to_thread.run_sync(free_bytes, ctx.store.root)
        seq = ctx.db.next_seq()
        stale = (
            last_try is None or seq != last_try[1] or time.monotonic() - last_try[0] > AUTO_RETRY
        )
        if free < config.min_free and stale:
            target = max(config.max_free, config.min_free)
            log.info("free space %d below min-free %d: collecting up to %d", free,
                     config.min_free, target)  # fmt: skip
            options = GcOptions(
                max_freed=target - free,
                keep_failed_days=config.keep_failed_days,
                keep_failed_per_spec=config.keep_failed_per_spec,
            )
            try:
                report = await ctx.gc.collect(options)
            except Exception:
                log.exception("automatic gc failed")
                report = None
            short = report is None or report.freed_bytes < target - free
            last_try = (time.monotonic(), seq) if short else None
        await trio.sleep(AUTO_INTERVAL)
