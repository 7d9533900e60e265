"""Applying OCI layers onto a tree in the store, safely.

Layers are untrusted input: an export from someone else's machine, or
anything a registry serves. They are never extracted to disk; each tar
member becomes an entry of an in-memory, copy-on-write view of the tree,
file content goes straight into blobs, and the trees are written to the
store only once a whole layer has been accepted. So a hostile layer can at
worst be refused; it can never write outside the store.

Refused with ``OciError``: absolute paths and ``..`` components, any path
whose parent is not a directory in the tree being built (a symlink in the
tree is never followed, so ``evil -> /etc`` then ``evil/passwd`` fails),
device nodes (or, with ``devices="drop"``, left out: a sandbox gets its
``/dev`` from amber, not from the image), hard links to missing entries or to directories, two entries
for one path in one layer, names, PAX headers and xattrs over their limits,
and overlayfs' own xattrs are dropped (they would steer a mount).

Whiteouts follow the OCI spec: ``.wh.NAME`` and ``.wh..wh..opq`` hide what
*lower* layers put there, wherever the marker appears in the layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from amber.daemon.oci import tar as oci_tar
from amber.daemon.oci.layer import LINK_RECORD, OPAQUE, WHITEOUT
from amber.daemon.oci.spec import OciError
from amber.daemon.oci.tar import Member, TarReader
from amber.sandbox import tree as treefmt
from amber.sandbox.digest import CHUNK, new_hasher
from amber.sandbox.store import Batch, Store
from amber.sandbox.tree import Entry

Devices = Literal["refuse", "drop"]
MAX_DEPTH = 256
#: Members one image may have, over all its layers: the builder keeps the
#: whole tree in memory (a few hundred bytes an entry), so this bounds it
#: (large distribution images have a few hundred thousand).
MAX_ENTRIES = 4_000_000
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 << 10
#: overlayfs reads these on a mounted lower layer; a layer must not set them.
DROPPED_XATTRS = (treefmt.OVERLAY_XATTR_PREFIX, b"user.overlay.")
_DEFAULT_DIR = Entry(b"", treefmt.DIR, 0o755, 0, 0, 0, 0, treefmt.EMPTY_TREE)
_ZEROS = bytes(4 * CHUNK)


class _Dir:
    """A directory of the view: clean (``digest`` set) or changed (``None``).

    ``children`` is loaded from the store on first use; a changed directory
    always has its children loaded.
    """

    __slots__ = ("children", "digest", "entry")

    def __init__(
        self,
        entry: Entry | None,
        digest: bytes | None,
        children: dict[bytes, Entry | _Dir] | None = None,
    ):
        self.entry = entry
        self.digest = digest
        self.children = children


@dataclass
class _Layer:
    """Bookkeeping for the layer being applied."""

    members: set[bytes] = field(default_factory=set)  # paths named by a member
    touched: set[bytes] = field(default_factory=set)  # paths this layer put content at


def _show(path: bytes) -> str:
    return repr("/" + path[:300].decode("utf-8", "backslashreplace"))


def split_path(name: bytes) -> list[bytes]:
    """The components of a member name; ``OciError`` if it could leave the tree."""
    if name.startswith(b"/"):
        raise OciError(f"absolute path {name[:300]!r} in layer")
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise OciError(f"path {name[:300]!r} in layer has a '..' component")
    if len(parts) > MAX_DEPTH:
        raise OciError(f"path {name[:300]!r} in layer is deeper than {MAX_DEPTH} directories")
    for part in parts:
        if len(part) > NAME_MAX:
            raise OciError(f"path {name[:300]!r} in layer has a name over {NAME_MAX} bytes")
    return parts


class TreeBuilder:
    """A tree being changed layer by layer.

    ``digest`` names the tree as it stands (after each layer); the directory
    encodings wait in memory until ``store_trees`` puts them in the batch,
    once every layer was accepted. So a refused image leaves not even a
    cached tree behind in the ``Store`` object.
    """

    def __init__(
        self,
        store: Store,
        batch: Batch,
        root: bytes = treefmt.EMPTY_TREE,
        *,
        devices: Devices = "refuse",
        max_entries: int = MAX_ENTRIES,
    ):
        if devices not in ("refuse", "drop"):
            raise ValueError(f"devices must be 'refuse' or 'drop', not {devices!r}")
        self.store = store
        self.batch = batch
        self.devices = devices
        self.root = _Dir(None, root)
        self._layer = _Layer()
        self._pending: dict[bytes, list[Entry]] = {}  # digest -> entries not yet stored
        self._entries_left = max_entries

    # -- public ----------------------------------------------------------------

    def apply(self, stream: BinaryIO) -> None:
        """Apply one uncompressed layer tar read from ``stream``."""
        self._layer = _Layer()
        reader = TarReader(stream)
        for member in reader:
            self._apply_member(member, reader)

    def digest(self) -> bytes:
        """The root tree's digest as it stands (its directories kept pending)."""
        return self._encode(self.root)

    def store_trees(self) -> None:
        """Put every pending directory into the batch."""
        for entries in self._pending.values():
            self.store.put_tree(entries, self.batch)
        self._pending.clear()

    # -- members -----------------------------------------------------------------

    def _apply_member(self, m: Member, reader: TarReader) -> None:
        parts = split_path(m.name)
        path = b"/".join(parts)
        layer = self._layer
        self._entries_left -= 1
        if self._entries_left < 0:
            raise OciError("the image has more entries than amber keeps in memory for one import")
        if path in layer.members:
            raise OciError(f"duplicate entry {_show(path)} in one layer")
        layer.members.add(path)
        if not parts:
            if m.type != oci_tar.DIRECTORY:
                raise OciError(f"the layer's root entry is a {m.type}, not a directory")
            return  # trees carry no metadata of their root
        for part in parts[:-1]:
            if part.startswith(WHITEOUT):
                raise OciError(f"{_show(path)}: whiteout name used as a directory")
        name = parts[-1]
        if name == OPAQUE:
            self._opaque(parts[:-1])
        elif name.startswith(WHITEOUT + WHITEOUT):
            raise OciError(f"{_show(path)}: unsupported aufs metadata entry")
        elif name.startswith(WHITEOUT):
            target = name[len(WHITEOUT) :]
            if not target:
                raise OciError(f"{_show(path)}: whiteout of an empty name")
            self._whiteout(parts[:-1], target)
        else:
            self._put(parts, path, m, reader)

    def _put(self, parts: list[bytes], path: bytes, m: Member, reader: TarReader) -> None:
        layer = self._layer
        if m.type in (oci_tar.CHAR, oci_tar.BLOCKDEV):
            if self.devices == "refuse":
                device = f"{m.type} {m.devmajor}:{m.devminor}"
                raise OciError(f"{_show(path)}: device node ({device}) refused in a layer")
            return
        parent = self._walk(parts[:-1], path, create=True)
        assert parent is not None and parent.children is not None
        name = parts[-1]
        existing = parent.children.get(name)
        if m.type == oci_tar.DIRECTORY:
            entry = self._meta(m, name, treefmt.DIR)._replace(ref=treefmt.EMPTY_TREE)
            if isinstance(existing, _Dir):
                self._children(existing)
                existing.entry = entry  # directories merge with what lower layers hold
                existing.digest = None
            else:
                parent.children[name] = _Dir(entry, None, {})
            layer.touched.add(path)
            return
        if isinstance(existing, _Dir) and path in layer.touched:
            raise OciError(f"{_show(path)}: a {m.type} replaces a directory the same layer filled")
        if m.type == oci_tar.REGULAR:
            entry = self._meta(m, name, treefmt.FILE)
            link = m.pax.get(LINK_RECORD)
            if link is not None and len(link) > oci_tar.MAX_NAME:
                raise OciError(f"{_show(path)}: hard-link label too long")
            entry = entry._replace(size=m.size, ref=self._blob(reader, m.size), link=link)
        elif m.type == oci_tar.SYMLINK:
            if not m.linkname:
                raise OciError(f"{_show(path)}: symlink with an empty target")
            entry = self._meta(m, name, treefmt.SYMLINK)
            entry = entry._replace(size=len(m.linkname), ref=m.linkname)
        elif m.type == oci_tar.FIFO:
            entry = self._meta(m, name, treefmt.FIFO)
        elif m.type == oci_tar.HARDLINK:
            entry = self._hardlink(path, name, m)
        else:
            raise AssertionError(f"unexpected member type {m.type}")
        parent.children[name] = entry
        layer.touched.add(path)

    def _hardlink(self, path: bytes, name: bytes, m: Member) -> Entry:
        target_parts = split_path(m.linkname)
        target_path = b"/".join(target_parts)
        if not target_parts:
            raise OciError(f"{_show(path)}: hard link to the root")
        where = f"{_show(path)}: hard link to {_show(target_path)}"
        try:
            parent = self._walk(target_parts[:-1], target_path, create=False)
        except OciError as exc:
            raise OciError(f"{where}: {exc}") from None
        target = None
        if parent is not None:
            target = self._children(parent).get(target_parts[-1])
        if target is None:
            raise OciError(f"{where}, which is not in the image")
        if isinstance(target, _Dir):
            raise OciError(f"{where}, which is a directory")
        if target.kind != treefmt.FILE:
            return target._replace(name=name)  # trees link only files: a copy is the same
        label = m.pax.get(LINK_RECORD) or target.link or target_path
        if target.link != label:
            parent = self._walk(target_parts[:-1], target_path, create=False, mark=True)
            assert parent is not None and parent.children is not None
            parent.children[target_parts[-1]] = target._replace(link=label)
        return target._replace(name=name, link=label)

    def _whiteout(self, parent_parts: list[bytes], name: bytes) -> None:
        path = b"/".join([*parent_parts, name])
        parent = self._walk(parent_parts, path, create=False, mark=True)
        if parent is None:
            return  # nothing below to hide
        children = self._children(parent)
        child = children.get(name)
        if child is None:
            return
        if path not in self._layer.touched:
            del children[name]
        elif isinstance(child, _Dir):
            self._prune(child, path + b"/")  # keep only what this layer put there

    def _opaque(self, parent_parts: list[bytes]) -> None:
        path = b"/".join(parent_parts)
        node = self._walk(parent_parts, path, create=False, mark=True)
        if node is not None:
            self._prune(node, path + b"/" if path else b"")

    def _prune(self, node: _Dir, prefix: bytes) -> None:
        """Drop from ``node`` everything lower layers put there."""
        children = self._children(node)
        node.digest = None
        for name in list(children):
            path = prefix + name
            child = children[name]
            if path not in self._layer.touched:
                del children[name]
            elif isinstance(child, _Dir):
                self._prune(child, path + b"/")

    # -- the view ------------------------------------------------------------------

    def _children(self, node: _Dir) -> dict[bytes, Entry | _Dir]:
        if node.children is None:
            assert node.digest is not None
            node.children = {
                e.name: _Dir(e, e.ref) if e.kind == treefmt.DIR else e
                for e in self._pending.get(node.digest) or self.store.get_tree(node.digest)
            }
        return node.children

    def _walk(
        self, parts: list[bytes], full: bytes, *, create: bool, mark: bool | None = None
    ) -> _Dir | None:
        """The directory at ``parts``, never through anything but directories.

        ``create`` makes missing directories (as a layer's implicit parents);
        ``mark`` (default: ``create``) flags the directories on the way as
        changed. Missing without ``create``: None.
        """
        mark = create if mark is None else mark
        node = self.root
        path = b""
        for part in parts:
            children = self._children(node)
            if mark:
                node.digest = None
            path = path + b"/" + part if path else part
            child = children.get(part)
            if child is None:
                if not create:
                    return None
                child = _Dir(_DEFAULT_DIR._replace(name=part), None, {})
                children[part] = child
            elif not isinstance(child, _Dir):
                kind = treefmt.KIND_NAMES[child.kind]
                hint = (
                    " (symlinks in a layer are never followed)"
                    if child.kind == treefmt.SYMLINK
                    else ""
                )
                raise OciError(f"{_show(full)}: {_show(path)} is a {kind}, not a directory{hint}")
            if create:
                self._layer.touched.add(path)
            node = child
        if mark:
            self._children(node)
            node.digest = None
        return node

    def _meta(self, m: Member, name: bytes, kind: int) -> Entry:
        for value, what in ((m.uid, "uid"), (m.gid, "gid")):
            if not 0 <= value < 1 << 32:
                raise OciError(f"{_show(m.name)}: {what} {value} out of range")
        if not -(1 << 63) <= m.mtime_ns < 1 << 63:
            raise OciError(f"{_show(m.name)}: mtime out of range")
        xattrs = []
        for key, value in sorted(m.xattrs().items()):
            if key.startswith(DROPPED_XATTRS):
                continue
            if not key or b"\0" in key or len(key) > XATTR_NAME_MAX or len(value) > XATTR_SIZE_MAX:
                raise OciError(f"{_show(m.name)}: xattr {key[:80]!r} too long or malformed")
            xattrs.append((key, value))
        return Entry(
            name=name,
            kind=kind,
            mode=m.mode & 0o7777,
            uid=m.uid,
            gid=m.gid,
            mtime_ns=m.mtime_ns,
            size=0,
            xattrs=tuple(xattrs),
        )

    def _blob(self, reader: TarReader, size: int) -> bytes:
        """Store the member's data (streamed, holes kept); its digest."""
        if size <= CHUNK:
            return self.store.put_blob_bytes(reader.read(size), self.batch)
        fd, temp = self.batch.new_temp()
        try:
            hasher = new_hasher(size)
            pos = 0
            while pos < size:
                chunk = reader.read(min(len(_ZEROS), size - pos))
                hasher.update(chunk)
                if not _is_zeros(chunk):
                    _pwrite_all(fd, chunk, pos)  # runs of zeros stay holes, as on import
                pos += len(chunk)
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            self.batch.discard(temp)
            raise
        os.close(fd)
        digest = hasher.digest()
        self.batch.adopt_blob(temp, digest, size)
        return digest

    def _encode(self, node: _Dir) -> bytes:
        if node.digest is not None:
            return node.digest
        assert node.children is not None
        entries: list[Entry] = []
        for name in sorted(node.children):
            child = node.children[name]
            if isinstance(child, _Dir):
                assert child.entry is not None
                entries.append(child.entry._replace(name=name, ref=self._encode(child)))
            else:
                entries.append(child)
        node.digest, _ = treefmt.digest_of(entries)
        self._pending[node.digest] = entries
        return node.digest


def _is_zeros(chunk: bytes) -> bool:
    if len(chunk) == len(_ZEROS):
        return chunk == _ZEROS
    return not chunk.strip(b"\0")


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n
