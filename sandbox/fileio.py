"""Byte-level file I/O for the store: sparse-aware copies and hashes, small reads.

Holes are found with SEEK_DATA/SEEK_HOLE and hashed as zeros without being
read or written, so a sparse 5 GiB file costs what its data costs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterator

from .digest import CHUNK, new_hasher

_libc = ctypes.CDLL(None, use_errno=True)
_ZEROS = bytes(CHUNK * 16)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def start_syncfs(path: bytes | str) -> threading.Thread:
    """syncfs(2) of ``path``'s filesystem on a thread of its own; join it to wait.

    For writes someone else made that a later syncfs would otherwise wait
    for: started early, their I/O overlaps the caller's work (ctypes drops
    the GIL). Failures are left to that later syncfs, which reports them.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def flush() -> None:
        try:
            _libc.syncfs(fd)
        finally:
            os.close(fd)

    thread = threading.Thread(target=flush, name="syncfs", daemon=True)
    thread.start()
    return thread


def read_small(path: str) -> bytes:
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


def object_matches(path: str, name: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        digest, _ = copy_and_hash(fd, None, size)
    finally:
        os.close(fd)
    return digest.hex() == name


def write_all(fd: int, data: bytes | memoryview) -> None:
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


def copy_and_hash(src: int, dst: int | None, size: int) -> tuple[bytes, int]:
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
