"""One OCI layer from two trees: the diff as a tar stream with whiteouts.

Walks the two trees together (descending only where subtree digests
differ, so a layer costs what the step changed) and writes:

- added and modified entries as tar members, file content streamed from
  blobs; hard-link groups of the layer as one file plus tar hard links;
- deleted paths as ``.wh.<name>``;
- a directory replacing a non-directory, or a directory none of whose old
  names survive (``rm -rf d && mkdir d``), as the directory, an opaque
  ``.wh..wh..opq`` marker and its whole new content.

Exact metadata travels in PAX records: nanosecond mtimes, xattrs as
``SCHILY.xattr.*``, and amber's hard-link group label as ``AMBER.link`` (other
tools ignore vendor records), so importing an export gives back the very
same tree digests, except for what is never written (counted in
``skipped``): sockets; names starting with ``.wh.``, which would read as
whiteouts; and device nodes. A 0:0 character device is overlayfs' own
whiteout and must not leak into a layer, and the others are not needed:
container runtimes and amber's sandbox both provide ``/dev``, and import
refuses device nodes from untrusted layers, so an export that carried them
(a debootstrap root has ``/dev/null``) could not be imported again.

The uncompressed stream is hashed as it is made (the ``diff_id``), on a
thread of its own so that hashing overlaps copying (``tarstream``), unless an
earlier export of the same trees already told its digest; the compressed
one is hashed as it is written (the blob digest).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

from amber.daemon.oci import tar as oci_tar
from amber.daemon.oci.gzip import ParallelGzip
from amber.daemon.oci.spec import OCI_LAYER, OCI_LAYER_GZIP, Descriptor, OciError
from amber.daemon.oci.tarstream import Copy, TarStream, file_copier
from amber.sandbox import tree as treefmt
from amber.sandbox.fsidentity import as_store_owner
from amber.sandbox.store import Store, StoreError
from amber.sandbox.tree import Entry

Compression = Literal["gzip", "none"]
WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
LINK_RECORD = b"AMBER.link"
XATTR_RECORD = b"SCHILY.xattr."
_READ = 1 << 20
_TAR_TYPE = {
    treefmt.FILE: b"0",
    treefmt.SYMLINK: b"2",
    treefmt.FIFO: b"6",
    treefmt.DIR: b"5",
}


@dataclass(frozen=True)
class LayerInfo:
    """What a manifest and a config need to know about a written layer."""

    digest: str  # sha256 of the blob as stored (compressed)
    diff_id: str  # sha256 of the uncompressed tar
    size: int
    media_type: str
    entries: int = 0
    skipped: int = 0  # sockets, device nodes and .wh. names left out

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)


class _Sink:
    """The bytes of the blob: counted, hashed (unless told not to) and written."""

    def __init__(self, out: Callable[[bytes], object], *, hash_it: bool):
        self._out = out
        self.hasher = hashlib.sha256() if hash_it else None
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.hasher is not None:
            self.hasher.update(data)
        self.size += len(data)
        self._out(data)


@dataclass(frozen=True)
class KnownLayer:
    """An uncompressed layer's diff_id and size, from an earlier export of the same trees."""

    diff_id: str
    size: int


class StaleDigest(OciError):
    """The layer written is not the size its known digest was recorded for: hash it after all."""


def write_layer(
    store: Store,
    before: bytes | None,
    after: bytes,
    out: BinaryIO | Callable[[bytes], object],
    *,
    compression: Compression = "gzip",
    level: int = 1,
    threads: int | None = None,
    copy: Copy | None = None,
    known: KnownLayer | None = None,
) -> LayerInfo:
    """Write the layer turning ``before`` (None: nothing) into ``after`` to ``out``.

    ``out`` is a binary file or a write function; it receives the blob bytes
    exactly once, in order, and must use or copy them before it returns (the
    buffer is reused). Uncompressed, big files go through ``copy`` (made
    from ``out`` when it is a file with a descriptor) instead, by the kernel.
    ``known`` (uncompressed only) is the diff_id of an earlier export of the
    same trees: nothing is hashed, and ``StaleDigest`` is raised, once all is
    written, if the size disagrees.
    """
    if compression == "none" and copy is None and not callable(out):
        copy = file_copier(out)
    sink, gz, tar = _streams(store, out, compression, level, threads, copy, known is None)
    writer = _LayerWriter(store, tar)
    try:
        # Nothing in the walk opens a path but the store's (``out`` is open):
        # root's rights once for it, not twice per blob (``open_blob``).
        with as_store_owner():
            writer.diff_dir(before, after, b"")
        tar.write(oci_tar.END_OF_ARCHIVE)
        tar.finish()
        tar.close()
        if gz is not None:
            gz.close()
        diff_id = known.diff_id if tar.hasher is None else "sha256:" + tar.hasher.hexdigest()
    except BaseException:
        tar.close(discard=True)
        if gz is not None:
            gz.abort()
        raise
    if tar.hasher is None and known is not None and tar.size != known.size:
        raise StaleDigest(f"layer came to {tar.size} bytes, its known digest is of {known.size}")
    digest = diff_id if sink.hasher is None else "sha256:" + sink.hasher.hexdigest()
    return LayerInfo(
        digest=digest,
        diff_id=diff_id,
        size=sink.size if gz is not None else tar.size,  # copies bypass the sink
        media_type=OCI_LAYER_GZIP if gz is not None else OCI_LAYER,
        entries=writer.entries,
        skipped=writer.skipped,
    )


def _streams(
    store: Store,
    out: BinaryIO | Callable[[bytes], object],
    compression: Compression,
    level: int,
    threads: int | None,
    copy: Copy | None,
    hash_it: bool,
) -> tuple[_Sink, ParallelGzip | None, TarStream]:
    """The blob's sink, the compressor if any, and the tar stream feeding them."""
    write_out = out if callable(out) else out.write
    if compression == "gzip":
        sink = _Sink(write_out, hash_it=True)
        gz = ParallelGzip(sink.write, level=level, threads=threads)
        return sink, gz, TarStream(gz.write, None, store.open_blob, hash_it=True)
    if compression == "none":
        sink = _Sink(write_out, hash_it=False)  # the blob is the tar: one hash
        return sink, None, TarStream(sink.write, copy, store.open_blob, hash_it=hash_it)
    raise ValueError(f"unknown compression {compression!r}")


def _dir_meta(e: Entry) -> tuple:
    return (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs)


class _LayerWriter:
    def __init__(self, store: Store, tar: TarStream):
        self.store = store
        self.tar = tar
        self.entries = 0
        self.skipped = 0
        # hard-link group -> path of its first member in this layer
        self._first: dict[tuple, bytes] = {}

    def diff_dir(self, old: bytes | None, new: bytes, prefix: bytes) -> None:
        if old == new:
            return
        olds = {e.name: e for e in self.store.get_tree(old)} if old is not None else {}
        news = {e.name: e for e in self.store.get_tree(new)}
        for name in sorted(olds.keys() | news.keys()):
            a, b = olds.get(name), news.get(name)
            path = prefix + name
            if name.startswith(WHITEOUT):  # would read as a whiteout: never written
                self.skipped += b is not None
                continue
            if b is None:
                self._whiteout(prefix, name)
            elif a is None:
                self._add(path, b, opaque=False)
            elif a.kind == treefmt.DIR and b.kind == treefmt.DIR:
                self._diff_subdir(path, a, b)
            elif not a.same_content(b):
                self._add(path, b, opaque=b.kind == treefmt.DIR)

    def _diff_subdir(self, path: bytes, a: Entry, b: Entry) -> None:
        if a.ref == b.ref:
            if _dir_meta(a) != _dir_meta(b):
                self._member(path, b)
            return
        old_names = {e.name for e in self.store.get_tree(a.ref)}
        new_names = {e.name for e in self.store.get_tree(b.ref)}
        if old_names and not old_names & new_names:
            self._add(path, b, opaque=True)  # everything below was replaced
            return
        if _dir_meta(a) != _dir_meta(b):
            self._member(path, b)
        self.diff_dir(a.ref, b.ref, path + b"/")

    def _add(self, path: bytes, e: Entry, *, opaque: bool) -> None:
        """``e`` and, for a directory, all it holds."""
        self._member(path, e)
        if e.kind != treefmt.DIR:
            return
        if opaque:
            self._header(path + b"/" + OPAQUE, b"0")
        for child in self.store.get_tree(e.ref):
            if child.name.startswith(WHITEOUT):
                self.skipped += 1
                continue
            self._add(path + b"/" + child.name, child, opaque=False)

    def _whiteout(self, prefix: bytes, name: bytes) -> None:
        self._header(prefix + WHITEOUT + name, b"0")

    def _header(self, name: bytes, type_: bytes) -> None:
        self.tar.write(oci_tar.header(name, type_))
        self.entries += 1

    def _entry_header(
        self,
        name: bytes,
        type_: bytes,
        e: Entry,
        pax: dict[bytes, bytes],
        linkname: bytes = b"",
        size: int = 0,
    ) -> None:
        self.tar.write(
            oci_tar.header(
                name,
                type_,
                mode=e.mode,
                uid=e.uid,
                gid=e.gid,
                mtime_ns=e.mtime_ns,
                size=size,
                linkname=linkname,
                pax=pax,
            )
        )
        self.entries += 1

    def _member(self, path: bytes, e: Entry) -> None:
        kind = e.kind
        if kind in (treefmt.SOCK, treefmt.CHR, treefmt.BLK):
            self.skipped += 1
            return
        pax = {XATTR_RECORD + k: v for k, v in e.xattrs} if e.xattrs else {}
        if kind == treefmt.FILE:
            self._file(path, e, pax)
        elif kind == treefmt.DIR:
            self._entry_header(path + b"/", b"5", e, pax)
        elif kind == treefmt.SYMLINK:
            self._entry_header(path, b"2", e, pax, linkname=e.ref)
        else:
            self._entry_header(path, _TAR_TYPE[kind], e, pax)

    def _file(self, path: bytes, e: Entry, pax: dict[bytes, bytes]) -> None:
        if e.link is not None:
            pax[LINK_RECORD] = e.link
            group = treefmt.link_group(e)
            first = self._first.get(group)
            if first is not None:
                self._entry_header(path, b"1", e, pax, linkname=first)
                return
            self._first[group] = path
        head = self._file_header(path, e, pax)
        if not e.size:
            self.tar.write(head)
            return
        self._copy_blob(e.ref, e.size, path, head)

    def _file_header(self, path: bytes, e: Entry, pax: dict[bytes, bytes]) -> bytes:
        self.entries += 1
        return oci_tar.header(
            path, b"0", mode=e.mode, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns, size=e.size, pax=pax
        )

    def _copy_blob(self, digest: bytes, size: int, path: bytes, head: bytes) -> None:
        """``head``, the blob's ``size`` bytes and the padding: a small file in one write."""
        if self.tar.copies(size):  # opened where it is copied and hashed
            self.tar.write(head)
            self.tar.copy_file(digest, size)
            self.tar.write(oci_tar.padding(size))
            return
        fd = self.store.open_blob_owned(digest)  # the walk runs as_store_owner
        try:
            # A new bytes object per read: the hash thread may still hold the last.
            data = os.read(fd, min(size, _READ))
            if len(data) == size:
                self.tar.write(head + data + oci_tar.padding(size))
                return
            self.tar.write(head)
            left = size
            while left:
                if not data:
                    raise StoreError(f"blob of {path!r} is shorter than its entry says")
                self.tar.write(data)
                left -= len(data)
                if left:
                    data = os.read(fd, min(left, _READ))
            self.tar.write(oci_tar.padding(size))
        finally:
            os.close(fd)


class _Count:
    """A tar stream that only counts: what ``layer_size`` walks into."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)


class _SizeWalker(_LayerWriter):
    def _copy_blob(self, digest: bytes, size: int, path: bytes, head: bytes) -> None:
        self.tar.write(head)
        self.tar.size += size  # the writer copies exactly an entry's size, or fails
        self.tar.write(oci_tar.padding(size))


def layer_size(store: Store, before: bytes | None, after: bytes) -> int:
    """The bytes of the uncompressed layer ``write_layer`` would write, without reading a blob.

    A tar member's header carries its size, so an archive streamed to a pipe
    (which cannot seek back to fill a header in) must know each layer's size
    before writing it. Tree metadata alone decides it; the walk reads only
    the trees that differ.
    """
    count = _Count()
    _SizeWalker(store, count).diff_dir(before, after, b"")  # type: ignore[arg-type]
    return count.size + len(oci_tar.END_OF_ARCHIVE)
