#!/usr/bin/env python3
"""Benchmark: the snapshot of an upper directory of N new files, in process, vs ``tar -cf``.

    python scripts/bench/snapshot.py [--files 20000] [--content empty,small]
                                     [--rounds 7] [--old REV] [--work-dir DIR]
                                     [--ext4-image GIB]

``files.py`` measures a snapshot inside a real build, where a run costs
seconds of daemon and sandbox around it; this one takes the snapshot code
alone (``Snapshotter`` over the empty tree, a fresh store each run, on the
same disk) so a change to it can be judged in a minute. With ``--old REV``
the ``sandbox`` package of that git revision is measured in the same run,
so old and new see the same machine: each round runs ``tar -cf``, the new
code and the old one, in an order that rotates from round to round, with
dirty data synced before each. As in ``files.py``, a work directory on
ext4 without a journal is swapped for a journalled ext4 image (there, the
files a run deletes slow the next run's creates for minutes). Contents: ``empty`` (``touch``: what
``files.py`` makes) and ``small`` (1 KiB files, all different).

Prints per content the median of each, and ``RESULT snapshot_vs_tar_<content>``
(and ``..._old``) through ``Session.ratio``: refused when tar's runs spread.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType

from common import Session
from files import AUTO_IMAGE_GIB, ext4_image

from amber.daemon.preflight import ext4_journal

REPO = Path(__file__).resolve().parents[2]


def make_upper(root: Path, files: int, content: str) -> Path:
    """An overlay upper holding ``d/`` with ``files`` new files."""
    upper = root / f"upper-{content}"
    d = upper / "d"
    d.mkdir(parents=True)
    for i in range(1, files + 1):
        with open(d / str(i), "wb") as f:
            if content == "small":
                f.write(i.to_bytes(8, "little") * 128)
    return upper


def load_sandbox(rev: str | None, root: Path) -> ModuleType:
    """The ``sandbox`` package of this checkout, or of git revision ``rev``."""
    if rev is None:
        return importlib.import_module("amber.sandbox")
    old = root / "old"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "sandbox"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    sys.path.insert(0, str(old))
    return importlib.import_module("sandbox")


def snapshot_once(pkg: ModuleType, root: Path, upper: Path) -> float:
    """Seconds of one snapshot of ``upper`` over the empty tree into a fresh store."""
    store_mod = importlib.import_module(pkg.__name__ + ".store")
    snap_mod = importlib.import_module(pkg.__name__ + ".snapshot")
    tree_mod = importlib.import_module(pkg.__name__ + ".tree")
    userns = importlib.import_module(pkg.__name__ + ".userns")
    state = Path(tempfile.mkdtemp(prefix="store-", dir=root))
    try:
        store = store_mod.Store.open(state)
        snapper = snap_mod.Snapshotter(store, tree_mod.EMPTY_TREE, upper, userns.IDENTITY)
        os.sync()
        started = time.perf_counter()
        snapper.snapshot()
        return time.perf_counter() - started
    finally:
        shutil.rmtree(state)


def tar_once(root: Path, upper: Path) -> float:
    out = root / "d.tar"
    os.sync()
    started = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "d"], cwd=upper, check=True)
    took = time.perf_counter() - started
    out.unlink()
    return took


def measure(args: argparse.Namespace, root: Path, session: Session) -> None:
    sides = {"new": load_sandbox(None, root)}
    if args.old:
        sides["old"] = load_sandbox(args.old, root)
    for content in args.content.split(","):
        upper = make_upper(root, args.files, content)
        runs: dict[str, list[float]] = {"tar": [], **{name: [] for name in sides}}
        names = list(runs)
        for name in names:  # warm the cache and the code once, untimed
            tar_once(root, upper) if name == "tar" else snapshot_once(sides[name], root, upper)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                took = (
                    tar_once(root, upper)
                    if name == "tar"
                    else snapshot_once(sides[name], root, upper)
                )
                runs[name].append(took)
        med = {name: statistics.median(times) for name, times in runs.items()}
        print(
            f"{content}: N={args.files}: "
            + ", ".join(f"{name} {med[name]:.3f} s" for name in names)
            + f"  (load {os.getloadavg()[0]:.2f})",
            flush=True,
        )
        for name in sides:
            suffix = "" if name == "new" else "_old"
            session.ratio(
                f"snapshot_vs_tar_{content}{suffix}", med[name] / med["tar"], "tar -cf", runs["tar"]
            )
        shutil.rmtree(upper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--content", default="empty,small", help="empty, small or both")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--old", metavar="REV", help="also measure sandbox/ of this revision")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--ext4-image", type=int, metavar="GIB",
                        help="measure on a journalled ext4 image of GIB GiB (default: when "
                        f"the work directory is on ext4 without a journal, {AUTO_IMAGE_GIB}; "
                        "0: never)")  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("snapshot.py: run as root (the store is root's, as in amberd)")
    image = args.ext4_image
    device, journal = ext4_journal(args.work_dir)
    if image is None and device is not None and not journal:
        image = AUTO_IMAGE_GIB
    with ExitStack() as stack:
        work = stack.enter_context(ext4_image(args.work_dir, image)) if image else args.work_dir
        root = Path(tempfile.mkdtemp(prefix="amber-bench-snapshot-", dir=work))
        try:
            with Session("snapshot.py") as session:
                measure(args, root, session)
            session.finish()
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
