"""Pins, out-links, temp roots and garbage collection.

First the GC protocol on its own (a store, a database, holds and writers,
no daemon), then the real amberd driven by the real ``amber`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from amberd_process import BIN, Daemon

from amber.daemon.api import images
from amber.daemon.api.images import image_import
from amber.daemon.api.registry import Api
from amber.daemon.config import Config
from amber.daemon.context import open_context
from amber.daemon.storage.db import Database
from amber.daemon.storage.gc import GcOptions, collect
from amber.daemon.storage.roots import Roots
from amber.sandbox import tree as treefmt
from amber.sandbox.checkout import checkout
from amber.sandbox.digest import EMPTY, hash_bytes
from amber.sandbox.store import KINDS, LeaseError, Store
from amber.sandbox.tree import Entry

# -- the protocol, without a daemon --------------------------------------------------------


def put_files(
    store: Store, files: dict[str, bytes], *, subdir: dict[str, bytes] | None = None
) -> bytes:
    """A tree of files (and one subdirectory), as a build's snapshot would store it."""
    with store.batch() as batch:
        entries = []
        if subdir is not None:
            sub = put_files(store, subdir)
            entries.append(Entry(b"sub", treefmt.DIR, 0o755, 0, 0, 0, 0, sub))
        for name, data in files.items():
            digest = store.put_blob_bytes(data, batch)
            entries.append(Entry(name.encode(), treefmt.FILE, 0o644, 0, 0, 0, len(data), digest))
        entries.sort(key=lambda e: e.name)
        return store.put_tree(entries, batch)


def tree_of(store: Store, entries: list[tuple[str, bytes, int]]) -> bytes:
    """A tree naming blobs by digest without writing them: what a deduplicating writer does."""
    rows = [Entry(n.encode(), treefmt.FILE, 0o644, 0, 0, 0, size, d) for n, d, size in entries]
    with store.batch() as batch:
        return store.put_tree(sorted(rows, key=lambda e: e.name), batch)


@pytest.fixture
def gc_env(tmp_path: Path):
    """A store to write to (as the filesystem process does: its own, unguarded),
    the daemon's roots over the same directory, and a database."""
    store = Store.open(tmp_path / "state")
    db = Database(tmp_path / "state" / "amber.db")
    yield store, Roots(Store.open(tmp_path / "state")), db
    db.close()


def test_the_daemons_store_writes_only_under_a_live_writer(gc_env):
    _store, roots, _db = gc_env
    with pytest.raises(LeaseError):
        put_files(roots.store, {"f": b"no lease\n"})
    with roots.hold("shell") as reader, pytest.raises(LeaseError):
        put_files(reader.store, {"f": b"a reader's hold is no lease\n"})
    with roots.writer("import") as writer:
        tree = put_files(writer.store, {"f": b"leased\n"})
        batch = writer.store.batch()
        writer.store.put_blob_bytes(b"committed after the writer ended\n", batch)
    with pytest.raises(LeaseError):
        batch.commit()
    batch.abort()
    assert roots.complete([tree])
    assert not roots.store.has_blob(hash_bytes(b"committed after the writer ended\n"))


async def test_held_objects_stay_and_the_rest_goes(gc_env):
    store, roots, db = gc_env
    held = put_files(store, {"a": b"held a\n"}, subdir={"b": b"held b\n"})
    loose = put_files(store, {"x": b"garbage x\n"}, subdir={"y": b"garbage y\n"})
    hold = roots.hold("shell")
    await trio.to_thread.run_sync(hold.add, [held])

    report = await collect(store, roots, db.path, GcOptions())

    assert report.complete and report.objects == 4  # two trees, two blobs
    assert roots.complete([held])
    assert not store.has_tree(loose) and not store.has_blob(hash_bytes(b"garbage y\n"))
    assert store.has_blob(EMPTY) and store.has_tree(treefmt.EMPTY_TREE)
    assert roots.cycle is None

    hold.release()
    again = await collect(store, roots, db.path, GcOptions(dry_run=True))
    assert again.dry_run and again.objects == 4  # would go now; nothing removed
    assert roots.complete([held])
    await collect(store, roots, db.path, GcOptions())
    assert not store.has_tree(held)


async def test_downloads_are_forgotten_with_their_content(gc_env):
    store, roots, db = gc_env
    kept = put_files(store, {"kept.tar": b"kept source\n"})
    put_files(store, {"gone.tar": b"collected source\n"})
    for data in (b"kept source\n", b"collected source\n"):
        db.put_download(hash_bytes(data).hex(), "00" * 32, len(data), "http://x/" + data.decode())
    hold = roots.hold("build")
    await trio.to_thread.run_sync(hold.add, [kept])

    await collect(store, roots, db.path, GcOptions(dry_run=True))
    assert len(db.download_blobs()) == 2  # a dry run changes nothing
    await collect(store, roots, db.path, GcOptions())

    assert db.download_blobs() == [hash_bytes(b"kept source\n").hex()]
    assert db.find_download(blob=hash_bytes(b"collected source\n").hex()) is None
    hold.release()


async def test_a_writer_keeps_what_it_deduplicated_while_gc_ran(gc_env):
    """The race a mark-and-sweep GC loses without quarantine: a writer finds an
    unreachable object present, reuses it instead of writing it, and only
    afterwards holds the tree that names it."""
    store, roots, db = gc_env
    garbage = put_files(store, {"old": b"shared content\n", "other": b"only garbage\n"})
    shared = hash_bytes(b"shared content\n")
    writer = roots.writer("build w-1", build_id="w-1")
    await trio.to_thread.run_sync(writer.checkpoint)  # laid out: at its first step now
    reports = []

    async def run_gc() -> None:
        reports.append(await collect(store, roots, db.path, GcOptions()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_gc)
        with trio.fail_after(10):
            while roots.cycle is None or roots.cycle.quarantined < 3:
                await trio.sleep(0.01)
        assert not store.has_blob(shared)  # quarantined: a new writer would write it again
        assert roots.waiting_for() == ["build w-1"]
        # The writer's snapshot had found it present before: its tree names it.
        snapshot = tree_of(store, [("copy", shared, 15)])
        await trio.to_thread.run_sync(writer.checkpoint, [snapshot])
    writer.release()

    (report,) = reports
    assert report.quarantined == 3
    assert store.has_blob(shared) and roots.complete([snapshot])
    assert not store.has_tree(garbage) and not store.has_blob(hash_bytes(b"only garbage\n"))
    assert not [p for kind in KINDS for _, shard in store.shards(kind, quarantined=True)
                for p in shard.iterdir()]  # fmt: skip


async def test_a_starting_writer_pauses_the_sweep(gc_env):
    """A build laying out its sources reads trees it has just found present."""
    store, roots, db = gc_env
    garbage = put_files(store, {"g": b"read by a starting build\n"})
    writer = roots.writer("build w-3", build_id="w-3")
    reports = []

    async def run_gc() -> None:
        reports.append(await collect(store, roots, db.path, GcOptions()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_gc)
        await trio.sleep(0.5)
        assert roots.cycle is not None and roots.complete([garbage])  # untouched, not even moved
        await trio.to_thread.run_sync(writer.checkpoint, [garbage])  # it holds what it read
    writer.release()
    assert reports[0].quarantined == 0 and roots.complete([garbage])


async def test_an_interrupted_cycle_puts_the_quarantine_back(gc_env):
    store, roots, db = gc_env
    garbage = put_files(store, {"g": b"garbage\n"})
    writer = roots.writer("build w-2", build_id="w-2")
    await trio.to_thread.run_sync(writer.checkpoint)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, store, roots, db.path, GcOptions())
        with trio.fail_after(10):
            while roots.cycle is None or roots.cycle.quarantined < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    writer.release()
    assert roots.cycle is None
    assert roots.complete([garbage])


def test_start_up_restores_what_a_killed_daemon_left_in_quarantine(gc_env):
    store, roots, _db = gc_env
    tree = put_files(store, {"f": b"quarantined when amberd died\n"})
    blob = hash_bytes(b"quarantined when amberd died\n")
    for kind, digest in (("trees", tree), ("blobs", blob)):
        target = roots.quarantine_path(kind, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(roots.store_path(kind, digest), target)
    assert not roots.complete([tree])
    assert Roots(store).recover() == 2
    assert roots.complete([tree])


async def test_max_freed_stops_the_sweep(gc_env):
    store, roots, db = gc_env
    for i in range(40):
        put_files(store, {f"f{i}": os.urandom(5000)})
    report = await collect(store, roots, db.path, GcOptions(max_freed=20_000))
    assert not report.complete
    assert 20_000 <= report.freed_bytes < 40 * 2 * 8192


async def test_gc_during_an_image_import_leaves_the_image_whole(tmp_path: Path, monkeypatch):
    """Issue 13: an import reuses blobs already in the store; a GC between its
    resolve and its image record took them (and its own new objects)."""
    ctx = open_context(Config(state_dir=tmp_path / "state"))
    api = Api(ctx, manager=None)  # type: ignore[arg-type]  # image-import needs no manager
    root = SimpleNamespace(peer=SimpleNamespace(uid=0, gid=0, groups=(), is_root=True))
    for name, only in (("a", b"only in a\n"), ("b", b"only in b\n")):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "shared").write_bytes(b"in both images\n" * 100)
        (tmp_path / name / "sub" / "only").write_bytes(only)
    await image_import(
        api,
        root,
        {"name": "a", "source": f"dir:{tmp_path / 'a'}", "shared": False, "insecure": False},
    )
    ctx.db.delete_image("a", 0)  # `amber image rm a`: what b shares is now unreferenced

    marked = trio.Event()
    reports = []

    async def run_gc() -> None:
        async def progress(message: str) -> None:
            if "objects are live" in message:
                marked.set()

        reports.append(await ctx.gc.collect(GcOptions(), progress=progress))

    real_resolve = images.resolve_base

    def resolve_then_gc(*args, **kwargs):
        resolved = real_resolve(*args, **kwargs)
        # A GC starts between b's resolve and its image record, and has
        # marked everything the database and the holds keep before b goes on.
        trio.from_thread.run_sync(nursery.start_soon, run_gc)
        trio.from_thread.run(marked.wait)
        return resolved

    monkeypatch.setattr(images, "resolve_base", resolve_then_gc)
    async with trio.open_nursery() as nursery:
        reply = await image_import(
            api,
            root,
            {"name": "b", "source": f"dir:{tmp_path / 'b'}", "shared": False, "insecure": False},
        )
    assert reports and reports[0].objects > 0  # the gc ran and collected a's leftovers
    tree = bytes.fromhex(reply["tree"])
    assert ctx.store.closure_check().missing([tree]) is None
    fsck = await ctx.gc.fsck(repair=False)
    assert fsck["problems"] == [] and fsck["corrupt"] == []
    checkout(ctx.store, tree, tmp_path / "out")  # what a build on it reads
    assert (tmp_path / "out" / "shared").read_bytes() == b"in both images\n" * 100
    assert (tmp_path / "out" / "sub" / "only").read_bytes() == b"only in b\n"
    ctx.db.close()


# -- the real daemon -----------------------------------------------------------------------


def write_spec(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spec.toml"
    path.write_text(text)
    return path


def steps_spec(name: str, *runs: str, extra: str = "") -> str:
    body = f'[build]\nname = "{name}"\n{extra}\n'
    for i, run in enumerate(runs, 1):
        body += f'[[step]]\nname = "s{i}"\nrun = """{run}"""\n'
    return body


def statuses(report: dict) -> list[str]:
    return [s["status"] for s in report["steps"]]


def amber_json(daemon: Daemon, *args: str) -> dict:
    proc = daemon.amber(*args, "--json")
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def blob_present(daemon: Daemon, content: bytes) -> bool:
    return Store(daemon.state).has_blob(hash_bytes(content))


def fsck_clean(daemon: Daemon) -> dict:
    proc = daemon.amber("store", "fsck", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report
    assert not report["corrupt"] and not report["missing"] and not report["problems"], report
    return report


def test_pull_request_flow_pins_a_cache_hit_and_gc_keeps_only_the_pin(amberd: Daemon):
    other = write_spec(
        amberd.root / "other", steps_spec("other", "echo other-log; echo other-output > o")
    )
    code, first = amberd.build_json(other)
    assert code == 0 and statuses(first) == ["ran"]

    pr = write_spec(
        amberd.root / "pr",
        steps_spec("pr", "echo pr-one > one", "echo pr-two > two", "cat one two > both"),
    )
    code, branch = amberd.build_json(pr)  # the pull request's CI job: no pin
    assert code == 0 and statuses(branch) == ["ran"] * 3
    code, main = amberd.build_json(pr, "--pin", "main/x")  # merged: the same spec on main
    assert code == 0 and statuses(main) == ["cached"] * 3

    pins = amber_json(amberd, "pin", "ls")["pins"]
    assert [(p["name"], p["target"], p["kind"]) for p in pins] == [
        ("main/x", main["build"], "build")
    ]
    noted = amberd.amber("log", main["build"])  # notes outlive the build's live state
    assert b"amber: pinned as main/x" in noted.stdout  # with the log: `| grep` finds it
    assert blob_present(amberd, b"other-output\n")

    report = amber_json(amberd, "gc")
    assert report["objects"] > 0 and report["freed_bytes"] > 0 and report["results"] >= 1

    assert not blob_present(amberd, b"other-output\n")  # unpinned: collected
    log = amberd.amber("log", first["build"])  # the record and its log stay (keep-failed-days)
    assert log.returncode == 0 and b"other-log" in log.stdout
    for content in (b"pr-one\n", b"pr-two\n", b"pr-one\npr-two\n"):
        assert blob_present(amberd, content)
    fsck_clean(amberd)
    code, again = amberd.build_json(pr)
    assert statuses(again) == ["cached"] * 3  # the pin kept every step's result
    code, rebuilt = amberd.build_json(other)
    assert statuses(rebuilt) == ["ran"]  # its result went with its objects
    log = amberd.amber("log", again["build"], "--step", "s3")
    assert log.returncode == 0
    status = amber_json(amberd, "status")
    assert datetime.fromisoformat(status["last_gc"]).timestamp() > time.time() - 60


def test_pin_targets_and_removal(amberd: Daemon):
    spec = write_spec(amberd.root / "t", steps_spec("t", "echo t-one > one", "echo t-two > two"))
    _code, built = amberd.build_json(spec)
    bid = built["build"]
    record = Database(amberd.state / "amber.db")
    try:
        step1 = record.get_steps(bid)[0]
    finally:
        record.close()

    for name, target in (
        ("by-step", f"{bid}:s1"),
        ("by-result", step1.key),
        ("by-result-prefixed", f"result:{step1.key}"),
        ("by-tree", f"tree:{step1.after_tree}"),
    ):
        proc = amberd.amber("pin", "add", name, target)
        assert proc.returncode == 0, proc.stderr
    kinds = {p["name"]: p["kind"] for p in amber_json(amberd, "pin", "ls")["pins"]}
    assert kinds == {"by-step": "step", "by-result": "result", "by-result-prefixed": "result",
                     "by-tree": "tree"}  # fmt: skip

    bad = amberd.amber("pin", "add", "bad", "no-such-build")
    assert bad.returncode != 0 and b"BUILD:STEP" in bad.stderr  # says what is accepted
    bad = amberd.amber("pin", "add", "bad", f"{bid}:nostep")
    assert bad.returncode != 0 and b"s1, s2" in bad.stderr

    amber_json(amberd, "gc")
    assert blob_present(amberd, b"t-one\n")  # held by the step pin (its after-state)
    assert not blob_present(amberd, b"t-two\n")  # step s2: nobody pinned it
    for name in ("by-step", "by-result", "by-result-prefixed", "by-tree"):
        assert amberd.amber("pin", "rm", name).returncode == 0
    assert amber_json(amberd, "pin", "ls")["pins"] == []
    assert amberd.amber("pin", "rm", "by-step").returncode != 0
    amber_json(amberd, "gc")
    assert not blob_present(amberd, b"t-one\n")


def test_a_failed_build_is_not_pinned_and_its_frozen_state_is_retained(amberd: Daemon):
    spec = write_spec(
        amberd.root / "f", steps_spec("f", "echo kept-failure > f", "echo no >&2; exit 3")
    )
    proc = amberd.amber("build", "--pin", "main/f", str(spec))
    assert proc.returncode == 1
    assert b"not pinned as main/f" in proc.stdout + proc.stderr
    assert amber_json(amberd, "pin", "ls")["pins"] == []
    amber_json(amberd, "gc")  # keep-failed-days (14 by default) keeps it
    assert blob_present(amberd, b"kept-failure\n")
    _code, again = amberd.build_json(spec)
    assert statuses(again) == ["cached", "cached-failure"]
    amber_json(amberd, "gc", "--keep-failed", "0")  # the newest 5 per spec are kept all the same
    assert blob_present(amberd, b"kept-failure\n")


def test_a_blob_deleted_behind_ambers_back_reruns_its_step_and_says_why(amberd: Daemon):
    spec = write_spec(
        amberd.root / "d",
        steps_spec("d", "echo d-one > one", "echo d-two > two", "cat one two > three"),
    )
    code, _first = amberd.build_json(spec)
    assert code == 0
    digest = hash_bytes(b"d-two\n")
    os.unlink(Store(amberd.state).blob_path(digest))

    check = amberd.amber("store", "fsck", "--json")
    assert check.returncode == 1
    missing = json.loads(check.stdout)["missing"]
    assert missing and all(digest.hex()[:12] in m["message"] for m in missing)

    proc = amberd.amber("build", "--json", str(spec))
    second = json.loads(proc.stdout)
    assert proc.returncode == 0, (proc.stderr.decode(), amberd.log.read_text()[-3000:])
    assert statuses(second) == ["cached", "ran", "cached"]  # s2 wrote the blob again
    said = proc.stderr.decode()
    assert "step s2: cached result of build" in said and "is incomplete in the store" in said
    assert digest.hex()[:12] in said and "rerunning" in said
    log = amberd.amber("log", second["build"])
    assert b"step s2: cached result of build" in log.stdout
    assert blob_present(amberd, b"d-two\n")
    fsck_clean(amberd)


def test_fsck_finds_a_corrupt_blob_and_repair_turns_its_results_into_misses(amberd: Daemon):
    spec = write_spec(amberd.root / "c", steps_spec("c", "echo c-one > one", "echo c-two > two"))
    assert amberd.build_json(spec)[0] == 0
    path = Store(amberd.state).blob_path(hash_bytes(b"c-one\n"))
    os.chmod(path, 0o644)
    path.write_bytes(b"c-0ne\n")  # same size, other content: only a rehash sees it

    check = amberd.amber("store", "fsck", "--json")
    assert check.returncode == 1
    found = json.loads(check.stdout)
    assert found["corrupt"] == [os.path.relpath(path, amberd.state / "cas")]
    assert len(found["missing"]) == 2  # both results' after-states hold the file
    repaired = json.loads(amberd.amber("store", "fsck", "--repair", "--json").stdout)
    assert repaired["repaired"] and repaired["results_dropped"] == 2
    assert not path.exists()

    code, again = amberd.build_json(spec)
    assert code == 0 and statuses(again) == ["ran", "ran"]  # misses, never a false hit
    assert path.read_bytes() == b"c-one\n"
    fsck_clean(amberd)


def test_out_link_is_a_root_while_it_exists(amberd: Daemon):
    spec = write_spec(
        amberd.root / "o",
        steps_spec("o", "mkdir -p out && echo linked > out/file && echo elsewhere > x",
                   extra='output = "out"'),
    )  # fmt: skip
    link = amberd.root / "result"
    code, built = amberd.build_json(spec, "--out-link", str(link))
    assert code == 0, built
    assert sorted(os.listdir(link)) == ["file"] and (link / "file").read_text() == "linked\n"

    first = amber_json(amberd, "gc")
    assert first["out_links"] == 0
    assert blob_present(amberd, b"linked\n")  # held by the out-link
    assert not blob_present(amberd, b"elsewhere\n")  # outside the output directory
    fsck_clean(amberd)

    # Building again replaces an out-link amber made.
    code, _rebuilt = amberd.build_json(spec, "--out-link", str(link))
    assert code == 0 and (link / "file").read_text() == "linked\n"
    # Something else at the path is never overwritten.
    (amberd.root / "taken").mkdir()
    refused = amberd.amber("build", "--out-link", str(amberd.root / "taken"), str(spec))
    assert refused.returncode != 0 and b"not an out-link" in refused.stdout + refused.stderr

    shutil.rmtree(link)
    second = amber_json(amberd, "gc")
    assert second["out_links"] == 1
    assert not blob_present(amberd, b"linked\n")

    # A path replaced by another directory is not the checkout any more.
    code, built = amberd.build_json(spec, "--out-link", str(link))
    shutil.rmtree(link)
    link.mkdir()
    (link / "file").write_text("mine\n")
    assert amber_json(amberd, "gc")["out_links"] == 1
    assert (link / "file").read_text() == "mine\n"


@pytest.fixture
def busy_amberd(daemon_root):
    d = Daemon(daemon_root, jobs=4).start()
    yield d
    assert d.stop() == 0, d.log.read_text()[-3000:]


def test_gc_in_a_loop_while_ten_builds_run_and_two_shells_are_open(busy_amberd: Daemon):
    d = busy_amberd
    # Garbage whose content the builds below produce again: their snapshots
    # find it in the store and reuse it while GC is collecting it. Its own
    # file is garbage only it has: GC under load takes that.
    garbage = write_spec(
        d.root / "g", steps_spec("g", "echo shared-output > shared && echo g-only > g-only")
    )
    code, collected = d.build_json(garbage)
    assert code == 0
    assert shell_out(d, collected["build"], "cat g-only") == (0, b"g-only\n")

    # Two unpinned builds to open shells in: only the shells hold them.
    shell_specs = [
        write_spec(d.root / f"sh{i}", steps_spec(f"sh{i}", f"echo shell-state-{i} > state"))
        for i in range(2)
    ]
    shell_builds = [d.build_json(s)[1]["build"] for s in shell_specs]
    # Each shell reads its state once the test says so (a line on its stdin).
    command = ["/bin/sh", "-c", "echo in; read go; cat state"]
    shells = [
        subprocess.Popen(
            [str(BIN / "amber"), "shell", bid, "--", *command],
            env=d.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for bid in shell_builds
    ]
    for shell in shells:  # each holds its state from here on
        assert shell.stdout.readline() == b"in\n", shell.stderr.read()

    results: dict[int, tuple[int, dict]] = {}

    def build(i: int) -> None:
        spec = write_spec(
            d.root / f"b{i}",
            steps_spec(f"b{i}", "echo shared-output > shared && sleep 0.3",
                       f"echo unique-{i} > u && sleep 0.3", "cat shared u > both"),
        )  # fmt: skip
        results[i] = d.build_json(spec, "--pin", f"loop/{i}")

    threads = [threading.Thread(target=build, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    with d.connect() as conn:  # GC from the moment builds write
        deadline = time.monotonic() + 30
        while not any(b["status"] == "running" for b in conn.call("ps")["builds"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    cycles = 0
    while any(t.is_alive() for t in threads) or cycles < 3:
        proc = d.amber("gc", "--json")
        assert proc.returncode == 0, proc.stderr
        cycles += 1
    for t in threads:
        t.join(120)
    # GC did collect while the shells were open: the garbage build is gone...
    gone = shell_out(d, collected["build"], "cat g-only")
    assert gone[0] != 0 and b"no longer complete" in gone[1], gone

    # ...and every live build and shell still reads what it holds.
    for i, shell in enumerate(shells):
        out, err = shell.communicate(b"go\n", timeout=60)
        assert shell.returncode == 0, err
        assert out.decode().strip() == f"shell-state-{i}"
    for i in range(10):
        code, report = results[i]
        assert code == 0 and report["status"] == "success", (i, report, d.log.read_text()[-3000:])
        both = shell_out(d, report["build"], "cat both")
        assert both == (0, f"shared-output\nunique-{i}\n".encode()), (i, both)

    amber_json(d, "gc")
    fsck_clean(d)  # every pin complete, no result pointing at a lost object
    pins = {p["name"] for p in amber_json(d, "pin", "ls")["pins"]}
    assert pins == {f"loop/{i}" for i in range(10)}
    code, again = d.build_json(d.root / "b3" / "spec.toml")
    assert statuses(again) == ["cached"] * 3


def shell_out(d: Daemon, build: str, command: str) -> tuple[int, bytes]:
    """What `amber shell BUILD -- sh -c COMMAND` shows a user: exit code, stdout (else stderr)."""
    proc = d.amber("shell", build, "--", "/bin/sh", "-c", command)
    return proc.returncode, proc.stdout if proc.returncode == 0 else proc.stderr


def test_automatic_gc_when_free_space_runs_low(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text('min-free = "1000T"\nmax-free = "1000T"\n')  # always short of space
    d = Daemon(daemon_root).start("--config", str(config))
    try:
        spec = write_spec(d.root / "auto", steps_spec("auto", "echo auto-garbage > g"))
        assert d.build_json(spec)[0] == 0
        assert blob_present(d, b"auto-garbage\n")
        deadline = time.monotonic() + 30  # a new build makes the next check collect
        while blob_present(d, b"auto-garbage\n"):
            assert time.monotonic() < deadline, d.log.read_text()[-2000:]
            time.sleep(0.2)
        assert amber_json(d, "status")["last_gc"]
    finally:
        assert d.stop() == 0
