"""The completeness record: a cache hit trusts a row, and nothing stale stays in it.

A hit on a big base checks a row of ``complete_trees`` instead of walking
the base's closure (daemon/storage/complete.py). What must not regress:
when an object of a recorded closure leaves the store, by GC or by fsck,
the row goes first, so a hit on that tree walks it, finds the hole and
reruns its step, saying why. First GC on its own (a store, a database,
holds and a real cycle), then the real amberd and `amber` command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
from amberd_process import Daemon
from rootfs import make_busybox_root

from amber.daemon.storage.complete import CompleteTrees
from amber.daemon.storage.db import Database
from amber.daemon.storage.fsck import check_store
from amber.daemon.storage.gc import GcOptions, collect
from amber.daemon.storage.roots import Roots
from amber.sandbox import tree as treefmt
from amber.sandbox.digest import hash_bytes
from amber.sandbox.store import Store
from amber.sandbox.tree import Entry

FANOUT = 6  # directories per level
DEPTH = 4  # levels of directories; the files sit at the bottom
FILES = 3  # files per bottom directory: 6**4 * 3 = 3888 files
DEEPEST = b"the deepest file of the big base\n"


def deep_path(level: int) -> str:
    """The last directory at each level: where the deepest file lives."""
    return "/".join(f"d{level_}-{FANOUT - 1}" for level_ in range(level))


def fill_big(top: Path) -> Path:
    """Thousands of small files, DEPTH levels deep; returns the deepest one."""

    def fill(directory: Path, level: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if level == DEPTH:
            for i in range(FILES):
                (directory / f"f{i}").write_text(f"{directory.relative_to(top)} {i}\n")
            return
        for i in range(FANOUT):
            fill(directory / f"d{level}-{i}", level + 1)

    fill(top, 0)
    deepest = top / deep_path(DEPTH) / "deepest"
    deepest.write_bytes(DEEPEST)
    return deepest


# -- GC on its own -----------------------------------------------------------------------


def put_big(store: Store, deepest: bytes) -> bytes:
    """The big tree, with ``deepest`` as the content of the deepest file."""
    with store.batch() as batch:

        def level(depth: int, path: str) -> bytes:
            entries = []
            if depth == DEPTH:
                contents = [(f"f{i}", f"{path} {i}\n".encode()) for i in range(FILES)]
                if path == deep_path(DEPTH):
                    contents.append(("deepest", deepest))
                for name, data in contents:
                    digest = store.put_blob_bytes(data, batch)
                    entries.append(
                        Entry(name.encode(), treefmt.FILE, 0o644, 0, 0, 0, len(data), digest)
                    )
            else:
                for i in range(FANOUT):
                    name = f"d{depth}-{i}"
                    sub = level(depth + 1, f"{path}/{name}" if path else name)
                    entries.append(Entry(name.encode(), treefmt.DIR, 0o755, 0, 0, 0, 0, sub))
            return store.put_tree(sorted(entries, key=lambda e: e.name), batch)

        return level(0, "")


def test_gc_forgets_a_tree_whose_deep_blob_it_removed_and_keeps_its_kept_sibling(tmp_path: Path):
    state = tmp_path / "state"
    writer_store = Store.open(state)  # as the filesystem process writes: its own, unguarded
    db = Database(state / "amber.db")
    roots = Roots(Store.open(state))
    record = CompleteTrees(db.path)
    try:
        doomed = put_big(writer_store, DEEPEST)  # a big base nobody keeps
        kept = put_big(writer_store, b"another deepest file\n")  # all but the deepest path shared
        with roots.writer("build") as hold:
            hold.checkpoint([doomed, kept])
            check = roots.store.closure_check(record=record)
            assert check.missing([doomed, kept]) is None  # walked once, then recorded
        assert record.has(doomed) and record.has(kept)

        with roots.hold("a pin") as pin:
            pin.add([kept])
            report = trio.run(collect, roots.store, roots, db.path, GcOptions())
            assert report.blobs == 1  # the deepest blob: everything else is shared with kept
            assert not writer_store.has_blob(hash_bytes(DEEPEST))

            with roots.writer("a later build") as hold:
                hold.checkpoint([doomed, kept])
                later = roots.store.closure_check(record=record)
                why = later.tree(doomed)  # GC removed part of its closure: walked, not trusted
                assert why is not None and "missing" in why, why
                assert later.tree(kept) is None
            assert record.has(kept)  # GC forgot nothing else: a hit on it still checks a row
    finally:
        record.close()
        db.close()


def test_a_walk_begun_before_fsck_repair_removed_its_blob_cannot_record(tmp_path: Path):
    """A hit's walk and an ``fsck --repair`` interleaved: the walk reads the
    epoch and finds the tree whole, the repair removes a corrupt blob of it,
    and only then does the walk record its (now stale) answer."""
    state = tmp_path / "state"
    store = Store.open(state)
    db = Database(state / "amber.db")
    record = CompleteTrees(db.path)
    try:
        tree = put_big(store, DEEPEST)
        epoch = record.epoch()  # the walk starts
        assert store.closure_check().missing([tree]) is None  # and finds it whole
        deepest = store.blob_path(hash_bytes(DEEPEST))
        os.chmod(deepest, 0o644)
        deepest.write_bytes(DEEPEST.upper())
        report = check_store(store, db.path, repair=True)
        assert report["corrupt"] and not deepest.exists()
        record.add(tree, epoch)  # the walk ends
        assert not record.has(tree)
        why = store.closure_check(record=record).tree(tree)
        assert why is not None and "missing" in why, why
    finally:
        record.close()
        db.close()


# -- the daemon --------------------------------------------------------------------------


SPEC = """
[build]
name = "big"
base = "big"

[[step]]
name = "s1"
run = "echo one > one"

[[step]]
name = "s2"
run = "cat one > two"
"""


@pytest.fixture
def big(amberd: Daemon) -> tuple[Daemon, Path, Path]:
    """A busybox root with thousands of files deep below /usr/share, as image
    ``big``; a spec on it built twice (the second fully cached, so the
    record has its trees); returns the daemon, the spec and the deepest
    file's path in the store."""
    root = amberd.root / "bigroot"
    make_busybox_root(root)
    fill_big(root / "usr/share/big")
    assert amberd.amber("image", "import", "big", f"dir:{root}").returncode == 0
    spec_dir = amberd.root / "spec"
    spec_dir.mkdir()
    spec = spec_dir / "spec.toml"
    spec.write_text(SPEC)
    assert statuses(amberd, spec) == ["ran", "ran"]
    assert statuses(amberd, spec) == ["cached", "cached"]
    return amberd, spec, Store(amberd.state).blob_path(hash_bytes(DEEPEST))


def statuses(daemon: Daemon, spec: Path) -> list[str]:
    code, report = daemon.build_json(spec)
    assert code == 0, report
    return [s["status"] for s in report["steps"]]


def rebuild(daemon: Daemon, spec: Path) -> tuple[list[str], str]:
    proc = daemon.amber("build", "--json", str(spec))
    assert proc.returncode == 0, (proc.stderr.decode(), daemon.log.read_text()[-3000:])
    return [s["status"] for s in json.loads(proc.stdout)["steps"]], proc.stderr.decode()


def says_incomplete(said: str, step: str, digest: str) -> bool:
    return (
        f"step {step}: cached result of build" in said
        and f"is incomplete in the store (blob {digest[:12]} is missing); rerunning" in said
    )


def test_a_deep_blob_of_a_big_base_lost_behind_ambers_back_is_a_miss_once_fsck_saw_it(big):
    daemon, spec, deepest = big
    digest = deepest.name
    os.unlink(deepest)
    check = daemon.amber("store", "fsck", "--json")
    assert check.returncode == 1
    report = json.loads(check.stdout)
    assert len(report["missing"]) == 2 and all(
        digest[:12] in m["message"] for m in report["missing"]
    )
    assert any("image big is incomplete" in p["message"] for p in report["problems"])

    steps, said = rebuild(daemon, spec)
    assert steps == ["ran", "ran"]  # both after-states hold the base's deepest file
    assert says_incomplete(said, "s1", digest) and says_incomplete(said, "s2", digest), said
    steps, said = rebuild(daemon, spec)  # the base is still broken: never a false hit
    assert steps == ["ran", "ran"] and says_incomplete(said, "s1", digest), said


def test_a_corrupt_deep_blob_removed_by_fsck_repair_is_a_miss_with_its_reason(big):
    daemon, spec, deepest = big
    digest = deepest.name
    os.chmod(deepest, 0o644)
    deepest.write_bytes(DEEPEST.upper())  # same size, other content: only a rehash sees it
    repaired = json.loads(daemon.amber("store", "fsck", "--repair", "--json").stdout)
    assert repaired["corrupt"] == [os.path.relpath(deepest, daemon.state / "cas")]
    assert repaired["results_dropped"] == 2
    assert not deepest.exists()

    steps, _said = rebuild(daemon, spec)
    assert steps == ["ran", "ran"]  # fsck dropped both results
    steps, said = rebuild(daemon, spec)  # new results, over the base that lost the blob
    assert steps == ["ran", "ran"], said
    assert says_incomplete(said, "s1", digest) and says_incomplete(said, "s2", digest), said
