"""A layer's uncompressed tar stream on its way out: gathered, hashed, big files copied by the kernel.

Export has to do one thing ``tar -cf`` does not, the layer's SHA-256, and
should still be as fast. So the content is copied once, by the kernel, and
the hash reads it on the side without holding the copy up:

- small writes (headers, padding, small files) are gathered into chunks of
  about 1 MiB and written through the output's buffer;
- while the layer is hashed, the writes and copies happen on a thread of
  their own (``WriteThread``), in stream order: the walk (Python, the GIL)
  formats the next headers and reads the next small files while the kernel
  writes the last ones out, so the walk, the writing and the hash use both
  cores (with the digest known, they happen inline: ``InlineWriter``);
- a big file's content goes from its blob to the output with ``sendfile``,
  inside the kernel, never copied into Python (half the CPU of read and
  write); the walk only names its blob, and the write and hash threads
  each open it when they get to it, so the walk never waits for a
  descriptor to be handed back and runs on to the small files while the
  big ones are still being copied and hashed;
- the SHA-256 (the ``diff_id``) is computed on a thread of its own, in
  stream order: gathered chunks as they are, a big file by reading its blob
  again from the page cache into one reused buffer (hashlib lets go of the
  GIL for big buffers, so hashing overlaps the copying of what follows);
- when the digest is already known (``LayerDigests``), nothing is hashed.

Blobs are immutable (the store's content-addressed files), so the bytes
the hash thread reads are the bytes that were sent.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

from amber.sandbox.fsidentity import store_owner_thread
from amber.sandbox.store import StoreError

#: copy(fd, size): write the first ``size`` bytes of the file ``fd`` to the output.
Copy = Callable[[int, int], None]

_SMALL = 64 << 10  # a write this big skips the gathering; a file this big is copied
_FLUSH = 1 << 20
_READ = 1 << 20
# Waiting to be written, and to be hashed, at most: chunks (of at most about
# 1 MiB: _FLUSH, _READ), and files (digests: nothing held open), each with at
# most _HEAD bytes before it (its header; more goes as a chunk of its own).
# A layer's big files come as a few items that take the kernel and the hash
# long (a 400 MiB file, 0.3 s of hashing), its small files as many chunks
# that take the walk long (20,000 files, 75 MiB of tar, 0.4 s of Python). So
# the walk may run a whole directory of big files ahead (8,192 of them), and
# 32 MiB into the small files after them: further, it holds the GIL the
# other two threads need between their calls (in process at load 8-9, 128
# MiB of chunks made the export slower than 32).
_CHUNKS = 32
_FILES = 8192
_HEAD = 8 << 10
#: a file in the stream: the bytes before it (its header), its blob, its size
_FileItem = tuple[bytes, bytes, int]
_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.ESPIPE)


_Marker = type(threading.Lock())
_Item = bytes | _FileItem | _Marker | None  # type: ignore[valid-type]


class _InOrder:
    """A thread doing chunks and files one after the other, in the order given.

    At most ``_CHUNKS`` chunks and ``_FILES`` files wait, so a slow thread
    holds the walk back rather than memory growing. A chunk must not change
    once given (bytes, never a reused buffer); a file is given by its blob
    digest and opened (``open_blob``) on the thread, so none is held open
    while it waits. An error of the thread is raised, as it was raised, by
    the next ``_put_*`` or ``drain``; what waits after it is skipped.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._chunks = threading.BoundedSemaphore(_CHUNKS)
        self._files = threading.BoundedSemaphore(_FILES)
        self._error: BaseException | None = None
        self._skip = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _chunk(self, data: bytes) -> None:
        raise NotImplementedError

    def _file(self, head: bytes, digest: bytes, size: int) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        # Root's file rights, for the blobs (a thread starts with its creator's:
        # the user's, for an export beside the user's files); outputs are open.
        store_owner_thread()
        get = self._queue.get
        while (item := get()) is not None:
            if type(item) is _Marker:
                item.release()  # all before it is done: ``drain``
                continue
            try:
                if self._error is None and not self._skip:
                    if type(item) is bytes:
                        self._chunk(item)
                    else:
                        self._file(*item)  # type: ignore[misc]
            except BaseException as exc:  # raised on the walk's thread
                self._error = exc
            finally:
                (self._files if type(item) is tuple else self._chunks).release()

    def _put_chunk(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._chunks.acquire()
        self._queue.put(data)

    def _put_file(self, head: bytes, digest: bytes, size: int) -> None:
        if self._error is not None:
            raise self._error
        self._files.acquire()
        self._queue.put((head, digest, size))

    def drain(self) -> None:
        """Wait until all given is done; raise the thread's error if any."""
        marker = threading.Lock()
        marker.acquire()
        self._queue.put(marker)
        marker.acquire()  # released by the thread once it reaches the marker
        if self._error is not None:
            raise self._error

    def close(self, *, discard: bool = False) -> None:
        """End the thread once what waits is done (skipped with ``discard``)."""
        if self._thread.is_alive():
            self._skip = discard
            self._queue.put(None)  # unbounded: the end always goes in
            self._thread.join()


class HashThread(_InOrder):
    """SHA-256 of a stream of chunks and files, computed on a thread of its own."""

    def __init__(self, open_blob: Callable[[bytes], int]) -> None:
        self._open_blob = open_blob
        self._hasher = hashlib.sha256()
        self._chunk = self._hasher.update  # type: ignore[method-assign]
        self._view = memoryview(bytearray(_READ))
        super().__init__("layer-sha256")

    def _file(self, head: bytes, digest: bytes, size: int) -> None:
        if head:
            self._hasher.update(head)
        view = self._view
        fd = self._open_blob(digest)
        try:
            offset = 0
            while offset < size:
                n = os.preadv(fd, [view[: min(size - offset, _READ)]], offset)
                if not n:
                    raise StoreError("a blob got shorter while it was exported")
                self._hasher.update(view[:n])
                offset += n
        finally:
            os.close(fd)

    #: hash these bytes next
    update = _InOrder._put_chunk
    #: hash ``head``, then the first ``size`` bytes of the blob ``digest``
    update_file = _InOrder._put_file

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest()


class WriteThread(_InOrder):
    """The output's writes and copies, done in order on a thread of their own.

    Big files given by digest let the walk run a whole directory of them
    ahead (it is the small files after them that need the walk's time). An
    error of the output (a reader gone, a full disk) comes back by the next
    ``write``, ``copy`` or ``drain``.
    """

    def __init__(
        self, down: Callable[[bytes], object], copy: Copy | None, open_blob: Callable[[bytes], int]
    ) -> None:
        self._chunk = down  # type: ignore[assignment]
        self._copy = copy
        self._open_blob = open_blob
        super().__init__("layer-write")

    def _file(self, head: bytes, digest: bytes, size: int) -> None:
        _copy_blob(self._chunk, self._copy, self._open_blob(digest), head, size)

    #: write these bytes next
    write = _InOrder._put_chunk
    #: write ``head``, then copy the first ``size`` bytes of the blob ``digest`` out
    copy = _InOrder._put_file


def _copy_blob(
    down: Callable[[bytes], object], copy: Copy | None, fd: int, head: bytes, size: int
) -> None:
    """``head``, then ``size`` bytes of the blob open at ``fd``, which is closed."""
    try:
        assert copy is not None
        if head:
            down(head)
        copy(fd, size)
    finally:
        os.close(fd)


class InlineWriter:
    """``WriteThread``'s calls done at once, on the caller's thread.

    For a layer whose digest is known: with no hash to overlap, a thread
    for the writes saves no wall time on a busy machine and costs CPU (a
    hand-over per chunk and per file).
    """

    def __init__(
        self, down: Callable[[bytes], object], copy: Copy | None, open_blob: Callable[[bytes], int]
    ) -> None:
        self.write = down
        self._copy = copy
        self._open_blob = open_blob

    def copy(self, head: bytes, digest: bytes, size: int) -> None:
        _copy_blob(self.write, self._copy, self._open_blob(digest), head, size)

    def drain(self) -> None:
        pass

    def close(self, *, discard: bool = False) -> None:
        pass


class TarStream:
    """The uncompressed tar: small writes gathered, big files copied, all hashed unless known."""

    def __init__(
        self,
        down: Callable[[bytes], object],
        copy: Copy | None,
        open_blob: Callable[[bytes], int],
        *,
        hash_it: bool,
    ):
        # The writes on a thread of their own only where there is a hash to overlap.
        writer = WriteThread if hash_it else InlineWriter
        self._writer: WriteThread | InlineWriter = writer(down, copy, open_blob)
        self._copies = copy is not None
        self._buf = bytearray()
        self.hasher = HashThread(open_blob) if hash_it else None
        self.size = 0

    def write(self, data: bytes) -> None:
        if len(data) >= _SMALL:
            self.flush()
            self._emit(data)
            return
        self._buf += data
        if len(self._buf) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._emit(bytes(self._buf))
            self._buf.clear()

    def _emit(self, data: bytes) -> None:
        if type(data) is not bytes:
            data = bytes(data)  # the hash thread needs a chunk that stays as it is
        if self.hasher is not None:
            self.hasher.update(data)
        self.size += len(data)
        self._writer.write(data)

    def copies(self, size: int) -> bool:
        """Whether a file of ``size`` bytes goes through ``copy_file``."""
        return self._copies and size >= _SMALL

    def copy_file(self, digest: bytes, size: int) -> None:
        """The first ``size`` bytes of the blob ``digest`` into the stream.

        The copy happens later, on the write thread, which opens the blob
        (as the hash thread does): the walk opens nothing for it.
        """
        if len(self._buf) > _HEAD:
            self.flush()
        head = b""
        if self._buf:  # the file's header, in the same hand-over as its content
            head = bytes(self._buf)
            self._buf.clear()
            self.size += len(head)
        if self.hasher is not None:
            self.hasher.update_file(head, digest, size)
        self._writer.copy(head, digest, size)
        self.size += size

    def finish(self) -> None:
        """Everything given, written out (the output may be used again after)."""
        self.flush()
        self._writer.drain()

    def close(self, *, discard: bool = False) -> None:
        """End the threads; with ``discard``, write and hash nothing more."""
        self._writer.close(discard=discard)
        if self.hasher is not None:
            self.hasher.close(discard=discard)


def file_copier(f: BinaryIO) -> Copy | None:
    """A ``Copy`` into the open file, pipe or socket ``f`` by ``sendfile``; None if ``f`` has no fd.

    ``f``'s buffer is flushed first, and a seekable ``f`` is told where the
    copy left it, so its ``tell`` and later writes stay right.
    """
    try:
        out = f.fileno()
        seekable = f.seekable()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None

    def copy(fd: int, size: int) -> None:
        f.flush()
        start = f.tell() if seekable else 0
        sent = 0
        while sent < size:
            try:
                n = os.sendfile(out, fd, sent, size - sent)
            except OSError as exc:
                if sent or exc.errno not in _NO_SENDFILE:
                    raise
                _read_write(f, fd, size)  # an output sendfile cannot write to
                return
            if not n:
                raise StoreError("a blob is shorter than its entry says")
            sent += n
        if seekable:
            f.seek(start + size)

    return copy


def _read_write(f: BinaryIO, fd: int, size: int) -> None:
    offset = 0
    while offset < size:
        data = os.pread(fd, min(size - offset, _READ), offset)
        if not data:
            raise StoreError("a blob is shorter than its entry says")
        f.write(data)
        offset += len(data)
