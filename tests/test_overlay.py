"""Real mounts: the overlay filesystem carries what builds do to a filesystem.

Each scenario runs the same operations in a plain directory and in an amber
mount, then compares the plain directory with the snapshot checked out (and
the live mount with that checkout, mtimes included to the nanosecond).
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
from fstree import describe, differences

from amber.sandbox import tree as treefmt
from amber.sandbox.checkout import checkout
from amber.sandbox.digest import hash_bytes
from amber.sandbox.fscontrol import FilesystemPool, open_overlay
from amber.sandbox.fsmode import FUSE_DATA, default_fs_mode
from amber.sandbox.importer import import_directory
from amber.sandbox.mounts import mounts_under
from amber.sandbox.store import Store
from amber.sandbox.tree import Entry

T = 1_600_000_000_123_456_789  # a nanosecond mtime make would compare
#: security.capability, version 2, effective: cap_net_raw (13) permitted.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def make_base(root: Path) -> None:
    (root / "src/deep/er").mkdir(parents=True)
    (root / "src/deep/er/file.c").write_text("int x;\n")
    (root / "src/keep.h").write_text("#pragma once\n")
    (root / "victim").write_text("old victim\n")
    (root / "replacement").write_text("replacement\n")
    (root / "olddir/sub").mkdir(parents=True)
    (root / "olddir/sub/f").write_text("in olddir\n")
    (root / "emptydir").mkdir()
    (root / "tree-to-delete/a/b").mkdir(parents=True)
    (root / "tree-to-delete/a/b/c").write_text("c")
    (root / "dir-to-replace").mkdir()
    (root / "dir-to-replace/x").write_text("x")
    (root / "mapped").write_bytes(b"0123456789" * 1000)
    (root / "private").write_bytes(b"p" * 8192)
    (root / "truncate-me").write_text("truncate me please\n")
    (root / "linked-a").write_text("shared inode\n")
    os.link(root / "linked-a", root / "linked-b")
    os.symlink("src/keep.h", root / "sym")
    os.setxattr(root / "src/keep.h", "user.note", b"base")
    os.chmod(root / "src/keep.h", 0o640)
    os.utime(root / "src/keep.h", ns=(T, T))


def apply_operations(root: Path) -> None:
    """What builds do: every operation the issue names."""
    (root / "new/nested").mkdir(parents=True)
    (root / "new/nested/out.o").write_bytes(bytes(range(256)) * 12)
    os.symlink("../src/keep.h", root / "new/link")
    os.link(root / "src/keep.h", root / "new/hard-to-lower")  # link to a lower file
    (root / "new/h1").write_text("h")
    os.link(root / "new/h1", root / "new/h2")
    os.replace(root / "replacement", root / "victim")  # rename over an existing file
    (root / "fresh").mkdir()
    (root / "fresh/inside").write_text("fresh")
    os.rename(root / "fresh", root / "emptydir")  # rename over an existing directory
    os.rename(root / "olddir", root / "moved")  # rename a lower directory
    with open(root / "src/deep/er/file.c", "r+") as f:  # unlink an open file
        os.unlink(root / "src/deep/er/file.c")
        f.write("still writable\n")
        f.seek(0)
        assert f.read().startswith("still")
    os.truncate(root / "truncate-me", 8)
    with open(root / "mapped", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:  # shared mmap
        m[0:5] = b"MMAP!"
        m.flush()
    with open(root / "private", "r+b") as f:  # private mmap never reaches the file
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
        m[0:4] = b"XXXX"
        m.close()
    os.chmod(root / "src/keep.h", 0o600)
    os.chown(root / "victim", 4321, 8765)
    os.utime(root / "src/deep/er", ns=(T, T + 1))
    os.setxattr(root / "new/nested/out.o", "user.built-by", b"amber")
    os.removexattr(root / "src/keep.h", "user.note")
    os.mkfifo(root / "new/fifo")
    os.mknod(root / "new/zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    (root / ("L" * 255)).write_text("long name")
    shutil.rmtree(root / "tree-to-delete")
    shutil.rmtree(root / "dir-to-replace")
    (root / "dir-to-replace").write_text("now a file")
    os.utime(root / "new/nested/out.o", ns=(T, T))


async def test_operations_match_a_plain_directory(store: Store, tmp_path: Path):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    make_base(base_dir)
    base = import_directory(store, base_dir)

    plain = tmp_path / "plain"
    checkout(store, base, plain)
    apply_operations(plain)

    async with open_overlay(store.state_dir, base, tmp_path / "mnt") as mnt:
        await trio.to_thread.run_sync(apply_operations, mnt.root)
        snap = await mnt.snapshot()
        out = tmp_path / "snapshot"
        checkout(store, snap.tree, out)
        live = describe(mnt.root)
    snapshot = describe(out)
    assert differences(live, snapshot) == []  # exact, mtimes included
    assert differences(describe(plain, mtimes=False), describe(out, mtimes=False)) == []
    # the times make relies on survive to the nanosecond
    assert os.stat(out / "src/deep/er").st_mtime_ns == T + 1
    assert os.stat(out / "new/nested/out.o").st_mtime_ns == T
    assert (out / "mapped").read_bytes()[:5] == b"MMAP!"
    assert (out / "private").read_bytes()[:4] == b"pppp"
    assert snapshot["linked-a"][-1] == snapshot["linked-b"][-1] is not None
    assert snapshot["new/h1"][-1] == snapshot["new/h2"][-1] is not None
    assert store.fsck().clean


async def test_changing_one_name_of_a_base_hard_link_splits_it_as_the_build_saw(
    store: Store, tmp_path: Path
):
    """overlayfs without an inode index copies up one name of a lower hard-link
    group on its own; the snapshot records exactly what the step saw."""
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "a").write_text("shared\n")
    os.link(base_dir / "a", base_dir / "b")
    base = import_directory(store, base_dir)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt") as mnt:
        os.chown(mnt.root / "a", 4321, 8765)
        snap = await mnt.snapshot()
        live = describe(mnt.root)
        out = tmp_path / "snapshot"
        checkout(store, snap.tree, out)
    assert differences(live, describe(out)) == []
    assert (os.stat(out / "a").st_uid, os.stat(out / "b").st_uid) == (4321, 0)


async def test_huge_sparse_file(store: Store, tmp_path: Path):
    async with open_overlay(store.state_dir, treefmt.EMPTY_TREE, tmp_path / "mnt") as mnt:
        with open(mnt.root / "disk.img", "wb") as f:
            f.seek(4 * 1024**3 + 4096)
            f.write(b"end")
        snap = await mnt.snapshot()
    entry = store.get_tree(snap.tree)[0]
    assert entry.size == 4 * 1024**3 + 4099
    assert os.stat(store.blob_path(entry.ref)).st_blocks * 512 < 1024**2
    async with open_overlay(store.state_dir, snap.tree, tmp_path / "mnt2") as mnt:
        with open(mnt.root / "disk.img", "rb") as f:
            f.seek(4 * 1024**3 + 4096)
            assert f.read() == b"end"
            f.seek(1000)
            assert f.read(10) == bytes(10)


def synthetic_tree(store: Store, dirs: int, files_per_dir: int, depth: int = 3) -> bytes:
    """A large tree built straight in the store (one shared blob): fast to make."""
    with store.batch() as batch:
        blob = store.put_blob_bytes(b"same content\n", batch)
        files = [
            Entry(f"f{i:05d}.c".encode(), treefmt.FILE, 0o644, 0, 0, T, 13, blob)
            for i in range(files_per_dir)
        ]
        leaf = store.put_tree(files, batch)
        level = [
            Entry(f"d{i:03d}".encode(), treefmt.DIR, 0o755, 0, 0, T, 0, leaf) for i in range(dirs)
        ]
        digest = store.put_tree(level, batch)
        for n in range(depth - 1):
            digest = store.put_tree(
                [Entry(f"level{n}".encode(), treefmt.DIR, 0o755, 0, 0, T, 0, digest)], batch
            )
    return digest


def count_objects(store: Store) -> tuple[int, int]:
    trees = sum(len(os.listdir(store.tree_dir / s)) for s in os.listdir(store.tree_dir))
    blobs = sum(len(os.listdir(store.blob_dir / s)) for s in os.listdir(store.blob_dir))
    return trees, blobs


async def test_snapshot_of_50000_files_writes_only_the_changed_path(store: Store, tmp_path: Path):
    base = synthetic_tree(store, dirs=50, files_per_dir=1000)  # 50,000 files
    before = count_objects(store)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt") as mnt:
        target = mnt.root / "level1/level0/d017/f00421.c"
        target.write_text("one change\n")
        snap = await mnt.snapshot()
    after = count_objects(store)
    # root, level1, level0, d017: the four trees on the file's path; one blob
    assert snap.stats.trees_written == 4
    assert after == (before[0] + 4, before[1] + 1)
    assert store.lookup_path(snap.tree, b"level1/level0/d017/f00421.c").ref == hash_bytes(
        b"one change\n"
    )
    unchanged = store.lookup_path(base, b"level1/level0/d018")
    assert store.lookup_path(snap.tree, b"level1/level0/d018") == unchanged


async def test_serves_a_tree_of_100000_files(store: Store, tmp_path: Path):
    base = synthetic_tree(store, dirs=100, files_per_dir=1000, depth=1)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt") as mnt:
        found = await trio.run_process(["find", str(mnt.root), "-type", "f"], capture_stdout=True)
        assert found.stdout.count(b"\n") == 100_000
        assert (mnt.root / "d099/f00999.c").read_text() == "same content\n"


async def test_kill_9_of_the_filesystem_process_leaves_no_mount_and_no_partial_blob(
    store: Store, tmp_path: Path
):
    work = tmp_path / "mnt"
    async with open_overlay(store.state_dir, treefmt.EMPTY_TREE, work) as mnt:
        for i in range(40):  # enough content that the snapshot is mid-write when killed
            (mnt.root / f"big{i}").write_bytes(os.urandom(4 << 20))

        async def killer():
            await trio.sleep(0.15)
            os.kill(mnt.pid, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            try:
                await mnt.snapshot()
            except Exception as exc:  # the process died under the request
                assert "gone" in str(exc) or "closed" in str(exc)
        await mnt.process.wait()
        assert mnt.process.returncode == -signal.SIGKILL
    assert mounts_under(work) == []
    report = store.fsck()
    assert report.clean, report.corrupt


async def test_writes_fail_cleanly_when_the_process_dies_mid_write(store: Store, tmp_path: Path):
    work = tmp_path / "mnt"
    async with open_overlay(store.state_dir, treefmt.EMPTY_TREE, work) as mnt:
        writer = subprocess.Popen(
            ["sh", "-c", f"i=0; while true; do echo $i > {mnt.root}/f$i; i=$((i+1)); done"]
        )
        await trio.sleep(0.3)
        os.kill(mnt.pid, signal.SIGKILL)
        await mnt.process.wait()
    writer.kill()
    writer.wait()
    assert mounts_under(work) == []
    assert store.fsck().clean


async def test_mount_outlives_the_thread_that_started_it(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """trio forks from worker threads that retire after 10 idle seconds; the
    filesystem must not die with that thread (steps run for hours). The
    threads retire at once here, and the test waits for them to have ended."""
    forked_from: list[threading.Thread] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            forked_from.append(threading.current_thread())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    monkeypatch.setattr(trio._core._thread_cache, "IDLE_TIMEOUT", 0.01)
    async with open_overlay(store.state_dir, treefmt.EMPTY_TREE, tmp_path / "mnt") as mnt:
        assert forked_from and forked_from[0] is not threading.main_thread()
        forked_from[0].join()  # the thread that forked the filesystem has exited
        await trio.sleep(0.2)  # a parent-death signal would have arrived by now
        (mnt.root / "still-here").write_text("yes")
        assert (await mnt.snapshot()).stats.blobs_written == 1


CONTROLLER = """
import sys, trio
from pathlib import Path
from amber.sandbox import tree
from amber.sandbox.fscontrol import FilesystemPool, open_overlay

async def main():
    async with open_overlay(Path(sys.argv[1]), tree.EMPTY_TREE, Path(sys.argv[2])) as mnt:
        print(mnt.pid, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_filesystem_unmounts_itself_when_its_controller_is_killed(
    store: Store, tmp_path: Path
):
    work = tmp_path / "mnt"
    controller = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, str(store.state_dir), str(work)], stdout=subprocess.PIPE
    )
    fs_pid = int(controller.stdout.readline())
    assert mounts_under(work) != []
    controller.kill()
    controller.wait()
    with trio.fail_after(10):
        while True:
            try:
                os.kill(fs_pid, 0)
            except ProcessLookupError:
                break
            await trio.sleep(0.05)
    assert mounts_under(work) == []


async def test_a_warm_spare_serves_the_next_mount(store: Store, tmp_path: Path):
    pool = FilesystemPool(size=1)
    try:
        async with open_overlay(
            store.state_dir, treefmt.EMPTY_TREE, tmp_path / "a", pool=pool
        ) as first:
            assert len(pool._spares) == 1  # a replacement started while this one is used
            spare_pid = pool._spares[0][0].pid
            (first.root / "x").write_text("x")
        async with open_overlay(
            store.state_dir, treefmt.EMPTY_TREE, tmp_path / "b", pool=pool
        ) as second:
            assert second.pid == spare_pid
            assert not (second.root / "x").exists()
    finally:
        spares = [p for p, _ in pool._spares]
        await pool.aclose()
    assert all(p.returncode is not None for p in spares)  # closed spares exit


async def test_root_symlinks_are_served_from_the_eager_layer_and_change_nothing(
    store: Store, tmp_path: Path
):
    base_dir = tmp_path / "base"
    (base_dir / "usr/bin").mkdir(parents=True)
    (base_dir / "usr/bin/tool").write_text("#!/bin/sh\n")
    os.symlink("usr/bin", base_dir / "bin")
    os.lchown(base_dir / "bin", 0, 0)
    os.utime(base_dir / "bin", ns=(T, T), follow_symlinks=False)
    base = import_directory(store, base_dir)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt") as mnt:
        assert os.readlink(mnt.root / "bin") == "usr/bin"
        assert (mnt.root / "bin/tool").read_text() == "#!/bin/sh\n"
        assert os.lstat(mnt.root / "bin").st_mtime_ns == T
        assert (await mnt.snapshot()).tree == base  # no change recorded
        os.unlink(mnt.root / "bin")
        os.symlink("elsewhere", mnt.root / "bin")
        changed = (await mnt.snapshot()).tree
    assert store.lookup_path(changed, b"bin").ref == b"elsewhere"


async def test_eager_entries_come_from_tmpfs_exactly_and_change_nothing(
    store: Store, tmp_path: Path
):
    """Directories, symlinks and executables are served by the tmpfs eager
    layer; the mount shows exactly the tree, and steps change them as usual."""
    base_dir = tmp_path / "base"
    (base_dir / "usr/lib/x86").mkdir(parents=True)
    (base_dir / "usr/lib/x86/libz.so.1.2.13").write_text("elf")
    os.symlink("libz.so.1.2.13", base_dir / "usr/lib/x86/libz.so.1")
    (base_dir / "usr/bin").mkdir()
    tool = base_dir / "usr/bin/tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    os.chmod(tool, 0o4755)
    os.setxattr(tool, "user.note", b"exec")
    os.setxattr(tool, "security.capability", CAP_NET_RAW)
    os.link(tool, base_dir / "usr/bin/tool-alias")
    (base_dir / "usr/share").mkdir()
    (base_dir / "usr/share/data").write_text("not executable")
    os.chmod(base_dir / "usr/lib/x86", 0o750)
    os.chown(base_dir / "usr/lib", 0, 0)
    os.setxattr(base_dir / "usr/lib/x86", "user.kept", b"yes")
    for path in (tool, base_dir / "usr/lib/x86", base_dir / "usr/lib", base_dir / "usr"):
        os.utime(path, ns=(T, T))
    base = import_directory(store, base_dir)
    expected = tmp_path / "checkout"
    checkout(store, base, expected)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt") as mnt:
        assert differences(describe(mnt.root), describe(expected)) == []
        assert os.getxattr(mnt.root / "usr/bin/tool", "security.capability") == CAP_NET_RAW
        eager = mnt.work / "layers" / "eager"  # in the 0700 directory (fsprocess.py)
        assert (eager / "usr/lib/x86/libz.so.1").is_symlink()
        if default_fs_mode().name != FUSE_DATA:
            assert os.stat(eager / "usr/bin/tool").st_blocks == 0  # a stub; data from the store
            assert (
                os.stat(eager / "usr/bin/tool-alias").st_ino
                == os.stat(eager / "usr/bin/tool").st_ino
            )
        else:  # no data-only layer for a stub to point into: the FUSE lower serves them
            assert sorted(os.listdir(eager / "usr/bin")) == []
        assert sorted(os.listdir(eager / "usr/share")) == []  # plain files stay lazy
        ran = subprocess.run([mnt.root / "usr/bin/tool"], capture_output=True, text=True)
        assert ran.stdout == "tool ran\n"
        assert (mnt.work / "layers/upper").is_dir()
        assert not (
            mnt.work / "layers/upper/usr"
        ).exists()  # the upper holds only what steps change
        assert (await mnt.snapshot()).tree == base  # no change recorded
        with open(mnt.root / "usr/bin/tool", "a") as f:
            f.write("echo again\n")  # the kernel drops the capability on write
        os.utime(mnt.root / "usr/bin/tool-alias", ns=(T + 5, T + 5))  # a metadata-only copy-up
        os.unlink(mnt.root / "usr/lib/x86/libz.so.1")
        (mnt.root / "usr/lib/x86/new").write_text("n")
        changed = (await mnt.snapshot()).tree
    assert store.lookup_path(changed, b"usr/lib/x86/libz.so.1") is None
    assert store.lookup_path(changed, b"usr/lib/x86/new") is not None
    edited = store.lookup_path(changed, b"usr/bin/tool")
    assert store.blob_path(edited.ref).read_text() == "#!/bin/sh\necho tool ran\necho again\n"
    assert b"security.capability" not in dict(edited.xattrs)
    alias = store.lookup_path(changed, b"usr/bin/tool-alias")
    assert (alias.mtime_ns, alias.mode) == (T + 5, 0o4755)
    assert dict(alias.xattrs)[b"security.capability"] == CAP_NET_RAW  # copied up from the stub


async def test_a_group_the_step_made_never_joins_a_base_group(store: Store, tmp_path: Path):
    """Base group {a, b}; the step copies up ``a`` without changing anything
    (overlayfs splits it from ``b``) and links ``c`` to it: two inodes with
    equal content and metadata, which must stay two in the snapshot."""
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "a").write_text("shared\n")
    os.link(base_dir / "a", base_dir / "b")
    os.utime(base_dir / "a", ns=(T, T))
    base = import_directory(store, base_dir)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt") as mnt:
        os.chown(mnt.root / "a", 0, 0)  # same owner: a metadata-only copy-up
        os.link(mnt.root / "a", mnt.root / "c")
        seen = {n: os.stat(mnt.root / n).st_ino for n in "abc"}
        assert seen["a"] == seen["c"] != seen["b"]
        snap = await mnt.snapshot()
    async with open_overlay(store.state_dir, snap.tree, tmp_path / "again") as mnt:
        again = {n: os.stat(mnt.root / n).st_ino for n in "abc"}
        with open(mnt.root / "b", "a") as f:
            f.write("b only\n")
        assert (mnt.root / "a").read_text() == (mnt.root / "c").read_text() == "shared\n"
    assert again["a"] == again["c"] != again["b"]
    out = tmp_path / "checkout"
    checkout(store, snap.tree, out)
    groups = describe(out)
    assert groups["a"][-1] == groups["c"][-1] is not None and groups["b"][-1] is None


async def test_a_timeout_in_the_callers_work_stays_the_callers(store: Store, tmp_path: Path):
    """Only the start of the filesystem is reported as "did not mount"."""
    with pytest.raises(trio.TooSlowError):
        async with open_overlay(store.state_dir, treefmt.EMPTY_TREE, tmp_path / "mnt"):
            with trio.fail_after(0.01):
                await trio.sleep(1)
    assert mounts_under(tmp_path) == []


async def test_a_snapshot_hashes_a_hard_link_group_once_and_stores_equal_content_once(
    store: Store, tmp_path: Path
):
    async with open_overlay(store.state_dir, treefmt.EMPTY_TREE, tmp_path / "mnt") as mnt:
        data = os.urandom(1 << 20)
        (mnt.root / "a").write_bytes(data)
        os.link(mnt.root / "a", mnt.root / "b")
        (mnt.root / "c").write_bytes(data)  # same content, another inode
        snap = await mnt.snapshot()
    assert snap.stats.files_hashed == 2  # a (b is its inode), c
    assert snap.stats.blobs_written == 1
    assert store.lookup_path(snap.tree, b"c").ref == hash_bytes(data)


async def test_a_store_object_deleted_under_a_live_mount_is_eio_and_the_mount_stays_up(
    store: Store, tmp_path: Path
):
    base_dir = tmp_path / "base"
    (base_dir / "gone/sub").mkdir(parents=True)
    (base_dir / "gone/sub/f").write_text("in a deleted tree\n")
    (base_dir / "lost").write_text("a deleted blob\n")
    (base_dir / "kept").write_text("still here\n")
    base = import_directory(store, base_dir)
    gone = store.lookup_path(base, b"gone")
    lost = store.lookup_path(base, b"lost")
    assert gone is not None and lost is not None
    async with open_overlay(store.state_dir, base, tmp_path / "mnt") as mnt:
        os.unlink(store.tree_path(gone.ref))
        os.unlink(store.blob_path(lost.ref))
        with pytest.raises(OSError) as caught:
            await trio.to_thread.run_sync(os.listdir, mnt.root / "gone")
        assert caught.value.errno == errno.EIO
        # The FUSE lower itself (direct readers) answers EIO for the lost blob.
        lower = mnt.work / "layers/lower"
        with pytest.raises(OSError) as caught:
            await trio.to_thread.run_sync((lower / "lost").read_bytes)
        assert caught.value.errno == errno.EIO
        # ... and the mount is still up: other names still read, a snapshot still works.
        assert (mnt.root / "kept").read_text() == "still here\n"
        assert await trio.to_thread.run_sync(os.listdir, lower) != []
        (mnt.root / "new").write_text("written after the errors\n")
        snap = await mnt.snapshot()
    entry = store.lookup_path(snap.tree, b"new")
    assert entry is not None and store.read_blob(entry.ref) == b"written after the errors\n"
