"""Benchmark: garbage collection of a store of a million objects vs a plain walk of it.

Usage::

    /work/venv/bin/python scripts/bench/gc.py [--objects N] [--pinned FRACTION] [--keep]

What it builds. A fresh store (``Store.open``) is filled through the store
API, in batches, with results shaped like build states: each result is a
root tree of 10 directories of 9 files (101 objects, every file content
unique), until ``--objects`` (default 1,000,000) objects are written. A
``--pinned`` fraction of the results (default 1/3), spread evenly, is
pinned in the database (pins of 100 roots each); the rest is garbage.

What it measures, with warm caches (everything is walked once before):

* **walk**: ``os.walk`` over ``cas/`` counting files, the least any GC that
  lists the store must do; ``find cas -type f | wc -l`` is shown beside it;
* **gc --dry-run**: marking, listing and ``stat``-ing what would go;
* **gc**: one ``amber.daemon.storage.gc.collect`` cycle, the code ``amber gc`` runs:
  mark from the pins (reading every live tree), list every shard, ``stat``
  and unlink every unmarked object, under the same locks as in the daemon
  (no build is live, so nothing waits in quarantine);
* **gc again**: a second cycle with nothing left to free (mark + listing);
* **plain unlink**: the blobs left (the pinned ones) unlinked with as many
  threads as GC uses, no GC at all: what deleting costs on this disk, to
  compare with GC's time per object it freed.

The last line is ``RESULT gc_ratio <gc seconds / walk seconds>`` (the
median of three walks; refused when they spread by more than 25 %). The work
directory (under /var/tmp) is removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trio
from common import Session

from amber.daemon.storage.db import Database
from amber.daemon.storage.gc import REMOVERS, GcOptions, collect
from amber.daemon.storage.pins import PinRoots, new_pin
from amber.daemon.storage.roots import Roots
from amber.sandbox import tree as treefmt
from amber.sandbox.store import Store
from amber.sandbox.tree import Entry

DIRS, FILES = 10, 9
PER_RESULT = 1 + DIRS + DIRS * FILES


def fill(store: Store, objects: int) -> list[bytes]:
    """Write results until ``objects`` objects exist; returns their root trees.

    Eight writers at once, each with its own ``Store`` (the tree cache is
    per instance) and batches of 200 results (about 20,000 objects, two
    ``syncfs``): small files cost the disk more than the CPU here.
    """
    results = objects // PER_RESULT
    started = time.monotonic()
    ranges = [range(i, min(results, i + 200)) for i in range(0, results, 200)]
    written = 0

    def write(numbers: range) -> list[bytes]:
        mine = Store(store.state_dir)
        roots = []
        with mine.batch() as batch:
            for r in numbers:
                dirs = []
                for d in range(DIRS):
                    files = []
                    for f in range(FILES):
                        data = f"result {r} dir {d} file {f}\n".encode()
                        digest = mine.put_blob_bytes(data, batch)
                        files.append(
                            Entry(f"f{f}".encode(), treefmt.FILE, 0o644, 0, 0, 0, len(data), digest)
                        )
                    sub = mine.put_tree(files, batch)
                    dirs.append(Entry(f"d{d}".encode(), treefmt.DIR, 0o755, 0, 0, 0, 0, sub))
                roots.append(mine.put_tree(dirs, batch))
        return roots

    roots: list[bytes] = []
    with ThreadPoolExecutor(8) as pool:
        for done in pool.map(write, ranges):
            roots += done
            written += len(done) * PER_RESULT
            if written % (50 * 200 * PER_RESULT) < 200 * PER_RESULT:
                rate = written / (time.monotonic() - started)
                print(f"  {written:>9,} objects written ({rate:,.0f}/s)", file=sys.stderr)
    return roots


def pin(db: Database, roots: list[bytes], fraction: float) -> int:
    step = max(1, round(1 / fraction)) if fraction > 0 else 0
    chosen = roots[::step] if step else []
    for i in range(0, len(chosen), 100):
        held = PinRoots(trees={r.hex() for r in chosen[i : i + 100]})
        db.put_pin(new_pin(f"bench/{i // 100}", "tree", f"{len(held.trees)} trees", 0, held))
    return len(chosen)


def walk(root: Path) -> tuple[float, int]:
    started = time.monotonic()
    count = sum(len(files) for _dir, _subdirs, files in os.walk(root))
    return time.monotonic() - started, count


def find(root: Path) -> float:
    started = time.monotonic()
    subprocess.run(f"find {root} -type f | wc -l", shell=True, check=True, capture_output=True)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--pinned", type=float, default=1 / 3, help="fraction of results pinned")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="amber-bench-gc-", dir="/var/tmp"))
    session = Session("gc.py").begin()
    try:
        store = Store.open(work / "state")
        db = Database(work / "state" / "amber.db")
        print(f"filling a store with {args.objects:,} objects in {work}", file=sys.stderr)
        started = time.monotonic()
        results = fill(store, args.objects)
        print(f"  written in {time.monotonic() - started:.1f} s", file=sys.stderr)
        pinned = pin(db, results, args.pinned)
        walk(store.root)  # warm the caches, as a GC on a busy host finds them
        walks = [walk(store.root) for _ in range(3)]  # three: the baseline's spread
        walk_s, files = statistics.median(w for w, _ in walks), walks[0][1]
        find_s = find(store.root)
        roots = Roots(store)

        async def run_gc(dry_run: bool = False):
            return await collect(store, roots, db.path, GcOptions(dry_run=dry_run))

        dry_started = time.monotonic()
        dry = trio.run(run_gc, True)
        dry_s = time.monotonic() - dry_started
        gc_started = time.monotonic()
        report = trio.run(run_gc)
        gc_s = time.monotonic() - gc_started
        again_started = time.monotonic()
        again = trio.run(run_gc)
        again_s = time.monotonic() - again_started
        db.close()

        # What deleting alone costs on this disk: unlink what is left (the
        # pinned third), with as many threads as GC uses.
        left = [os.path.join(d, f) for d, _s, fs in os.walk(store.root / "blobs") for f in fs]
        floor_started = time.monotonic()
        with ThreadPoolExecutor(REMOVERS) as pool:
            list(pool.map(os.unlink, left, chunksize=256))
        floor_s = time.monotonic() - floor_started
        per_gc = gc_s / max(1, report.objects) * 1e6
        per_unlink = floor_s / max(1, len(left)) * 1e6

        ratio = gc_s / walk_s
        print(
            f"objects in the store       {files:>12,}  ({len(results):,} results, {pinned:,} pinned)"
        )
        print(f"walk (os.walk)             {walk_s:>11.2f} s")
        print(f"walk (find | wc -l)        {find_s:>11.2f} s")
        print(
            f"gc --dry-run               {dry_s:>11.2f} s  would free {dry.objects:,} objects "
            f"(ratio {dry_s / walk_s:.2f})"
        )
        print(
            f"gc                         {gc_s:>11.2f} s  freed {report.objects:,} objects "
            f"({report.freed_bytes / 2**20:,.0f} MiB), kept {report.kept_objects:,}"
        )
        print(
            f"gc again (nothing to free) {again_s:>11.2f} s  freed {again.objects:,}, "
            f"kept {again.kept_objects:,}  (ratio {again_s / walk_s:.2f})"
        )
        print(
            f"plain unlink, {REMOVERS} threads   {floor_s:>11.2f} s  {len(left):,} blobs: "
            f"{per_unlink:.0f} us each; gc spent {per_gc:.0f} us per object it freed"
        )
        session.end()
        session.ratio("gc_ratio", ratio, "os.walk", [w for w, _ in walks])
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    session.finish()


if __name__ == "__main__":
    main()
