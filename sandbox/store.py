"""The content-addressed store: blobs and trees under one directory.

Layout under ``<state>/cas``::

    blobs/ab/<hex>   file content, mode 0444 (also overlayfs' data-only layer)
    trees/ab/<hex>   canonical tree encodings (see ``tree.py``)
    tmp/             objects being written; never referenced

Crash safety: an object is written to ``tmp/``, all of a batch's temporary
files are made durable with one ``syncfs``, and only then renamed to their
digest; a second ``syncfs`` makes the renames durable before the caller
records anything that refers to them. So a digest path never holds partial
content, and one batch costs two syncs however many objects it writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import tree as treefmt
from .digest import CHUNK, hash_bytes, new_hasher
from .fsidentity import as_store_owner
from .tree import Entry

_libc = ctypes.CDLL(None, use_errno=True)
_ZEROS = bytes(CHUNK * 16)
_SMALL = CHUNK  # files up to this size are read with one read()


class StoreError(Exception):
    """Infrastructure trouble with the store (I/O, corruption)."""


class MissingObject(StoreError):
    def __init__(self, kind: str, digest: bytes):
        super().__init__(f"{kind} {digest.hex()} is not in the store")
        self.kind = kind
        self.digest = digest


class CorruptObject(StoreError):
    pass


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _shard(base: Path, digest: bytes) -> Path:
    hexd = digest.hex()
    return base / hexd[:2] / hexd


def _read_small(path: str) -> bytes:
    """A whole small file, without the cost of pathlib and buffered io."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        while len(data) < size:
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def _shard_str(base: str, digest: bytes) -> str:
    # Plain strings: presence checks run tens of thousands of times per
    # build state, and pathlib costs several times the stat itself.
    hexd = digest.hex()
    return f"{base}/{hexd[:2]}/{hexd}"


class Batch:
    """Objects written together and made durable together (see module doc)."""

    def __init__(self, store: Store):
        self._store = store
        self._pending: list[tuple[str, str]] = []
        self.pending_trees: set[bytes] = set()  # readable through this store, not yet on disk
        self.pending_blobs: set[bytes] = set()  # written to temp files, not yet renamed
        self.written = 0  # objects this batch added to the store
        self.bytes_written = 0

    # The store is root's even while this thread reads a user's files as
    # that user (fsidentity.py): every write to it goes through as_store_owner.

    def new_temp(self) -> tuple[int, str]:
        path = os.path.join(self._store.tmp_dir, secrets.token_hex(12))
        with as_store_owner():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        return fd, path

    def add(self, temp_path: str, final: Path, size: int) -> None:
        self._pending.append((temp_path, str(final)))
        self.written += 1
        self.bytes_written += size

    def has_blob(self, digest: bytes) -> bool:
        """In the store, or on its way there in this batch."""
        return digest in self.pending_blobs or self._store.has_blob(digest)

    def adopt_blob(self, temp_path: str, digest: bytes, size: int) -> None:
        """Keep the temp file as blob ``digest``, unless the store or this batch has it."""
        if self.has_blob(digest):
            self.discard(temp_path)
        else:
            self.add(temp_path, self._store.blob_path(digest), size)
            self.pending_blobs.add(digest)

    def discard(self, temp_path: str) -> None:
        with as_store_owner():
            os.unlink(temp_path)

    def commit(self) -> None:
        if not self._pending:
            return
        with as_store_owner():
            fd = os.open(self._store.tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                syncfs(fd)
                for temp, final in self._pending:
                    os.rename(temp, final)
                syncfs(fd)
            finally:
                os.close(fd)
        self._pending.clear()
        self.pending_trees.clear()
        self.pending_blobs.clear()

    def abort(self) -> None:
        self._store._forget(self.pending_trees)
        self.pending_trees.clear()
        self.pending_blobs.clear()
        with as_store_owner():
            for temp, _ in self._pending:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        self._pending.clear()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@dataclass
class FsckReport:
    blobs_checked: int = 0
    trees_checked: int = 0
    corrupt: list[str] = field(default_factory=list)  # object paths relative to cas/
    temp_files: int = 0

    @property
    def clean(self) -> bool:
        return not self.corrupt


class Store:
    """Blobs and trees addressed by BLAKE3; safe for many processes at once."""

    def __init__(self, state_dir: Path | str, *, tree_cache: int = 4096):
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "cas"
        self.blob_dir = self.root / "blobs"
        self.tree_dir = self.root / "trees"
        self.tmp_dir = str(self.root / "tmp")
        self._blob_dir_s = str(self.blob_dir)
        self._tree_dir_s = str(self.tree_dir)
        self._trees: OrderedDict[bytes, list[Entry]] = OrderedDict()
        self._tree_cache = tree_cache

    @classmethod
    def open(cls, state_dir: Path | str, **kwargs) -> Store:
        """Open the store, creating its layout on first use."""
        store = cls(state_dir, **kwargs)
        if not (store.root / "tmp").is_dir():
            store._create_layout()
        return store

    def _create_layout(self) -> None:
        for base in (self.blob_dir, self.tree_dir):
            for i in range(256):
                (base / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        # The blob directory is overlayfs' data-only layer: world-traversable,
        # objects world-readable, nothing writable but by us.
        os.chmod(self.root, 0o755)
        os.chmod(self.blob_dir, 0o755)
        Path(self.tmp_dir).mkdir(mode=0o700, exist_ok=True)
        with self.batch() as batch:
            self.put_blob_bytes(b"", batch)
            if not self.has_tree(treefmt.EMPTY_TREE):
                self._put_tree_bytes(treefmt.EMPTY_TREE, treefmt.EMPTY_TREE_BYTES, batch)

    # -- paths and presence -------------------------------------------------

    def blob_path(self, digest: bytes) -> Path:
        return _shard(self.blob_dir, digest)

    def tree_path(self, digest: bytes) -> Path:
        return _shard(self.tree_dir, digest)

    def has_blob(self, digest: bytes) -> bool:
        return os.path.exists(_shard_str(self._blob_dir_s, digest))

    def has_tree(self, digest: bytes) -> bool:
        """On disk, committed. (A tree a live batch wrote is readable with
        ``get_tree`` but not "had": its batch may still be aborted.)"""
        return os.path.exists(_shard_str(self._tree_dir_s, digest))

    def batch(self) -> Batch:
        return Batch(self)

    # -- blobs --------------------------------------------------------------

    def put_blob_bytes(self, data: bytes, batch: Batch) -> bytes:
        digest = hash_bytes(data)
        if not batch.has_blob(digest):
            fd, temp = batch.new_temp()
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            batch.adopt_blob(temp, digest, len(data))
        return digest

    def put_blob_fd(self, src: int, size: int, batch: Batch) -> bytes:
        """Store ``size`` bytes of ``src`` (read with pread, holes preserved)."""
        if size <= _SMALL:
            data = os.pread(src, size, 0) if size else b""
            return self.put_blob_bytes(data, batch)
        fd, temp = batch.new_temp()
        try:
            digest, actual = _copy_and_hash(src, fd, size)
        except BaseException:
            os.close(fd)
            batch.discard(temp)
            raise
        os.close(fd)
        batch.adopt_blob(temp, digest, actual)
        return digest

    def put_blob_file(self, path: str | Path, batch: Batch) -> tuple[bytes, int]:
        """Store a file's content; returns ``(digest, size)``."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            return self.put_blob_fd(fd, size, batch), size
        finally:
            os.close(fd)

    def read_blob(self, digest: bytes) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise MissingObject("blob", digest) from None

    def open_blob(self, digest: bytes) -> int:
        """A read-only fd on a blob; the caller closes it."""
        try:
            return os.open(_shard_str(self._blob_dir_s, digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingObject("blob", digest) from None

    # -- trees --------------------------------------------------------------

    def put_tree(self, entries: list[Entry], batch: Batch) -> bytes:
        return self.add_tree(entries, batch)[0]

    def add_tree(self, entries: list[Entry], batch: Batch) -> tuple[bytes, bool]:
        """Store a tree; returns its digest and whether this call wrote it."""
        digest, data = treefmt.digest_of(entries)
        written = digest not in batch.pending_trees and not self.has_tree(digest)
        if written:
            self._put_tree_bytes(digest, data, batch)
            batch.pending_trees.add(digest)
        self._remember(digest, entries)
        return digest, written

    def _put_tree_bytes(self, digest: bytes, data: bytes, batch: Batch) -> None:
        fd, temp = batch.new_temp()
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        batch.add(temp, self.tree_path(digest), len(data))

    def get_tree(self, digest: bytes) -> list[Entry]:
        cached = self._trees.get(digest)
        if cached is not None:
            # Worker threads share this cache: another may evict the entry
            # between the get and the move; the entry we hold is still good.
            with contextlib.suppress(KeyError):
                self._trees.move_to_end(digest)
            return cached
        entries = self.get_tree_entries(digest)
        self._remember(digest, entries)
        return entries

    def get_tree_entries(
        self, digest: bytes, select: treefmt.Selector | None = None
    ) -> list[Entry]:
        """Tree ``digest`` read and decoded, bypassing the cache; only the
        entries ``select`` wants are decoded, when it is given (for one pass
        over every tree of a large root that needs a few kinds of entry)."""
        try:
            data = _read_small(_shard_str(self._tree_dir_s, digest))
        except FileNotFoundError:
            raise MissingObject("tree", digest) from None
        if hash_bytes(data) != digest:
            raise CorruptObject(f"tree {digest.hex()} does not match its digest")
        try:
            return treefmt.decode(data, select)
        except treefmt.TreeFormatError as exc:
            raise CorruptObject(f"tree {digest.hex()}: {exc}") from None

    def _forget(self, digests: set[bytes]) -> None:
        for digest in digests:
            self._trees.pop(digest, None)

    def _remember(self, digest: bytes, entries: list[Entry]) -> None:
        self._trees[digest] = entries
        with contextlib.suppress(KeyError):
            self._trees.move_to_end(digest)
        while len(self._trees) > self._tree_cache:
            try:
                self._trees.popitem(last=False)
            except KeyError:  # emptied by another thread
                break

    def forget_tree(self, digest: bytes) -> None:
        """Drop a tree from the cache (GC removed it)."""
        self._trees.pop(digest, None)

    def lookup_path(self, root: bytes, path: bytes) -> Entry | None:
        """The entry at ``path`` (``a/b/c``, relative) below tree ``root``."""
        parts = [p for p in path.split(b"/") if p]
        current = root
        entry: Entry | None = None
        for i, part in enumerate(parts):
            entry = next((e for e in self.get_tree(current) if e.name == part), None)
            if entry is None:
                return None
            if i < len(parts) - 1:
                if entry.kind != treefmt.DIR:
                    return None
                current = entry.ref
        return entry

    def walk(self, root: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, Entry]]:
        """Every ``(path, entry)`` below ``root``, depth first, sorted."""
        for entry in self.get_tree(root):
            path = prefix + entry.name
            yield path, entry
            if entry.kind == treefmt.DIR:
                yield from self.walk(entry.ref, path + b"/")

    def closure(self, root: bytes) -> tuple[set[bytes], set[bytes]]:
        """All tree and blob digests reachable from ``root``."""
        trees: set[bytes] = set()
        blobs: set[bytes] = set()
        stack = [root]
        while stack:
            digest = stack.pop()
            if digest in trees:
                continue
            trees.add(digest)
            for e in self.get_tree(digest):
                if e.kind == treefmt.DIR:
                    stack.append(e.ref)
                elif e.kind == treefmt.FILE:
                    blobs.add(e.ref)
        return trees, blobs

    def is_complete(self, root: bytes) -> bool:
        """True when every tree and blob ``root`` needs is present."""
        try:
            _, blobs = self.closure(root)
        except StoreError:
            return False
        return all(self.has_blob(b) for b in blobs)

    # -- checking -----------------------------------------------------------

    def fsck(self, *, remove_corrupt: bool = False) -> FsckReport:
        """Rehash every object; optionally move corrupt ones out of the way."""
        report = FsckReport()
        for kind, base in (("blob", self.blob_dir), ("tree", self.tree_dir)):
            for shard in sorted(os.scandir(base), key=lambda d: d.name):
                for obj in os.scandir(shard.path):
                    ok = _object_matches(obj.path, obj.name)
                    if kind == "blob":
                        report.blobs_checked += 1
                    else:
                        report.trees_checked += 1
                    if not ok:
                        report.corrupt.append(os.path.relpath(obj.path, self.root))
                        if remove_corrupt:
                            os.unlink(obj.path)
        report.temp_files = len(os.listdir(self.tmp_dir))
        return report

    def remove_temp_files(self) -> int:
        """Drop leftovers of writers that died (only safe with no live writer)."""
        names = os.listdir(self.tmp_dir)
        for name in names:
            path = os.path.join(self.tmp_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return len(names)


def _object_matches(path: str, name: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        digest, _ = _copy_and_hash(fd, None, size)
    finally:
        os.close(fd)
    return digest.hex() == name


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each region of ``fd`` holding data, up to ``size``.

    Found with SEEK_DATA/SEEK_HOLE, so holes of sparse files are skipped
    rather than read; a filesystem without hole support reports one region.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return  # only a hole is left
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _copy_and_hash(src: int, dst: int | None, size: int) -> tuple[bytes, int]:
    """Hash ``size`` bytes of ``src`` (and copy them to ``dst``), keeping holes.

    Holes are hashed as zeros but not read or written, so a sparse 5 GiB
    file costs what its data costs. A file shorter than ``size`` is taken as
    it is.
    """
    hasher = new_hasher(size)
    pos = 0
    for start, end in data_ranges(src, size):
        _hash_zeros(hasher, start - pos)
        pos = start
        while pos < end:
            chunk = os.pread(src, min(CHUNK * 4, end - pos), pos)
            if not chunk:
                size = pos  # the file shrank under us
                break
            hasher.update(chunk)
            if dst is not None:
                os.pwrite(dst, chunk, pos)
            pos += len(chunk)
        if pos < end:
            break
    _hash_zeros(hasher, size - pos)
    if dst is not None:
        os.ftruncate(dst, size)
    return hasher.digest(), size


def _hash_zeros(hasher, count: int) -> None:
    while count > 0:
        n = min(count, len(_ZEROS))
        hasher.update(memoryview(_ZEROS)[:n])
        count -= n
