"""Images as files: export trees as an OCI or docker archive; import any image.

Export writes one tar in one pass. Each layer is streamed into the archive
right behind a placeholder header, which is filled in once the layer's size
and digest are known, so layers are neither held in memory nor written
twice. The ``oci`` format is an OCI layout (``oci-layout``, ``index.json``,
``blobs/sha256``) that also carries docker's ``manifest.json`` (as
``docker save`` has done since Docker 25), so ``podman load``, ``docker
load``, skopeo and umoci all take it. ``docker-archive`` is the classic
``docker save`` layout (``<id>/layer.tar``, ``<config>.json``,
``manifest.json``, ``repositories``).

Import (``read_image``) finds the image in a layout, an archive or a
registry, then applies its layers one by one onto a tree in the store,
checking every blob against its digest and every layer against the config's
``diff_ids`` as it streams by, and every uncompressed byte against the
import's ``Budget`` (``import-max-size``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import secrets
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar

from amber.daemon.oci import registry as oci_registry
from amber.daemon.oci import tar as oci_tar
from amber.daemon.oci.apply import Devices, TreeBuilder
from amber.daemon.oci.archive import compression_of, decompressed, open_local
from amber.daemon.oci.auth import Credentials
from amber.daemon.oci.layer import Compression, KnownLayer, LayerInfo, StaleDigest, write_layer
from amber.daemon.oci.limits import MAX_IMPORT, Budget
from amber.daemon.oci.spec import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    ImageParts,
    LayerBlob,
    OciError,
    canonical_json,
    digest_hex,
    display_reference,
    image_manifest,
    index_json,
    parse_reference,
    qualified_name,
    rfc3339,
    sha256_digest,
)
from amber.daemon.oci.tarstream import Copy, file_copier
from amber.sandbox import tree as treefmt
from amber.sandbox.asuser import UserReader
from amber.sandbox.store import Store

Format = Literal["oci", "docker-archive"]
_T = TypeVar("_T")
#: (tree before the layer or None for the first, tree after it)
LayerSpec = tuple[bytes | None, bytes]


@dataclass(frozen=True)
class ExportResult:
    path: Path | None  # None when written to a given file object
    format: str
    manifest_digest: str
    config_digest: str
    layers: list[LayerInfo]
    size: int  # bytes of the archive
    name: str | None  # the image name loaders will show


@dataclass
class ImportedImage:
    trees: list[bytes]  # the root tree after each layer
    config: ImageConfig
    diff_ids: list[str]
    name: str | None
    manifest_digest: str | None


def export_image(
    store: Store,
    layers: Sequence[LayerSpec],
    config: ImageConfig,
    out_path: Path | BinaryIO,
    format: Format = "oci",
    *,
    ref: str | None = None,
    compression: Compression = "none",
    level: int = 1,
    threads: int | None = None,
    known: Mapping[LayerSpec, KnownLayer] | None = None,
) -> ExportResult:
    """Write the image whose layers are the diffs ``layers`` to ``out_path``.

    ``ref`` (``amber/BUILD:STEP``) names the image for loaders; a name without
    a registry becomes ``localhost/NAME`` so docker and podman show the same,
    and characters a reference may not hold become ``-`` (the result's
    ``name`` says what loaders will show). A path gets the file only when
    complete (written aside, then renamed).
    ``out_path`` may instead be an open, seekable binary file, written from
    its current position: a daemon running as root can write to a file the
    client opened and passed over the socket, rather than to a path a client
    named.

    Layers are uncompressed by default, as ``docker save`` and ``podman save``
    write them: a local archive is written and loaded fastest that way. The
    diff_ids ``known`` from earlier exports (``LayerDigests``) are not hashed.
    """
    if format not in ("oci", "docker-archive"):
        raise ValueError(f"unknown export format {format!r}")
    if not layers:
        raise ValueError("an image needs at least one layer")
    name = qualified_name(display_reference(ref)) if ref else None
    config = replace(config, created=config.created or rfc3339())

    how = _Layers(store, compression, level, threads, known or {})

    def write(f: BinaryIO) -> tuple[tuple[str, str, list[LayerInfo]], int]:
        start = f.tell()
        out = _ArchiveOut(f)
        result = _write_archive(out, how, layers, config, format, name)
        out.finish()
        f.flush()
        return result, f.tell() - start

    if not isinstance(out_path, (str, Path)):
        (manifest_digest, config_digest, infos), size = write(out_path)
        return ExportResult(None, format, manifest_digest, config_digest, infos, size, name)
    out_path = Path(out_path)
    (manifest_digest, config_digest, infos), size = _write_aside(out_path, write)
    return ExportResult(out_path, format, manifest_digest, config_digest, infos, size, name)


def _write_aside(path: Path, write: Callable[[BinaryIO], _T]) -> _T:
    """``write`` a new file beside ``path``, renamed to it once whole."""
    part = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    try:
        with open(part, "wb", buffering=1 << 20) as f:
            result = write(f)
        # Unlinking first spares ext4's flush of data renamed over a file.
        path.unlink(missing_ok=True)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return result


@dataclass(frozen=True)
class _Layers:
    """How the layers of an archive are written."""

    store: Store
    compression: Compression
    level: int
    threads: int | None
    known: Mapping[LayerSpec, KnownLayer]

    def producer(
        self, before: bytes | None, after: bytes
    ) -> Callable[[Callable[[bytes], object], Copy | None, bool], LayerInfo]:
        """``produce`` for ``_ArchiveOut.add_streamed``: the layer, with its known digest unless ``fresh``."""
        hint = self.known.get((before, after)) if self.compression == "none" else None

        def produce(write: Callable[[bytes], object], copy: Copy | None, fresh: bool) -> LayerInfo:
            return write_layer(self.store, before, after, write, compression=self.compression,
                               level=self.level, threads=self.threads, copy=copy,
                               known=None if fresh else hint)  # fmt: skip

        return produce


def _write_archive(
    out: _ArchiveOut,
    how: _Layers,
    layers: Sequence[LayerSpec],
    config: ImageConfig,
    format: Format,
    name: str | None,
) -> tuple[str, str, list[LayerInfo]]:
    oci = format == "oci"
    if oci:
        out.add_dir("blobs/")
        out.add_dir("blobs/sha256/")
        out.add("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
    infos: list[LayerInfo] = []
    paths: list[str] = []
    for before, after in layers:
        info = out.add_streamed(
            lambda i: (
                f"blobs/sha256/{digest_hex(i.digest)}"
                if oci
                else f"{digest_hex(i.digest)}/layer.tar"
            ),
            how.producer(before, after),
        )
        infos.append(info)
        paths.append(out.last_name)
    config_blob = config.to_json([i.diff_id for i in infos])
    manifest, manifest_blob = image_manifest(
        config_blob, [i.descriptor() for i in infos], config.created
    )
    config_digest = manifest.config.digest
    manifest_digest = sha256_digest(manifest_blob)
    tags = [name] if name else []
    if oci:
        config_path = f"blobs/sha256/{digest_hex(config_digest)}"
        out.add(config_path, config_blob)
        out.add(f"blobs/sha256/{digest_hex(manifest_digest)}", manifest_blob)
        annotations = {}
        if name:
            annotations = {
                ANNOTATION_IMAGE_NAME: name,
                ANNOTATION_REF_NAME: parse_reference(name).tag or "latest",
            }
        desc = Descriptor(OCI_MANIFEST, manifest_digest, len(manifest_blob), annotations)
        out.add("index.json", index_json([desc]))
    else:
        config_path = f"{digest_hex(config_digest)}.json"
        out.add(config_path, config_blob)
        if name:
            repo, _, tag = name.rpartition(":")
            top = digest_hex(infos[-1].digest)
            out.add("repositories", canonical_json({repo: {tag: top}}))
    docker_manifest = [{"Config": config_path, "RepoTags": tags, "Layers": paths}]
    out.add("manifest.json", json.dumps(docker_manifest, separators=(",", ":")).encode())
    return manifest_digest, config_digest, infos


class _ArchiveOut:
    """The archive being written; each name is written once."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._copy = file_copier(f)
        self._names: set[str] = set()
        self.last_name = ""

    def add_dir(self, name: str) -> None:
        self._f.write(oci_tar.header(name.encode(), b"5", mode=0o755))
        self._names.add(name)

    def add(self, name: str, data: bytes) -> None:
        self.last_name = name
        if name in self._names:
            return
        self._names.add(name)
        self._f.write(oci_tar.header(name.encode(), b"0", size=len(data)))
        self._f.write(data)
        self._f.write(oci_tar.padding(len(data)))

    def add_streamed(
        self,
        name_of: Callable[[LayerInfo], str],
        produce: Callable[[Callable[[bytes], object], Copy | None, bool], LayerInfo],
    ) -> LayerInfo:
        """Stream a member of unknown size; drop it if its name is taken.

        ``produce(write, copy, fresh)`` writes it; when a known digest turns
        out stale, the member is written again with ``fresh`` set.
        """
        start = self._f.tell()
        self._f.write(bytes(oci_tar.BLOCK))
        try:
            info = produce(self._f.write, self._copy, False)
        except StaleDigest:
            self._f.seek(start)
            self._f.truncate()
            self._f.write(bytes(oci_tar.BLOCK))
            info = produce(self._f.write, self._copy, True)
        end = self._f.tell()
        name = self.last_name = name_of(info)
        if name in self._names:  # the same layer twice (two steps that changed nothing)
            self._f.seek(start)
            self._f.truncate()
            return info
        self._names.add(name)
        self._f.seek(start)
        self._f.write(oci_tar.header(name.encode(), b"0", size=info.size))
        self._f.seek(end)
        self._f.write(oci_tar.padding(info.size))
        return info

    def finish(self) -> None:
        self._f.write(oci_tar.END_OF_ARCHIVE)


# -- import ------------------------------------------------------------------------


def read_image(
    source: Path | str,
    store: Store,
    *,
    insecure: bool = False,
    tag: str | None = None,
    devices: Devices = "refuse",
    max_size: int = MAX_IMPORT,
    credentials: Credentials | None = None,
    reader: UserReader | None = None,
) -> ImportedImage:
    """Import the image at ``source`` into ``store``: one tree per layer.

    ``source`` is an OCI layout directory, an OCI or docker archive file
    (``podman save``, ``amber export``), or a registry reference
    (``127.0.0.1:5000/name:tag``; plain HTTP for localhost or ``insecure``).
    Nothing is written anywhere but the store, and nothing is committed to
    the store unless every layer was accepted. Device nodes are refused, or
    left out with ``devices="drop"`` (for images one trusts that were made
    from a root with ``/dev`` filled in). The image may unpack to at most
    ``max_size`` bytes; a compressed archive is decompressed into the
    store's ``tmp``.
    """
    budget = Budget(max_size, store.tmp_dir)
    opened: AbstractContextManager[ImageParts]
    if is_local_source(source):
        path = Path(str(source).removeprefix("oci-archive:").removeprefix("docker-archive:"))
        opened = open_local(path, tag, budget, reader)
    else:
        opened = oci_registry.open_remote(str(source), insecure=insecure, credentials=credentials)
    with opened as parts:
        return apply_image(store, parts, devices=devices, budget=budget)


def is_local_source(source: Path | str) -> bool:
    """A path, unless it names a registry (``HOST[:PORT]/NAME``, ``docker://``).

    A bare ``name:tag`` would mean Docker Hub, which wants a token amber does
    not fetch, so a missing file is reported as that rather than as a
    failed download.
    """
    if isinstance(source, Path):
        return True
    if source.startswith("docker://"):
        return False
    if source.startswith(("oci-archive:", "docker-archive:")) or os.path.exists(source):
        return True
    first, slash, _ = source.partition("/")
    return not (slash and ("." in first or ":" in first or first == "localhost"))


def apply_image(
    store: Store, parts: ImageParts, *, devices: Devices = "refuse", budget: Budget | None = None
) -> ImportedImage:
    """Apply every layer of ``parts`` in order; trees are committed together."""
    budget = budget if budget is not None else Budget()
    config, diff_ids = ImageConfig.from_json(parts.config)
    if diff_ids and len(diff_ids) != len(parts.layers):
        raise OciError(f"config lists {len(diff_ids)} layers, the manifest {len(parts.layers)}")
    trees: list[bytes] = []
    with store.batch() as batch:
        builder = TreeBuilder(store, batch, devices=devices)
        for i, layer in enumerate(parts.layers):
            try:
                apply_layer(builder, layer, diff_ids[i] if diff_ids else None, budget)
            except OciError as exc:
                what = f"layer {i + 1} of {len(parts.layers)}"
                raise OciError(f"{what} ({layer.digest or 'no digest'}): {exc}") from None
            trees.append(builder.digest())
        builder.store_trees()
    if not trees:
        trees = [treefmt.EMPTY_TREE]
    return ImportedImage(trees, config, diff_ids, parts.name, parts.manifest_digest)


def apply_layer(
    builder: TreeBuilder, layer: LayerBlob, diff_id: str | None, budget: Budget | None = None
) -> None:
    """Stream one layer blob through decompression into ``builder``, verified,
    its uncompressed bytes counted against ``budget``."""
    with layer.open() as raw:
        blob = HashingReader(raw, limit=layer.size)
        magic = blob.peek(6)
        kind = compression_of(magic)
        try:
            with decompressed(blob, magic) as stream:  # type: ignore[arg-type]
                plain = blob if kind == "none" else HashingReader(stream)
                plain.count_against(budget)
                builder.apply(plain)  # type: ignore[arg-type]
                plain.drain()  # whatever follows the end-of-archive blocks
        except (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise OciError(f"corrupt {kind} stream: {exc}") from None
        blob.drain()
    if layer.size is not None and blob.count != layer.size:
        raise OciError(f"blob is {blob.count} bytes, its descriptor says {layer.size}")
    if layer.digest is not None and blob.digest() != layer.digest:
        raise OciError(f"blob content does not match its digest (got {blob.digest()})")
    if diff_id is not None and plain.digest() != diff_id:
        raise OciError(f"uncompressed layer does not match the config's diff_id {diff_id}")


class HashingReader:
    """A read-only stream that hashes (sha256) and counts what passes through."""

    def __init__(self, raw: BinaryIO, *, limit: int | None = None):
        self._raw = raw
        self._limit = limit
        self._budget: Budget | None = None
        self._hasher = hashlib.sha256()
        self._pending = b""
        self.count = 0

    def _pull(self, n: int) -> bytes:
        data = self._raw.read(n)
        if data:
            self._hasher.update(data)
            self.count += len(data)
            if self._limit is not None and self.count > self._limit:
                raise OciError(f"blob is longer than the {self._limit} bytes its descriptor says")
            if self._budget is not None:
                self._budget.spend(len(data))
        return data

    def count_against(self, budget: Budget | None) -> None:
        """Spend on ``budget`` what has passed through, and all that will."""
        if budget is not None:
            budget.spend(self.count)
        self._budget = budget

    def peek(self, n: int) -> bytes:
        while len(self._pending) < n:
            more = self._pull(n - len(self._pending))
            if not more:
                break
            self._pending += more
        return self._pending[:n]

    def read(self, n: int = -1) -> bytes:
        if self._pending:
            if n < 0 or n >= len(self._pending):
                data, self._pending = self._pending, b""
                if n < 0:
                    return data + self._read_all()
                return data
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        return self._read_all() if n < 0 else self._pull(n)

    def _read_all(self) -> bytes:
        parts = []
        while chunk := self._pull(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def drain(self) -> None:
        self._pending = b""
        while self._pull(1 << 20):
            pass

    def digest(self) -> str:
        return "sha256:" + self._hasher.hexdigest()

    @property
    def closed(self) -> bool:
        return False

    def readable(self) -> bool:
        return True
