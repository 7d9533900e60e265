"""Exporting the same state again: the same bytes, and layer digests remembered but never trusted blindly.

A user's export (uid 4242 through the real amberd, so the writer runs under
the user's filesystem identity and its hash thread must still read the
store) is written twice and compared byte for byte; skopeo reads it and
amber's own import checks every digest of it. Then the daemon's table of
known layer digests (``layer-digests.db``) is damaged the ways a row can be:
a digest changed under its row check, and a row whose check was redone over
a wrong digest and size. Neither may change a byte of the export. A row
that is wrong in digest alone but checks out is used as it is, which is
what shows the table is read at all.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from amberd_process import cleanup_root, make_root
from second_user import Mal, mal_daemon
from tools import run

from amber.daemon.oci import digests
from amber.daemon.oci.digests import row_check
from amber.daemon.oci.image import export_image, read_image
from amber.daemon.oci.layer import KnownLayer, write_layer
from amber.daemon.oci.spec import ImageConfig
from amber.daemon.oci.stream import stream_docker_archive
from amber.daemon.oci.tarstream import file_copier
from amber.sandbox.importer import import_directory
from amber.sandbox.store import MissingObject, Store

SPEC = """
[build]
name = "twice"
base = "host"

[[step]]
name = "fill"
run = "head -c 3000000 /dev/urandom > big && head -c 70000 /dev/urandom > medium && echo small > small && exit 1"
"""
FORGED = "sha256:" + "ab" * 32
CONFIG = ImageConfig(created="2024-05-01T12:00:00Z")


@pytest.fixture(scope="module")
def exported() -> Iterator[tuple[Mal, str, bytes]]:
    """mal's frozen build and the bytes of its first export."""
    root = make_root()
    try:
        with mal_daemon(root) as mal:
            spec = mal.write("spec/spec.toml", SPEC)
            os.chown(spec.parent, mal.uid, mal.uid)
            report = json.loads(mal.amber("build", "--json", spec).stdout)
            assert report["frozen"], report
            yield mal, report["build"], export(mal, report["build"], "first.tar")
    finally:
        cleanup_root(root)


def export(mal: Mal, build: str, name: str) -> bytes:
    out = mal.home / name
    done = mal.amber("export", build, "-o", out)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def rows(mal: Mal) -> sqlite3.Connection:
    return sqlite3.connect(mal.daemon.state / "layer-digests.db", isolation_level=None)


def forge_rows(mal: Mal, size_off_by: int) -> None:
    """Every row made to say FORGED (and a size that much off), with a check that agrees."""
    with rows(mal) as db:
        for key, size in db.execute("SELECT key, size FROM layers").fetchall():
            size += size_off_by
            db.execute("UPDATE layers SET diff_id = ?, size = ?, check_ = ? WHERE key = ?",
                       (FORGED, size, row_check(key, FORGED, size), key))  # fmt: skip


def test_a_second_export_is_the_same_bytes_and_loads(exported, tmp_path: Path):
    mal, build, first = exported
    time.sleep(1.1)  # a new second: an export stamped with its own time would differ now
    second = export(mal, build, "second.tar")
    assert second == first
    info = json.loads(run(["skopeo", "inspect", f"oci-archive:{mal.home / 'second.tar'}"]).stdout)
    assert info["Labels"]["org.amber.build"] == build and len(info["Layers"]) == 2
    image = read_image(
        mal.home / "second.tar", Store.open(tmp_path / "state")
    )  # checks every digest
    assert len(image.trees) == 2


def test_a_damaged_row_is_no_row(exported):
    mal, build, first = exported
    with rows(mal) as db:
        assert db.execute("UPDATE layers SET diff_id = ?", (FORGED,)).rowcount == 2
    assert export(mal, build, "damaged.tar") == first


def test_a_row_that_checks_out_but_lies_about_the_size_is_rehashed(exported):
    mal, build, first = exported
    forge_rows(mal, size_off_by=512)
    assert export(mal, build, "resized.tar") == first


def test_a_row_that_checks_out_is_used_without_hashing(exported):
    """The control for the two above: the table is read, so they prove something."""
    mal, build, first = exported
    forge_rows(mal, size_off_by=0)
    trusted = export(mal, build, "trusted.tar")
    assert trusted != first and FORGED.encode() in trusted
    with rows(mal) as db:
        db.execute("DELETE FROM layers")
    assert export(mal, build, "again.tar") == first


def test_a_blob_gone_behind_amber_s_back_fails_the_export_as_incomplete(exported):
    """No walk proves the state whole before the export: the writing finds what is gone."""
    mal, build, first = exported
    blobs = Store(mal.daemon.state).blob_dir
    big = max(blobs.rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    aside = big.with_name(big.name + ".aside")
    big.rename(aside)
    try:
        done = mal.amber("export", build, "-o", mal.home / "gone.tar")
        assert done.returncode != 0
        assert b"no longer complete" in done.stderr, done.stderr
        assert not (mal.home / "gone.tar").exists()
    finally:
        aside.rename(big)
    assert export(mal, build, "back.tar") == first


# -- the writer alone -----------------------------------------------------------------


@pytest.fixture
def layers(store: Store, tmp_path: Path) -> list[tuple[bytes | None, bytes]]:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/big").write_bytes(os.urandom(5 << 20))
    (src / "d/medium").write_bytes(os.urandom(64 << 10))
    (src / "d/small").write_bytes(b"small\n")
    first = import_directory(store, src)
    (src / "d/later").write_bytes(os.urandom(200 << 10))
    return [(None, first), (first, import_directory(store, src))]


def test_known_digests_and_stale_ones_write_the_same_file(store: Store, layers, tmp_path: Path):
    fresh = export_image(store, layers, CONFIG, tmp_path / "fresh.tar")
    known = {
        spec: KnownLayer(i.diff_id, i.size) for spec, i in zip(layers, fresh.layers, strict=True)
    }
    export_image(store, layers, CONFIG, tmp_path / "known.tar", known=known)
    stale = {spec: KnownLayer(FORGED, k.size - 512) for spec, k in known.items()}
    export_image(store, layers, CONFIG, tmp_path / "stale.tar", known=stale)
    data = (tmp_path / "fresh.tar").read_bytes()
    assert (tmp_path / "known.tar").read_bytes() == data
    assert (tmp_path / "stale.tar").read_bytes() == data
    assert len(read_image(tmp_path / "fresh.tar", store).trees) == 2


def test_a_stream_copied_into_a_pipe_is_the_stream_written(store: Store, layers):
    plain = io.BytesIO()
    want = stream_docker_archive(store, layers, CONFIG, plain.write, tag="x:1")
    read_fd, write_fd = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_drain(read_fd)))
    reader.start()
    with open(write_fd, "wb", buffering=1 << 20) as f:
        piped = stream_docker_archive(
            store, layers, CONFIG, f.write, tag="x:1", copy=file_copier(f)
        )
    reader.join()
    assert hashlib.sha256(got).digest() == hashlib.sha256(plain.getvalue()).digest()
    assert piped.size == want.size == len(got)
    assert piped.config_digest == want.config_digest


def _drain(fd: int) -> bytes:
    parts = []
    with open(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            parts.append(chunk)
    return b"".join(parts)


def test_a_row_is_keyed_by_both_trees_and_the_writers_source(monkeypatch: pytest.MonkeyPatch):
    a, b = bytes(32), bytes([1]) * 32
    keys = {digests.layer_key(None, a), digests.layer_key(b, a), digests.layer_key(a, b)}
    assert len(keys) == 3
    before = digests.layer_key(b, a)
    monkeypatch.setattr(digests, "_WRITER", hashlib.sha256(b"another layer writer").digest())
    assert digests.layer_key(b, a) != before


def test_an_output_sendfile_refuses_gets_plain_writes(store: Store, layers, tmp_path: Path):
    """sendfile(2) will not write to an O_APPEND file: the copy falls back to read and write."""
    plain = io.BytesIO()
    stream_docker_archive(store, layers, CONFIG, plain.write, tag="x:1")
    with open(tmp_path / "appended.tar", "ab") as f:
        stream_docker_archive(store, layers, CONFIG, f.write, tag="x:1", copy=file_copier(f))
    assert (tmp_path / "appended.tar").read_bytes() == plain.getvalue()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a disk that fills up half way through a layer."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        run(["umount", str(mnt)])


def _layer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("layer-")]


def test_a_full_disk_fails_the_export_and_leaves_no_thread(store: Store, layers, tiny_fs: Path):
    """The writes happen on a thread of their own: their error must still reach the export."""
    for compression in ("none", "gzip"):
        # Unbuffered: no write left for closing the file to fail on, on this thread.
        with pytest.raises(OSError) as caught, open(tiny_fs / "layer", "wb", buffering=0) as f:
            write_layer(store, *layers[0], f, compression=compression)  # type: ignore[arg-type]
        assert caught.value.errno == errno.ENOSPC
        assert _layer_threads() == []
        (tiny_fs / "layer").unlink()
    with pytest.raises(OSError) as caught:
        export_image(store, layers, CONFIG, tiny_fs / "full.tar")
    assert caught.value.errno == errno.ENOSPC
    assert list(tiny_fs.iterdir()) == []  # the part file is gone too
    assert _layer_threads() == []


def test_a_blob_gone_from_the_store_fails_the_export_and_leaves_no_thread(
    store: Store, layers, tmp_path: Path
):
    """A big file is opened where it is copied and hashed, off the walk: its error still comes back."""
    fresh = export_image(store, layers, CONFIG, tmp_path / "fresh.tar")
    known = {s: KnownLayer(i.diff_id, i.size) for s, i in zip(layers, fresh.layers, strict=True)}
    big = max(store.blob_dir.rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    assert big.stat().st_size == 5 << 20
    big.unlink()
    out = tmp_path / "out"
    out.mkdir()
    for digests_known in (None, known):  # hashed (the write thread), and known (inline)
        with pytest.raises(MissingObject):
            export_image(store, layers, CONFIG, out / "image.tar", known=digests_known)
        assert list(out.iterdir()) == []
        assert _layer_threads() == []


def test_a_reader_going_away_fails_the_stream(store: Store, layers):
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=lambda: (os.read(read_fd, 1 << 16), os.close(read_fd)))
    reader.start()
    with pytest.raises(BrokenPipeError), open(write_fd, "wb", buffering=1 << 20) as f:
        stream_docker_archive(store, layers, CONFIG, f.write, tag="x:1", copy=file_copier(f))
    reader.join()
    assert _layer_threads() == []
