"""Finding an image in a local OCI layout, OCI archive or docker archive.

Archives are read in place: one pass over the tar headers records where each
member's data lies, then config and layers are read from those offsets.
Nothing is unpacked. A compressed archive (``podman save | gzip``) is first
decompressed into an anonymous temporary file in the state directory (never
the host's ``/tmp``), counted against the import's ``Budget``, so it can be
read the same way. Only regular files and directories are opened: a FIFO or
a device where an archive or blob should be is refused, not read.

An OCI layout (directory or archive) is an ``ImageSource``: ``source.resolve``
walks its index, as it walks a registry's.

Every name an archive gives (digests in an index, paths in
``manifest.json``, symlink targets inside the archive) is checked before it
is used to find anything, and blobs named by digest are checked against it.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol

from amber.daemon.oci import tar as oci_tar
from amber.daemon.oci.limits import Budget
from amber.daemon.oci.source import ImageSource, resolve
from amber.daemon.oci.spec import (
    DOCKER_LAYER,
    MAX_DOCUMENT,
    OCI_INDEX,
    Descriptor,
    ImageParts,
    LayerBlob,
    OciError,
    digest_hex,
    qualified_name,
)
from amber.daemon.userfiles import NotRegularFile, open_regular, open_regular_as
from amber.sandbox.asuser import Unreadable, UserReader
from amber.sandbox.fsidentity import as_store_owner

_MAX_LINK_HOPS = 16
_HEX_NAME = re.compile(r"(?:.*/)?(?:sha256[/:])?([0-9a-f]{64})(?:\.json)?")


class _Files(Protocol):
    def has(self, name: str) -> bool: ...
    def size(self, name: str) -> int: ...
    def open(self, name: str) -> AbstractContextManager[BinaryIO]: ...


def blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest_hex(digest)}"


def read_limited(files: _Files, name: str, limit: int = MAX_DOCUMENT) -> bytes:
    size = files.size(name)
    if size > limit:
        raise OciError(f"{name} is {size} bytes, more than the {limit} a document may have")
    with files.open(name) as f:
        return f.read(size)


class LayoutSource(ImageSource):
    """An OCI layout's files (a directory's or an archive's) as an image source."""

    def __init__(self, files: _Files):
        self.files = files

    def top(self) -> tuple[bytes, str, str | None]:
        return read_limited(self.files, "index.json"), OCI_INDEX, None

    def document(self, desc: Descriptor) -> tuple[bytes, str]:
        return read_limited(self.files, blob_name(desc.digest)), desc.media_type

    def blob(self, desc: Descriptor) -> AbstractContextManager[BinaryIO]:
        return self.files.open(blob_name(desc.digest))

    def has_blob(self, desc: Descriptor) -> bool:
        return self.files.has(blob_name(desc.digest))


def _open_file(path: Path, reader: UserReader | None, *, allow_dir: bool = False) -> int:
    """``open_regular`` (links followed), by the user's helper when there is one.

    Raises ``FileNotFoundError``, ``PermissionError`` (naming the uid) or ``NotRegularFile``.
    """
    if reader is None:
        return open_regular(path, follow_symlinks=True, allow_dir=allow_dir)
    try:
        return open_regular_as(reader, path, follow_symlinks=True, allow_dir=allow_dir)
    except Unreadable as exc:
        if exc.missing:
            raise FileNotFoundError(exc.errno, str(exc), str(path)) from None
        raise PermissionError(exc.errno, str(exc), str(path)) from None


class DirFiles:
    """Files of an OCI layout directory (opened by ``reader``, the user's helper, if given)."""

    def __init__(self, root: Path, reader: UserReader | None = None):
        self.root = root
        self.reader = reader

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise OciError(f"{name!r} leaves the layout")
        return self.root / name

    def has(self, name: str) -> bool:
        try:
            os.close(_open_file(self._path(name), self.reader))
        except (OSError, NotRegularFile):
            return False
        return True

    def size(self, name: str) -> int:
        try:
            fd = _open_file(self._path(name), self.reader)
        except FileNotFoundError:
            raise OciError(f"{name} is missing from {self.root}") from None
        except NotRegularFile as exc:
            raise OciError(str(exc)) from None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def open(self, name: str) -> AbstractContextManager[BinaryIO]:
        try:
            return os.fdopen(_open_file(self._path(name), self.reader), "rb")
        except FileNotFoundError:
            raise OciError(f"{name} is missing from {self.root}") from None
        except NotRegularFile as exc:
            raise OciError(str(exc)) from None


class _Slice:
    """Read-only view of ``size`` bytes at ``offset`` of a file descriptor."""

    def __init__(self, fd: int, offset: int, size: int):
        self._fd = fd
        self._pos = offset
        self._end = offset + size

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._pos
        n = left if n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        if not data:
            raise OciError("archive ends inside a member")
        self._pos += len(data)
        return data

    def __enter__(self) -> _Slice:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class TarFiles:
    """Members of a tar archive, found by one pass over its headers."""

    def __init__(self, f: BinaryIO):
        self._fd = f.fileno()
        self._members: dict[str, tuple[str, int, int, str]] = {}
        f.seek(0)
        reader = oci_tar.TarReader(f, seekable=True)
        for m in reader:
            name = _normal(m.name.decode("utf-8", "surrogateescape"))
            if not name:
                continue
            target = ""
            if m.type == oci_tar.SYMLINK:
                link = m.linkname.decode("utf-8", "surrogateescape")
                target = _normal(posixpath.join(posixpath.dirname(name), link))
            elif m.type == oci_tar.HARDLINK:
                target = _normal(m.linkname.decode("utf-8", "surrogateescape"))
            self._members[name] = (m.type, m.offset, m.size, target)

    def _find(self, name: str) -> tuple[int, int] | None:
        name = _normal(name)
        for _ in range(_MAX_LINK_HOPS):
            member = self._members.get(name)
            if member is None:
                return None
            kind, offset, size, target = member
            if kind == oci_tar.REGULAR:
                return offset, size
            if kind not in (oci_tar.SYMLINK, oci_tar.HARDLINK) or not target:
                return None
            name = target
        raise OciError(f"too many links to follow for {name!r} in the archive")

    def has(self, name: str) -> bool:
        return self._find(name) is not None

    def size(self, name: str) -> int:
        found = self._find(name)
        if found is None:
            raise OciError(f"{name} is missing from the archive")
        return found[1]

    def open(self, name: str) -> AbstractContextManager[BinaryIO]:
        found = self._find(name)
        if found is None:
            raise OciError(f"{name} is missing from the archive")
        return _Slice(self._fd, *found)  # type: ignore[return-value]


def _normal(name: str) -> str:
    """An archive-relative path; "" for the root or anything leaving it."""
    path = posixpath.normpath("/" + name).lstrip("/")
    return "" if path in (".", "") else path


@contextlib.contextmanager
def open_local(
    path: Path,
    tag: str | None = None,
    budget: Budget | None = None,
    reader: UserReader | None = None,
) -> Iterator[ImageParts]:
    """The image in an OCI layout directory or an OCI or docker archive file
    (opened by ``reader``, the user's helper, when given)."""
    budget = budget if budget is not None else Budget()
    try:
        fd = _open_file(path, reader, allow_dir=True)
    except NotRegularFile as exc:
        raise OciError(f"{exc}: not an image archive or layout") from None
    # A missing or unreadable file is an OSError, not an image problem.
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        files = DirFiles(path, reader)
        if not files.has("index.json"):
            raise OciError(f"{path} is a directory but not an OCI layout (no index.json)")
        yield resolve(LayoutSource(files), tag)
        return
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(os.fdopen(fd, "rb"))
        magic = f.read(6)
        f.seek(0)
        if _compressed(magic):
            f = stack.enter_context(_spooled(f, magic, budget))
        try:
            files = TarFiles(f)
        except OciError as exc:
            raise OciError(f"{path} is not a readable tar archive: {exc}") from None
        if files.has("index.json"):
            yield resolve(LayoutSource(files), tag)
        elif files.has("manifest.json"):
            yield from_docker_archive(files, tag)
        else:
            raise OciError(f"{path} is neither an OCI archive nor a docker archive")


@contextlib.contextmanager
def _spooled(f: BinaryIO, magic: bytes, budget: Budget) -> Iterator[BinaryIO]:
    """``f`` decompressed into an anonymous file in the state directory, within ``budget``."""
    with as_store_owner():  # the state directory is root's; the file has no name
        plain = tempfile.TemporaryFile(dir=budget.tmp_dir)  # noqa: SIM115  (closed below)
    with plain:
        with decompressed(f, magic) as src:
            while chunk := src.read(1 << 20):
                budget.spend(len(chunk))
                plain.write(chunk)
        plain.flush()
        yield plain  # type: ignore[misc]


def from_docker_archive(files: _Files, tag: str | None) -> ImageParts:
    """The image a ``docker save`` archive's ``manifest.json`` describes."""
    try:
        doc = json.loads(read_limited(files, "manifest.json"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise OciError(f"manifest.json is not JSON: {exc}") from None
    if not isinstance(doc, list) or not doc or not all(isinstance(d, dict) for d in doc):
        raise OciError("manifest.json must be a non-empty list of objects")
    entry = _docker_entry(doc, tag)
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise OciError("manifest.json: Config must be a string and Layers a list")
    config = read_limited(files, config_name)
    named = _HEX_NAME.fullmatch(config_name)
    if named and hashlib.sha256(config).hexdigest() != named.group(1):
        raise OciError(f"{config_name} does not match the digest in its name")
    layers = []
    for layer in layer_names:
        if not isinstance(layer, str):
            raise OciError("manifest.json: Layers must be strings")
        layers.append(LayerBlob(DOCKER_LAYER, None, files.size(layer), partial(files.open, layer)))
    tags = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
    return ImageParts(config, layers, tags[0] if tags else None, None)


def _docker_entry(doc: list[dict], tag: str | None) -> dict:
    if tag is None:
        if len(doc) > 1:
            raise OciError(f"the archive holds {len(doc)} images; name one")
        return doc[0]
    for entry in doc:
        tags = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
        for t in tags:
            with contextlib.suppress(OciError):
                if tag in (t, t.rpartition(":")[2]) or qualified_name(t) == qualified_name(tag):
                    return entry
    raise OciError(f"no image tagged {tag!r} in the archive")


# -- compression ---------------------------------------------------------------


def _compressed(magic: bytes) -> bool:
    return compression_of(magic) != "none"


def compression_of(magic: bytes) -> str:
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if magic.startswith(b"BZh"):
        return "bzip2"
    if magic.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return "none"


@contextlib.contextmanager
def decompressed(stream: BinaryIO, magic: bytes) -> Iterator[BinaryIO]:
    """``stream`` decompressed by what its first bytes say it is."""
    kind = compression_of(magic)
    if kind == "gzip":
        with gzip.GzipFile(fileobj=stream, mode="rb") as g:
            yield g  # type: ignore[misc]
    elif kind == "bzip2":
        with bz2.BZ2File(stream) as b:
            yield b  # type: ignore[misc]
    elif kind == "xz":
        with lzma.LZMAFile(stream) as x:
            yield x  # type: ignore[misc]
    elif kind == "zstd":
        with _zstd(stream) as z:
            yield z
    else:
        yield stream


@contextlib.contextmanager
def _zstd(stream: BinaryIO) -> Iterator[BinaryIO]:
    """zstd through the ``zstd`` program (the standard library has none).

    A thread feeds ``stream`` to the program; the caller reads its output
    to the end (the exit status is checked when the block is left).
    """
    exe = shutil.which("zstd")
    if exe is None:
        raise OciError("zstd-compressed layer, and no zstd program is installed")
    proc = subprocess.Popen(
        [exe, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    assert stdin is not None and stdout is not None and stderr is not None
    failure: list[BaseException] = []

    def feed() -> None:
        try:
            while chunk := stream.read(1 << 20):
                stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as exc:
            failure.append(exc)
        finally:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    feeder = threading.Thread(target=feed, name="zstd-feed", daemon=True)
    feeder.start()
    done = False
    try:
        yield stdout  # type: ignore[misc]
        done = True
    finally:
        if not done:
            proc.kill()
        stdout.close()
        status = proc.wait()
        feeder.join()
        message = stderr.read(2000).decode(errors="replace").strip()
        stderr.close()
    if failure:
        raise failure[0]
    if status != 0:
        raise OciError(f"zstd could not decompress the layer: {message}")
