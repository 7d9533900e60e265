"""The eager layer on its own: what it makes of a tree, written to a plain directory."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
from pathlib import Path

from amber.sandbox import tree as treefmt
from amber.sandbox.eagerlayer import EagerLayer
from amber.sandbox.lowerfs import METACOPY, REDIRECT
from amber.sandbox.mounts import mount, umount
from amber.sandbox.store import Store
from amber.sandbox.tree import Entry
from amber.sandbox.userns import IdMap

T = 1_600_000_000_123_456_789
#: security.capability, version 2, effective: cap_net_raw (13) permitted.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
SHIFT = IdMap(100000, 65536)


def _tree(store: Store, *, dir_xattrs=(), exe_xattrs=()) -> tuple[bytes, bytes]:
    """usr/bin/{tool,tool-alias (hard link),README}, usr/lib/libz.so.1 -> libz.so.1.2.13."""
    with store.batch() as batch:
        exe = store.put_blob_bytes(b"#!/bin/sh\necho hi\n", batch)
        doc = store.put_blob_bytes(b"not executable", batch)

        def tool(name: bytes) -> Entry:
            return Entry(name, treefmt.FILE, 0o755, 0, 2, T, 18, exe, 0, exe_xattrs, b"tool")

        bin_tree = store.put_tree(
            [
                Entry(b"README", treefmt.FILE, 0o644, 0, 0, T, 14, doc),
                tool(b"tool"),
                tool(b"tool-alias"),
            ],
            batch,
        )
        lib_tree = store.put_tree(
            [Entry(b"libz.so.1", treefmt.SYMLINK, 0o777, 0, 0, T, 14, b"libz.so.1.2.13")], batch
        )
        usr = store.put_tree(
            [
                Entry(b"bin", treefmt.DIR, 0o750, 3, 4, T + 1, 0, bin_tree, 0, dir_xattrs),
                Entry(b"lib", treefmt.DIR, 0o755, 0, 0, T + 2, 0, lib_tree),
            ],
            batch,
        )
        root = store.put_tree([Entry(b"usr", treefmt.DIR, 0o755, 0, 0, T + 3, 0, usr)], batch)
    return root, exe


def test_directories_symlinks_and_executable_stubs_carry_the_trees_metadata(
    store: Store, tmp_path: Path
):
    caps = ((b"security.capability", CAP_NET_RAW), (b"user.note", b"x"))
    root, exe = _tree(store, exe_xattrs=caps)
    layer = tmp_path / "layer"
    layer.mkdir()
    stats = EagerLayer(store, SHIFT).fill(root, os.fsencode(layer))

    assert (stats.dirs, stats.symlinks, stats.executables, stats.left_to_lower) == (3, 1, 1, 0)
    assert sorted(os.listdir(layer / "usr/bin")) == ["tool", "tool-alias"]  # README stays lazy
    bin_st = os.stat(layer / "usr/bin")
    assert (stat.S_IMODE(bin_st.st_mode), bin_st.st_uid, bin_st.st_gid) == (0o750, 100003, 100004)
    assert bin_st.st_mtime_ns == T + 1  # set after its children were made
    assert os.lstat(layer / "usr").st_mtime_ns == T + 3
    link = os.lstat(layer / "usr/lib/libz.so.1")
    assert os.readlink(layer / "usr/lib/libz.so.1") == "libz.so.1.2.13"
    assert (link.st_uid, link.st_mtime_ns) == (100000, T)

    tool = layer / "usr/bin/tool"
    st = os.stat(tool)
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o755, 18)
    assert _holds_no_data(tool)  # a stub: the content stays in the store
    assert st.st_ino == os.stat(layer / "usr/bin/tool-alias").st_ino and st.st_nlink == 2
    assert os.getxattr(tool, METACOPY) == b""
    redirect = os.getxattr(tool, REDIRECT).decode()
    assert (store.blob_dir / redirect.lstrip("/")) == store.blob_path(exe)
    assert os.getxattr(tool, "user.note") == b"x"
    assert os.getxattr(tool, "security.capability") == CAP_NET_RAW  # chown came before it
    assert stat.S_IMODE(os.stat(tool).st_mode) == 0o755


def _holds_no_data(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    finally:
        os.close(fd)
    return False


def test_what_the_filesystem_refuses_is_left_to_the_lower(store: Store, tmp_path: Path):
    """An xattr outside every namespace cannot be set on any filesystem."""
    refused = ((b"bogus.namespace", b"v"),)
    for case, kwargs in (("file", {"exe_xattrs": refused}), ("dir", {"dir_xattrs": refused})):
        root, _ = _tree(store, **kwargs)
        layer = tmp_path / case
        layer.mkdir()
        stats = EagerLayer(store, SHIFT).fill(root, os.fsencode(layer))
        assert stats.left_to_lower == (2 if case == "file" else 1)
        if case == "file":
            assert os.listdir(layer / "usr/bin") == []
        else:  # the whole directory, with what was made inside it
            assert sorted(os.listdir(layer / "usr")) == ["lib"]


def test_a_full_layer_leaves_the_rest_to_the_lower(store: Store, tmp_path: Path):
    """Long symlink targets take a tmpfs page each; past the size cap the
    remaining entries are left to the FUSE lower instead of failing the mount."""
    targets = [f"{i:03d}-".encode() + b"t" * 300 for i in range(40)]
    with store.batch() as batch:
        links = [
            Entry(b"l%03d" % i, treefmt.SYMLINK, 0o777, 0, 0, T, len(t), t)
            for i, t in enumerate(targets)
        ]
        root = store.put_tree(
            [Entry(b"d", treefmt.DIR, 0o755, 0, 0, T, 0, store.put_tree(links, batch))], batch
        )
    layer = tmp_path / "layer"
    layer.mkdir()
    mount("test-eager", layer, "tmpfs", "size=64k")  # 16 pages
    try:
        stats = EagerLayer(store, SHIFT).fill(root, os.fsencode(layer))
        made = sorted(os.listdir(layer / "d"))
        assert 0 < stats.symlinks == len(made) < 40
        assert stats.left_to_lower == 40 - len(made)
        assert all(os.readlink(layer / "d" / name).encode() in targets for name in made)
    finally:
        umount(layer)


def test_promotion_skips_a_file_whose_directory_the_layer_left_to_the_lower(
    store: Store, tmp_path: Path
):
    root, _exe = _tree(store)
    layer = tmp_path / "layer"
    layer.mkdir()
    eager = EagerLayer(store, SHIFT)
    eager.fill(root, os.fsencode(layer))
    readme = next(e for e in store.get_tree(store.lookup_path(root, b"usr/bin").ref)
                  if e.name == b"README")  # fmt: skip
    shutil.rmtree(layer / "usr/lib")  # as if tmpfs had refused it: the FUSE lower serves it
    met = [(b"usr/bin/README", readme), (b"usr/lib/gone/README", readme)]
    assert eager.promote(os.fsencode(layer), met) == 1  # made under usr/bin, skipped the other
    assert _holds_no_data(layer / "usr/bin/README")
    assert not (layer / "usr/lib").exists()
