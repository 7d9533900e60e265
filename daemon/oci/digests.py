"""Layer digests remembered from earlier exports, so exporting the same trees again hashes nothing.

Two tables: ``layers``, the uncompressed layers of ``amber export -o`` and
``--to-engine`` (their diff_id and size: the bytes are written again, the
hash is skipped), and ``pushed``, the compressed layers of ``amber export
--push`` (blob digest, diff_id, size and media type: when the registry has
that blob already, the layer is neither written nor hashed nor sent).

A layer's uncompressed bytes are a function of its two trees (content
addresses of everything in them, blobs included) and of the code that writes
them (``layer``, ``tar``, the tree format). So the row of a layer is keyed
by a digest of exactly that: the before and after trees and a fingerprint
of those modules' source. A changed writer gets new keys and hashes afresh:
a row cannot outlive the bytes it describes.

What the key cannot cover is the row itself being damaged (a disk, a hand
in the file). So each row carries a SHA-256 over its key and values, checked
on every read: a row that does not match is no row, and the layer is hashed
as if never seen. The size is checked twice more: against the bytes the
writer actually produced (``StaleDigest``) and, for a stream, against the
size the trees promise before anything is written.

The rows live in ``layer-digests.db`` in the state directory, root's alone
like the rest of it; they are read before an export and written after it,
on the daemon's own thread, never under a user's filesystem identity.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path

from amber.daemon.oci import gzip as oci_gzip
from amber.daemon.oci import layer as oci_layer
from amber.daemon.oci import tar as oci_tar
from amber.daemon.oci import tarstream
from amber.daemon.oci.layer import KnownLayer, LayerInfo
from amber.daemon.oci.spec import OCI_LAYER_GZIP
from amber.sandbox import tree as treefmt

LayerSpec = tuple[bytes | None, bytes]
MAX_ROWS = 10_000
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    key TEXT PRIMARY KEY,          -- sha256 of (writer, before tree, after tree)
    diff_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    used REAL NOT NULL,
    check_ TEXT NOT NULL           -- sha256 of key, diff_id and size: a damaged row is no row
);
CREATE TABLE IF NOT EXISTS pushed (
    key TEXT PRIMARY KEY,          -- sha256 of (writer, compressor, compression, level, trees)
    digest TEXT NOT NULL,          -- of the compressed blob
    diff_id TEXT NOT NULL,
    size INTEGER NOT NULL,         -- of the compressed blob
    media_type TEXT NOT NULL,
    used REAL NOT NULL,
    check_ TEXT NOT NULL
)
"""
#: push_image's ``layer_cache`` key: (tree before or b"", tree after, compression, level)
PushKey = tuple[bytes, bytes, str, int]


def _writer_fingerprint() -> bytes:
    """The source of everything that decides a layer's bytes."""
    h = hashlib.sha256()
    for module in (oci_layer, oci_tar, tarstream, treefmt):
        h.update(Path(module.__file__ or "").read_bytes())
    return h.digest()


_WRITER = _writer_fingerprint()


def layer_key(before: bytes | None, after: bytes) -> str:
    """The row's key: the writer, and the two trees (no before: the first layer)."""
    h = hashlib.sha256(b"amber uncompressed layer\0" + _WRITER)
    h.update(b"\0" if before is None else b"\1" + before)
    h.update(after)
    return h.hexdigest()


def row_check(key: str, diff_id: str, size: int) -> str:
    return hashlib.sha256(f"{key}\0{diff_id}\0{size}".encode()).hexdigest()


_COMPRESSOR = hashlib.sha256(Path(oci_gzip.__file__ or "").read_bytes()).digest()


def pushed_key(key: PushKey) -> str:
    """A compressed layer's row key: ``layer_key``'s, and the compressor's source and settings."""
    before, after, compression, level = key
    h = hashlib.sha256(b"amber compressed layer\0" + _COMPRESSOR)
    h.update(f"{compression}\0{level}\0".encode())
    h.update(layer_key(before or None, after).encode())
    return h.hexdigest()


def pushed_check(key: str, info: LayerInfo) -> str:
    return hashlib.sha256(
        f"{key}\0{info.digest}\0{info.diff_id}\0{info.size}\0{info.media_type}".encode()
    ).hexdigest()


class LayerDigests:
    """The table of known layers; one short connection per call."""

    def __init__(self, path: Path):
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5)
        conn.executescript(_SCHEMA)
        return conn

    def lookup(self, layers: Sequence[LayerSpec]) -> dict[LayerSpec, KnownLayer]:
        """The layers among ``layers`` exported before, by a row that checks out."""
        keys = {layer_key(b, a): (b, a) for b, a in layers}
        found: dict[LayerSpec, KnownLayer] = {}
        with self._closing() as conn:
            for key, spec in keys.items():
                row = conn.execute(
                    "SELECT diff_id, size, check_ FROM layers WHERE key = ?", (key,)
                ).fetchone()
                if row is None:
                    continue
                diff_id, size, check = row
                if (
                    isinstance(diff_id, str)
                    and isinstance(size, int)
                    and _DIGEST.fullmatch(diff_id)
                    and check == row_check(key, diff_id, size)
                ):
                    found[spec] = KnownLayer(diff_id, size)
        return found

    def remember(self, layers: Sequence[LayerSpec], infos: Sequence[LayerInfo]) -> None:
        """Record the uncompressed layers just written (``infos`` in ``layers``' order)."""
        now = time.time()
        with self._closing() as conn:
            for (before, after), info in zip(layers, infos, strict=True):
                if info.digest != info.diff_id:
                    continue  # compressed: not what the key describes
                key = layer_key(before, after)
                conn.execute(
                    "INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?)",
                    (key, info.diff_id, info.size, now, row_check(key, info.diff_id, info.size)),
                )
            conn.execute(
                "DELETE FROM layers WHERE key IN "
                "(SELECT key FROM layers ORDER BY used DESC LIMIT -1 OFFSET ?)",
                (MAX_ROWS,),
            )

    def lookup_pushed(self, keys: Sequence[PushKey]) -> dict[PushKey, LayerInfo]:
        """The compressed layers among ``keys`` pushed before, by a row that checks out."""
        found: dict[PushKey, LayerInfo] = {}
        with self._closing() as conn:
            for spec in keys:
                key = pushed_key(spec)
                row = conn.execute(
                    "SELECT digest, diff_id, size, media_type, check_ FROM pushed WHERE key = ?",
                    (key,),
                ).fetchone()
                if row is None or not all(isinstance(v, str) for v in (*row[:2], *row[3:])):
                    continue
                digest, diff_id, size, media_type, check = row
                if not isinstance(size, int) or media_type != OCI_LAYER_GZIP:
                    continue
                info = LayerInfo(digest, diff_id, size, media_type)
                if (
                    _DIGEST.fullmatch(digest)
                    and _DIGEST.fullmatch(diff_id)
                    and check == pushed_check(key, info)
                ):
                    found[spec] = info
        return found

    def remember_pushed(self, layers: Mapping[PushKey, LayerInfo]) -> None:
        """Record the compressed layers of a push (``push_image``'s ``layer_cache``)."""
        now = time.time()
        with self._closing() as conn:
            for spec, info in layers.items():
                if info.media_type != OCI_LAYER_GZIP:
                    continue
                key = pushed_key(spec)
                conn.execute(
                    "INSERT OR REPLACE INTO pushed VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, info.digest, info.diff_id, info.size, info.media_type, now,
                     pushed_check(key, info)),
                )  # fmt: skip
            conn.execute(
                "DELETE FROM pushed WHERE key IN "
                "(SELECT key FROM pushed ORDER BY used DESC LIMIT -1 OFFSET ?)",
                (MAX_ROWS,),
            )

    def _closing(self) -> closing[sqlite3.Connection]:
        return closing(self._connect())
