"""A snapshot's tree digest is part of every step key and cache entry downstream.

So the bytes a snapshot encodes must never change for the same content:
these tests build a fixed base and a fixed overlayfs upper (every kind of
entry, every overlayfs marker the snapshot reads, fixed times and ids) and
compare the digests with ones recorded from the code as it was before the
snapshot was made fast (commit fbed1bf). A change that alters them breaks
every cache and must come with a new tree ``FORMAT``, not slip in.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from amber.sandbox import tree as treefmt
from amber.sandbox.importer import import_directory
from amber.sandbox.snapshot import Snapshotter
from amber.sandbox.store import Store
from amber.sandbox.userns import IdMap

HOST_BASE = 200_000
IDS = IdMap(HOST_BASE, 65_536)
T = 1_700_000_000_123_456_789  # every mtime, so digests do not depend on the clock

#: Recorded with the snapshot code of fbed1bf (see the module docstring).
BASE_DIGEST = "f517d478f5ebd96d9390093bbfcb66aa0bd0ae14ef70b7e14452e4456d8dc755"
NEW_FILES_DIGEST = "4807e59b375c99a7ddbc46ba269b1af2198f2023a2fe0a4d2db8e24eedcb9077"
MERGED_DIGEST = "e9c581f1eb13750d71deda2ddbc12a3247b54489f9d5db22b9150bbab83e6a25"


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    """Modes are part of the digests: the same umask whoever runs the tests."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _pin_times(root: Path) -> None:
    """Every entry below ``root`` gets mtime ``T`` (children before their directory)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(T, T), follow_symlinks=False)
    os.utime(root, ns=(T, T))


def make_base(root: Path) -> None:
    """The lower tree: what the step started from."""
    (root / "keep/deep").mkdir(parents=True)
    (root / "keep/deep/f").write_bytes(b"unchanged\n")
    (root / "gone").write_bytes(b"deleted by the step\n")
    (root / "hidden/sub").mkdir(parents=True)
    (root / "hidden/sub/x").write_bytes(b"hidden by an opaque dir\n")
    (root / "moved").mkdir()
    (root / "moved/m").write_bytes(b"renamed directory's file\n")
    (root / "meta").write_bytes(b"data left in the lower layer\n")
    (root / "elsewhere").write_bytes(b"a redirected metacopy's data\n")
    (root / "edited").write_bytes(b"before\n")
    os.link(root / "edited", root / "edited-link")
    _pin_times(root)


def make_upper(root: Path, *, lower_changes: bool) -> None:
    """An overlayfs upper: new entries of every kind, and (``lower_changes``)
    the markers overlayfs leaves for deletions, renames and metadata-only copies."""
    root.mkdir()
    (root / "d").mkdir()
    for i in range(1, 6):
        (root / "d" / f"empty{i}").write_bytes(b"")
    for i in range(1, 4):
        (root / "d" / f"small{i}").write_bytes(bytes([i]) * 1024)
    (root / "d/same-a").write_bytes(b"equal content\n")
    (root / "d/same-b").write_bytes(b"equal content\n")
    (root / "d/exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "d/exec", 0o4755)
    (root / "d/hard1").write_bytes(b"linked\n")
    os.link(root / "d/hard1", root / "d/sub-hard2")
    (root / "d/empty-hard").write_bytes(b"")
    os.link(root / "d/empty-hard", root / "d/empty-hard2")
    os.symlink("empty1", root / "d/link")
    os.symlink("/no/such/target", root / "d/dangling")
    os.mkfifo(root / "d/fifo")
    os.mknod(root / "d/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / "d/xattr").write_bytes(b"with an xattr\n")
    os.setxattr(root / "d/xattr", "user.b", b"2")
    os.setxattr(root / "d/xattr", "user.a", b"1")
    (root / "d/empty-xattr").write_bytes(b"")
    os.setxattr(root / "d/empty-xattr", "user.e", b"")
    (root / "d/nested/deeper").mkdir(parents=True)
    (root / "d/nested/deeper/leaf").write_bytes(b"leaf\n")
    (root / "d/emptydir").mkdir()
    (root / "d/foreign").write_bytes(b"")
    os.chown(root / "d/foreign", 12345, 12345)  # outside the sandbox's range: the overflow id
    if lower_changes:
        os.mknod(root / "gone", stat.S_IFCHR | 0o600, 0)  # whiteout
        (root / "hidden").mkdir()
        os.setxattr(root / "hidden", "trusted.overlay.opaque", b"y")
        (root / "hidden/new").write_bytes(b"in the opaque dir\n")
        (root / "renamed").mkdir()
        os.setxattr(root / "renamed", "trusted.overlay.redirect", b"/moved")
        (root / "renamed/added").write_bytes(b"added after the rename\n")
        os.mknod(root / "moved", stat.S_IFCHR | 0o600, 0)
        with open(root / "meta", "wb") as f:
            f.truncate(len(b"data left in the lower layer\n"))
        os.chmod(root / "meta", 0o600)
        os.setxattr(root / "meta", "trusted.overlay.metacopy", b"")
        with open(root / "meta2", "wb") as f:
            f.truncate(len(b"a redirected metacopy's data\n"))
        os.setxattr(root / "meta2", "trusted.overlay.metacopy", b"")
        os.setxattr(root / "meta2", "trusted.overlay.redirect", b"/elsewhere")
        (root / "edited").write_bytes(b"after\n")  # copied up: no longer the base's link
        (root / "keep").mkdir()  # merged with the lower dir, nothing new inside
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_uid == 0:
                os.chown(path, HOST_BASE, HOST_BASE + 7, follow_symlinks=False)
    _pin_times(root)


def test_a_snapshot_of_new_files_gives_the_recorded_tree(store: Store, tmp_path: Path):
    upper = tmp_path / "upper"
    make_upper(upper, lower_changes=False)
    digest, _ = Snapshotter(store, treefmt.EMPTY_TREE, upper, IDS).snapshot()
    assert digest.hex() == NEW_FILES_DIGEST


def test_a_snapshot_over_a_base_gives_the_recorded_tree(store: Store, tmp_path: Path):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    make_base(base_dir)
    base = import_directory(store, base_dir)
    assert base.hex() == BASE_DIGEST
    upper = tmp_path / "upper"
    make_upper(upper, lower_changes=True)
    snapper = Snapshotter(store, base, upper, IDS)
    digest, _ = snapper.snapshot()
    assert digest.hex() == MERGED_DIGEST
    again, _ = snapper.snapshot()  # the second snapshot of a mount uses its hash cache
    assert again == digest


def test_the_walk_keeps_the_process_cwd_and_a_relative_store_gets_the_same_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The walk changes directory on a thread of its own (owncwd.py): the
    process's cwd, which every other thread shares, stays where it was; a
    store named by a relative path (which a changed cwd would break) gets
    the walk by absolute paths, and the same digest."""
    upper = tmp_path / "upper"
    make_upper(upper, lower_changes=False)
    monkeypatch.chdir(tmp_path)
    relative = Store.open("state")
    digest, _ = Snapshotter(relative, treefmt.EMPTY_TREE, "upper", IDS).snapshot()
    assert digest.hex() == NEW_FILES_DIGEST
    absolute = Store.open(tmp_path / "state2")
    digest, _ = Snapshotter(absolute, treefmt.EMPTY_TREE, upper, IDS).snapshot()
    assert digest.hex() == NEW_FILES_DIGEST
    assert os.getcwd() == str(tmp_path)
