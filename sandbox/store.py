"""The content-addressed store: blobs and trees under one directory.

Layout under ``<state>/cas``::

    blobs/ab/<hex>   file content, mode 0444 (also overlayfs' data-only layer)
    trees/ab/<hex>   canonical tree encodings (see ``tree.py``)
    tmp/             objects being written; never referenced
    quarantine/{trees,blobs}/ab/<hex>   objects a GC cycle set aside

This module is the only code that knows this layout (``shards``,
``quarantine_path``, ``blob_redirect``); ``closure.py``, through it, is the
only one that answers "what is missing from this closure?" (``ClosureCheck``).

Writing needs a lease when the store is *guarded* (see ``Lease``), so work
that writes cannot forget to tell the garbage collector about itself.

Objects are written in a ``Batch`` (batch.py), which makes them durable
together: a digest path never holds partial content.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import tree as treefmt
from .batch import Batch
from .digest import CHUNK, hash_bytes
from .fileio import copy_and_hash, object_matches, read_small, write_all
from .fsidentity import as_store_owner
from .tree import Entry

if TYPE_CHECKING:
    from .closure import ClosureCheck, CompletenessRecord

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


class LeaseError(RuntimeError):
    """A write to a guarded store without a live lease: a bug in the caller."""


KINDS = ("trees", "blobs")  # the two kinds of object, as named in the layout


class Lease:
    """What a writer shows the store: GC leaves alone what its holder relies on.

    A store a GC works on is *guarded* (``Store.guard``, by the daemon's
    ``Roots``): it writes only through a view carrying a live lease of its
    guard (``Store.leased``; ``Roots.writer(...).store``), else ``LeaseError``.
    A store nobody collects (the filesystem process, whose build's writer the
    daemon holds; tests; tools) is not guarded.
    """

    lease_issuer: object = None

    def lease_live(self) -> bool:
        return True


def _shard_str(base: str, digest: bytes) -> str:
    # Plain strings: presence checks run tens of thousands of times per
    # build state, and pathlib costs several times the stat itself.
    hexd = digest.hex()
    return f"{base}/{hexd[:2]}/{hexd}"


@dataclass
class FsckReport:
    blobs_checked: int = 0
    trees_checked: int = 0
    corrupt: list[str] = field(default_factory=list)  # object paths relative to cas/
    bad: set[bytes] = field(default_factory=set)  # digests of the corrupt objects
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
        self._guard: object = None
        self._lease: Lease | None = None

    @classmethod
    def open(cls, state_dir: Path | str, **kwargs) -> Store:
        """Open the store, creating its layout on first use."""
        store = cls(state_dir, **kwargs)
        if not (store.root / "tmp").is_dir():
            store._create_layout()
        if store.root.stat().st_mode & 0o077 and store.root.stat().st_uid == os.geteuid():
            os.chmod(store.root, 0o700)  # made by an amber that let everyone read it
        return store

    def _create_layout(self) -> None:
        for base in (self.blob_dir, self.tree_dir):
            for i in range(256):
                (base / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        # Root's alone: users reach content only through amberd. overlayfs
        # opens the blob directory (its data-only layer) as the mounter.
        os.chmod(self.root, 0o700)
        os.chmod(self.blob_dir, 0o755)
        Path(self.tmp_dir).mkdir(mode=0o700, exist_ok=True)
        with Batch(self) as batch:  # before anyone guards it: no GC runs yet
            self.put_blob_bytes(b"", batch)
            if not self.has_tree(treefmt.EMPTY_TREE):
                self._put_tree_bytes(treefmt.EMPTY_TREE, treefmt.EMPTY_TREE_BYTES, batch)

    # -- paths and presence -------------------------------------------------

    def blob_path(self, digest: bytes) -> Path:
        return Path(self.blob_file(digest))

    def blob_file(self, digest: bytes) -> str:
        """``blob_path`` as a string: a batch names one a new blob, so no Path."""
        return _shard_str(self._blob_dir_s, digest)

    def tree_path(self, digest: bytes) -> Path:
        return Path(_shard_str(self._tree_dir_s, digest))

    # Reads too run as the store's owner: cas/ is root's alone (0700), and
    # importers read users' files as the user while checking the store.

    def has_blob(self, digest: bytes) -> bool:
        with as_store_owner():
            return os.path.exists(_shard_str(self._blob_dir_s, digest))

    def has_tree(self, digest: bytes) -> bool:
        """On disk, committed. (A tree a live batch wrote is readable with
        ``get_tree`` but not "had": its batch may still be aborted.)"""
        with as_store_owner():
            return os.path.exists(_shard_str(self._tree_dir_s, digest))

    def object_path(self, kind: str, digest: bytes) -> Path:
        return self.tree_path(digest) if kind == "trees" else self.blob_path(digest)

    def quarantine_path(self, kind: str, digest: bytes) -> Path:
        return Path(_shard_str(f"{self.root}/quarantine/{kind}", digest))

    def quarantine_shard(self, kind: str, name: str) -> Path:
        """The quarantine shard a GC moves objects of shard ``name`` into (created)."""
        path = self.root / "quarantine" / kind / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def blob_redirect(digest: bytes) -> bytes:
        """Where ``digest`` is below the blob directory (overlayfs' data-only layer)."""
        hexd = digest.hex()
        return f"/{hexd[:2]}/{hexd}".encode()

    def shards(self, kind: str, *, quarantined: bool = False) -> Iterator[tuple[str, Path]]:
        """``(name, path)`` of each shard directory of ``kind``, sorted by name.

        Objects are the digests (hex) a shard lists; ``digest_of_name`` reads
        a listed name back (None for a stray file). Quarantine shards exist
        only once something was quarantined into them.
        """
        base = (self.root / "quarantine" / kind) if quarantined else (self.root / kind)
        if not base.is_dir():
            return
        for name in sorted(os.listdir(base)):
            yield name, base / name

    # -- leases -------------------------------------------------------------

    def guard(self, issuer: object) -> None:
        """From now on, write only under leases ``issuer`` hands out (see ``Lease``)."""
        self._guard = issuer

    def leased(self, lease: Lease) -> Store:
        """This store (same objects, same tree cache) writing under ``lease``."""
        view = copy.copy(self)
        view._lease = lease
        return view

    def check_lease(self) -> None:
        if self._guard is None:
            return
        lease = self._lease
        if lease is None or lease.lease_issuer is not self._guard or not lease.lease_live():
            raise LeaseError(
                "writing to the store needs a live writer hold (Roots.writer(...).store): "
                "a concurrent GC could collect what this write relies on"
            )

    def batch(self) -> Batch:
        self.check_lease()
        return Batch(self)

    # -- blobs --------------------------------------------------------------

    def put_blob_bytes(self, data: bytes, batch: Batch) -> bytes:
        digest = hash_bytes(data)
        self.put_blob_hashed(digest, data, batch)
        return digest

    def put_blob_hashed(self, digest: bytes, data: bytes | memoryview, batch: Batch) -> bool:
        """``put_blob_bytes`` of data the caller has hashed to ``digest`` (a pack's
        objects: checked as they arrive, not hashed twice); whether it wrote it."""
        if batch.has_blob(digest):
            return False
        fd, temp = batch.new_temp()
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        batch.adopt_blob(temp, digest, len(data), absent=True)
        return True

    def put_blob_fd(self, src: int, size: int, batch: Batch) -> bytes:
        """Store ``size`` bytes of ``src`` (read with pread, holes preserved)."""
        if size <= _SMALL:
            data = os.pread(src, size, 0) if size else b""
            return self.put_blob_bytes(data, batch)
        fd, temp = batch.new_temp()
        try:
            digest, actual = copy_and_hash(src, fd, size)
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
            with as_store_owner():
                return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise MissingObject("blob", digest) from None

    def open_blob(self, digest: bytes) -> int:
        """A read-only fd on a blob; the caller closes it."""
        try:
            with as_store_owner():
                return os.open(_shard_str(self._blob_dir_s, digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingObject("blob", digest) from None

    def open_blob_owned(self, digest: bytes) -> int:
        """``open_blob`` for a caller inside ``as_store_owner`` already (an export's walk).

        The identity switch is a third of what opening a small blob costs
        there, once for each of its 20,000 files.
        """
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
            write_all(fd, data)
        finally:
            os.close(fd)
        batch.add(temp, _shard_str(self._tree_dir_s, digest), len(data))

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
            with as_store_owner():
                data = read_small(_shard_str(self._tree_dir_s, digest))
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

    def tree_refs(self, digest: bytes, *, verify: bool = False) -> tuple[list[bytes], list[bytes]]:
        """``(subtrees, blobs)`` tree ``digest`` refers to, without building entries.

        Raises ``MissingObject``, or ``CorruptObject`` for bytes that do not
        read as a tree (or, with ``verify``, do not hash to ``digest``).
        """
        try:
            with as_store_owner():
                data = read_small(_shard_str(self._tree_dir_s, digest))
        except FileNotFoundError:
            raise MissingObject("tree", digest) from None
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            raise CorruptObject(f"tree {digest.hex()}: {exc.strerror}") from None
        if verify and hash_bytes(data) != digest:
            raise CorruptObject(f"tree {digest.hex()} does not match its digest")
        try:
            return treefmt.refs(data)
        except treefmt.TreeFormatError as exc:
            raise CorruptObject(f"tree {digest.hex()}: {exc}") from None

    def closure_check(
        self,
        *,
        bad: Set[bytes] = frozenset(),
        settled: bool = False,
        record: CompletenessRecord | None = None,
    ) -> ClosureCheck:
        """What is missing from closures (see ``closure.py``)."""
        from .closure import ClosureCheck  # closure.py reads trees through this module

        return ClosureCheck(self, bad=bad, settled=settled, record=record)

    # -- checking -----------------------------------------------------------

    def fsck(self, *, remove_corrupt: bool = False) -> FsckReport:
        """Rehash every object; optionally move corrupt ones out of the way."""
        report = FsckReport()
        for kind in ("blobs", "trees"):
            for _name, shard in self.shards(kind):
                for obj in os.scandir(shard):
                    ok = object_matches(obj.path, obj.name)
                    if kind == "blobs":
                        report.blobs_checked += 1
                    else:
                        report.trees_checked += 1
                    if not ok:
                        report.corrupt.append(os.path.relpath(obj.path, self.root))
                        digest = digest_of_name(obj.name)
                        if digest is not None:
                            report.bad.add(digest)
                            if kind == "trees":
                                self.forget_tree(digest)
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


def digest_of_name(name: str) -> bytes | None:
    """The digest a shard lists as ``name``; None for anything else."""
    try:
        digest = bytes.fromhex(name)
    except ValueError:
        return None
    return digest if len(digest) == treefmt.DIGEST_SIZE else None
