"""The content-addressed store on its own: blobs, trees, import, checkout, diff, fsck."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest
from fstree import describe, differences

from amber.sandbox import tree as treefmt
from amber.sandbox.checkout import CheckoutError, checkout
from amber.sandbox.digest import from_hex, hash_bytes
from amber.sandbox.importer import import_directory
from amber.sandbox.store import MissingObject, Store
from amber.sandbox.treediff import ADDED, DELETED, MODIFIED, diff_trees


def make_rich_dir(root: Path) -> None:
    """Every kind of thing a build leaves behind."""
    (root / "src/sub").mkdir(parents=True)
    (root / "src/a.c").write_text("int main(void) { return 0; }\n")
    (root / "src/sub/b.h").write_text("#define B 1\n")
    (root / "empty").write_bytes(b"")
    (root / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "exec.sh", 0o4755)
    os.symlink("src/a.c", root / "link-rel")
    os.symlink("/nonexistent/target", root / "link-dangling")
    os.link(root / "src/a.c", root / "hard-a")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(root / "src/a.c", "user.origin", b"upstream")
    long_name = "n" * 255
    (root / long_name).write_text("long\n")
    os.chown(root / "src/sub/b.h", 1234, 5678)
    os.utime(root / "src/a.c", ns=(1, 1_234_567_890_123_456_789))
    ro = root / "readonly"
    ro.mkdir()
    (ro / "inside").write_text("x")
    os.chmod(ro, 0o555)


def test_blob_roundtrip_and_dedup(store: Store):
    with store.batch() as batch:
        d1 = store.put_blob_bytes(b"hello", batch)
        d2 = store.put_blob_bytes(b"hello", batch)
    assert d1 == d2 == hash_bytes(b"hello")
    assert store.read_blob(d1) == b"hello"
    assert oct(os.stat(store.blob_path(d1)).st_mode & 0o777) == "0o444"
    with pytest.raises(MissingObject):
        store.read_blob(hash_bytes(b"absent"))


def test_aborted_batch_leaves_nothing_under_a_digest(store: Store):
    with pytest.raises(RuntimeError), store.batch() as batch:
        digest = store.put_blob_bytes(b"never committed", batch)
        raise RuntimeError("crash before commit")
    assert not store.has_blob(digest)
    assert os.listdir(store.tmp_dir) == []


def test_tree_encoding_is_canonical_and_validated():
    e1 = treefmt.Entry(b"b", treefmt.FILE, 0o644, 0, 0, 5, 3, hash_bytes(b"abc"))
    e2 = treefmt.Entry(b"a", treefmt.SYMLINK, 0o777, 0, 0, 5, 1, b"b")
    data = treefmt.encode([e2, e1])
    assert treefmt.decode(data) == [e2, e1]
    assert treefmt.digest_of([e2, e1])[0] == hash_bytes(data)
    with pytest.raises(treefmt.TreeFormatError):
        treefmt.decode(treefmt.encode([e1, e2]))  # unsorted
    for hostile in (b"..", b"a/b", b""):
        with pytest.raises(treefmt.TreeFormatError):
            treefmt.decode(treefmt.encode([e1._replace(name=hostile)]))
    with pytest.raises(treefmt.TreeFormatError):
        treefmt.decode(b"\x93garbage")
    for xattrs in (((b"trusted.overlay.opaque", b"y"),), ((b"user.x", 5),), ((7, b"v"),)):
        with pytest.raises(treefmt.TreeFormatError, match="bad xattr"):
            treefmt.decode(treefmt.encode([e1._replace(xattrs=xattrs)]))


def test_a_selective_decode_builds_and_validates_only_the_selected_entries():
    link = treefmt.Entry(b"a", treefmt.SYMLINK, 0o777, 0, 0, 5, 1, b"b")
    file = treefmt.Entry(b"b", treefmt.FILE, 0o644, 0, 0, 5, 3, hash_bytes(b"abc"))
    exe = treefmt.Entry(b"c", treefmt.FILE, 0o755, 0, 0, 5, 3, hash_bytes(b"abc"))
    data = treefmt.encode([link, file, exe])
    assert treefmt.decode(data, lambda kind, mode: mode & 0o111) == [link, exe]
    bad = treefmt.encode([link, exe._replace(ref=b"short")])
    with pytest.raises(treefmt.TreeFormatError):
        treefmt.decode(bad, lambda kind, mode: kind == treefmt.FILE)
    assert treefmt.decode(bad, lambda kind, mode: kind == treefmt.SYMLINK) == [link]


def test_import_checkout_roundtrip_keeps_everything(store: Store, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    make_rich_dir(src)
    cap_net_raw = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    os.setxattr(src / "exec.sh", "security.capability", cap_net_raw)
    digest = import_directory(store, src)
    assert import_directory(store, src) == digest  # deterministic
    out = tmp_path / "out"
    checkout(store, digest, out)
    assert differences(describe(src), describe(out)) == []
    # describe() leaves security.* out; a capability must survive the chown
    assert os.getxattr(out / "exec.sh", "security.capability") == cap_net_raw


def test_sparse_file_over_4gib_keeps_holes(store: Store, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big.img"
    with open(big, "wb") as f:
        f.seek(5 * 1024**3)
        f.write(b"tail")
        f.seek(1024)
        f.write(b"head")
    digest = import_directory(store, src)
    entry = store.get_tree(digest)[0]
    assert entry.size == 5 * 1024**3 + 4
    assert os.stat(store.blob_path(entry.ref)).st_blocks * 512 < 1024**2  # stored sparse
    out = tmp_path / "out"
    checkout(store, digest, out)
    st = os.stat(out / "big.img")
    assert st.st_size == entry.size and st.st_blocks * 512 < 1024**2
    with open(out / "big.img", "rb") as f:
        f.seek(1024)
        assert f.read(4) == b"head"
        f.seek(5 * 1024**3)
        assert f.read() == b"tail"


def test_checkout_refuses_non_empty_target(store: Store, tmp_path: Path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("mine")
    with pytest.raises(CheckoutError):
        checkout(store, treefmt.EMPTY_TREE, tmp_path / "busy")
    assert (tmp_path / "busy/file").read_text() == "mine"


def test_diff_reports_changes_and_walks_only_differing_subtrees(store: Store, tmp_path: Path):
    a = tmp_path / "a"
    for i in range(20):
        (a / f"dir{i}").mkdir(parents=True)
        (a / f"dir{i}/f").write_text(str(i))
    (a / "gone").write_text("x")
    old = import_directory(store, a)
    (a / "dir3/f").write_text("changed")
    (a / "dir7/new").write_text("new")
    os.unlink(a / "gone")
    for i in range(20):  # keep directory mtimes equal so only real changes show
        os.utime(a / f"dir{i}", ns=(0, 0))
    os.utime(a, ns=(0, 0))
    new = import_directory(store, a)

    reads = []
    real_get = store.get_tree
    store.get_tree = lambda d: reads.append(d) or real_get(d)  # count tree reads
    changes = [(c.kind, c.path) for c in diff_trees(store, old, new)]
    assert (MODIFIED, b"dir3/f") in changes
    assert (ADDED, b"dir7/new") in changes
    assert (DELETED, b"gone") in changes
    # root pair + dir3 pair + dir7 pair: unchanged subtrees are never read
    assert len(reads) == 6


def test_fsck_finds_corruption(store: Store):
    with store.batch() as batch:
        digest = store.put_blob_bytes(b"precious", batch)
    assert store.fsck().clean
    path = store.blob_path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"tampered")
    report = store.fsck()
    assert not report.clean
    assert report.corrupt == [f"blobs/{digest.hex()[:2]}/{digest.hex()}"]


def test_from_hex_rejects_garbage():
    with pytest.raises(ValueError):
        from_hex("../etc/passwd")
    with pytest.raises(ValueError):
        from_hex("zz" * 32)


def test_an_aborted_batch_does_not_make_a_tree_look_present(store: Store):
    entry = treefmt.Entry(b"f", treefmt.FILE, 0o644, 0, 0, 0, 0, hash_bytes(b""))
    with pytest.raises(RuntimeError), store.batch() as batch:
        digest = store.put_tree([entry], batch)
        assert store.get_tree(digest) == [entry]  # readable while its batch lives
        raise RuntimeError("abort")
    assert not store.has_tree(digest)
    with store.batch() as batch:
        assert store.put_tree([entry], batch) == digest
    assert store.has_tree(digest)  # written this time
