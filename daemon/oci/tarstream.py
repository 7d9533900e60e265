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
  write);
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
# Waiting to be hashed at most: chunks (of at most about 1 MiB: _FLUSH,
# _READ) and files (digests: nothing held open). Files may run far ahead:
# the big ones are where hashing lags behind the kernel's copying, the small
# ones where Python's walk lags behind the hash, and the two overlap only if
# one may run ahead of the other by a whole directory of big files.
_CHUNKS = 32
_FILES = 1 << 16
_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.ESPIPE)


class HashThread:
    """SHA-256 of a stream of chunks and files, computed on a thread of its own.

    Items are hashed in the order given; at most ``_CHUNKS`` chunks and
    ``_FILES`` files wait, so a slow hash holds the writer back rather than
    memory growing. A chunk must not change once given (bytes, never a
    reused buffer); a file is given by its blob digest and opened
    (``open_blob``) on the thread, so none is held open while it waits. An
    error of the hash is raised by the next ``update`` or by ``hexdigest``.
    """

    def __init__(self, open_blob: Callable[[bytes], int]) -> None:
        self._open_blob = open_blob
        self._hasher = hashlib.sha256()
        self._queue: queue.SimpleQueue[bytes | tuple[bytes, int] | None] = queue.SimpleQueue()
        self._chunks = threading.BoundedSemaphore(_CHUNKS)
        self._files = threading.BoundedSemaphore(_FILES)
        self._error: BaseException | None = None
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="layer-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store_owner_thread()
        get = self._queue.get
        update = self._hasher.update
        buf = bytearray(_READ)
        while (item := get()) is not None:
            try:
                if self._error is None and not self._discard:
                    if type(item) is bytes:
                        update(item)
                    else:
                        self._hash_file(item[0], item[1], buf)
            except BaseException as exc:  # raised on the writer's thread
                self._error = exc
            finally:
                (self._files if type(item) is tuple else self._chunks).release()

    def _hash_file(self, digest: bytes, size: int, buf: bytearray) -> None:
        view = memoryview(buf)
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

    def update(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._chunks.acquire()
        self._queue.put(data)

    def update_file(self, digest: bytes, size: int) -> None:
        """Hash the first ``size`` bytes of the blob ``digest``."""
        if self._error is not None:
            raise self._error
        self._files.acquire()
        self._queue.put((digest, size))

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest()

    def close(self, *, discard: bool = False) -> None:
        """Wait for the thread to end; with ``discard``, hash nothing more."""
        if not self._thread.is_alive():
            return
        self._discard = discard
        self._queue.put(None)  # unbounded: the end always goes in
        self._thread.join()


_Marker = type(threading.Lock())
_WriteItem = bytes | tuple[bytes, int, int] | _Marker | None  # type: ignore[valid-type]


class WriteThread:
    """The output's writes and copies, done in order on a thread of their own.

    At most ``_CHUNKS`` items wait (a chunk of about 1 MiB, or a big file's
    descriptor, which the thread closes once copied), so a slow disk holds
    the walk back rather than memory or descriptors growing. An error of the
    output (a reader gone, a full disk) is raised, as it was raised, by the
    next ``write``, ``copy`` or ``drain``; what waits after it is dropped.
    """

    def __init__(self, down: Callable[[bytes], object], copy: Copy | None) -> None:
        self._down = down
        self._copy = copy
        self._queue: queue.SimpleQueue[_WriteItem] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(_CHUNKS)
        self._error: BaseException | None = None
        self._drop = False
        self._thread = threading.Thread(target=self._run, name="layer-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        get, down, copy = self._queue.get, self._down, self._copy
        while (item := get()) is not None:
            if type(item) is _Marker:
                item.release()  # all before it is done: ``drain``
                continue
            try:
                if type(item) is bytes:
                    if self._error is None and not self._drop:
                        down(item)
                else:
                    head, fd, size = item  # type: ignore[misc]
                    try:
                        if self._error is None and not self._drop:
                            assert copy is not None
                            if head:
                                down(head)
                            copy(fd, size)
                    finally:
                        os.close(fd)
            except BaseException as exc:  # raised on the walk's thread
                self._error = exc
            finally:
                self._slots.release()

    def _put(self, item: bytes | tuple[bytes, int, int]) -> None:
        if self._error is not None:
            raise self._error
        self._slots.acquire()
        self._queue.put(item)

    def write(self, data: bytes) -> None:
        self._put(data)

    def copy(self, head: bytes, fd: int, size: int) -> None:
        """Write ``head``, then copy ``size`` bytes of ``fd`` out; the thread closes ``fd``."""
        self._put((head, fd, size))

    def drain(self) -> None:
        """Wait until all given is written; raise the output's error if any."""
        marker = threading.Lock()
        marker.acquire()
        self._queue.put(marker)
        marker.acquire()  # released by the thread once it reaches the marker
        if self._error is not None:
            raise self._error

    def close(self, *, discard: bool = False) -> None:
        """End the thread once what waits is written (dropped with ``discard`` or after an error)."""
        if self._thread.is_alive():
            self._drop = discard
            self._queue.put(None)
            self._thread.join()


class InlineWriter:
    """``WriteThread``'s calls done at once, on the caller's thread.

    For a layer whose digest is known: with no hash to overlap, a thread
    for the writes saves no wall time on a busy machine and costs CPU (a
    hand-over per chunk and per file).
    """

    def __init__(self, down: Callable[[bytes], object], copy: Copy | None) -> None:
        self.write = down
        self._copy = copy

    def copy(self, head: bytes, fd: int, size: int) -> None:
        try:
            if head:
                self.write(head)
            assert self._copy is not None
            self._copy(fd, size)
        finally:
            os.close(fd)

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
        self._writer = WriteThread(down, copy) if hash_it else InlineWriter(down, copy)
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

    def copy_file(self, fd: int, digest: bytes, size: int) -> None:
        """The first ``size`` bytes of ``fd``, the blob ``digest``, into the stream.

        The copy happens later, on the write thread, from a duplicate of
        ``fd``: the caller closes ``fd`` when it likes.
        """
        head = b""
        if self._buf:  # the file's header, in the same hand-over as its content
            head = bytes(self._buf)
            self._buf.clear()
            if self.hasher is not None:
                self.hasher.update(head)
            self.size += len(head)
        self._writer.copy(head, os.dup(fd), size)
        self.size += size
        if self.hasher is not None:
            self.hasher.update_file(digest, size)

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
