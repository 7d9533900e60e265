"""The lower filesystem model, without a kernel."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from amber.sandbox.importer import import_directory
from amber.sandbox.lowerfs import METACOPY, REDIRECT, ROOT_INODE, LowerError, LowerModel
from amber.sandbox.store import Store
from amber.sandbox.userns import IdMap


@pytest.fixture
def model(store: Store, tmp_path: Path) -> LowerModel:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir/file").write_text("content")
    os.link(src / "dir/file", src / "dir/hard")
    os.symlink("dir/file", src / "sym")
    os.setxattr(src / "dir/file", "user.k", b"v")
    os.chown(src / "dir/file", 0, 0)
    return LowerModel(store, import_directory(store, src), ids=IdMap(100000, 65536))


def test_lookup_and_negative_lookup(model: LowerModel):
    d = model.lookup(ROOT_INODE, b"dir")
    assert d is not None and stat.S_ISDIR(d.mode)
    assert model.lookup(ROOT_INODE, b"missing") is None
    with pytest.raises(LowerError) as err:
        model.lookup(model.lookup(d.ino, b"file").ino, b"x")
    assert err.value.errno == errno.ENOTDIR


def test_hard_links_share_an_inode(model: LowerModel):
    d = model.lookup(ROOT_INODE, b"dir")
    a, b = model.lookup(d.ino, b"file"), model.lookup(d.ino, b"hard")
    assert a.ino == b.ino and a.nlink == 2


def test_ids_are_shifted_to_the_sandbox_range(model: LowerModel):
    f = model.lookup(model.lookup(ROOT_INODE, b"dir").ino, b"file")
    assert (f.uid, f.gid) == (100000, 100000)


def test_files_redirect_to_the_data_layer(model: LowerModel, store: Store):
    f = model.lookup(model.lookup(ROOT_INODE, b"dir").ino, b"file")
    assert model.getxattr(f.ino, METACOPY) == b""
    redirect = model.getxattr(f.ino, REDIRECT).decode()
    assert (store.blob_dir / redirect.lstrip("/")).read_bytes() == b"content"
    assert model.getxattr(f.ino, b"user.k") == b"v"
    assert model.listxattr(f.ino) == [b"user.k"]
    with pytest.raises(LowerError):
        model.getxattr(f.ino, b"user.absent")


def test_readdir_resumes_at_offsets(model: LowerModel):
    rows = list(model.readdir(ROOT_INODE, 0))
    assert [r[0] for r in rows] == [b"dir", b"sym"]
    assert [r[0] for r in model.readdir(ROOT_INODE, rows[0][2])] == [b"sym"]
    sym = model.lookup(ROOT_INODE, b"sym")
    assert model.readlink(sym.ino) == b"dir/file"


def test_lower_is_read_only(model: LowerModel):
    f = model.lookup(model.lookup(ROOT_INODE, b"dir").ino, b"file")
    with pytest.raises(LowerError) as err:
        model.check_open(f.ino, os.O_WRONLY)
    assert err.value.errno == errno.EROFS
    assert model.read(f.ino, 2, 3) == b"nte"


def test_serving_data_the_files_are_plain_and_read_from_their_blobs(
    store: Store, model: LowerModel
):
    """The fuse-data mode (kernels without data-only layers): no stubs."""
    plain = LowerModel(store, model.entry(ROOT_INODE).ref, serve_data=True)
    f = plain.lookup(plain.lookup(ROOT_INODE, b"dir").ino, b"file")
    for name in (METACOPY, REDIRECT):
        with pytest.raises(LowerError) as err:
            plain.getxattr(f.ino, name)
        assert err.value.errno == errno.ENODATA
    assert plain.getxattr(f.ino, b"user.k") == b"v"
    assert plain.read(f.ino, 0, 100) == b"content"
    with pytest.raises(LowerError) as err:
        plain.read(plain.lookup(ROOT_INODE, b"dir").ino, 0, 1)
    assert err.value.errno == errno.EINVAL


def test_a_blob_lost_from_the_store_reads_as_eio_not_as_a_short_file(
    store: Store, model: LowerModel
):
    f = model.lookup(model.lookup(ROOT_INODE, b"dir").ino, b"file")
    os.unlink(store.blob_path(model.entry(f.ino).ref))
    with pytest.raises(LowerError) as err:
        model.read(f.ino, 0, 100)
    assert err.value.errno == errno.EIO
