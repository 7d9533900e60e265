"""Reading step logs in bounded chunks: from a log blob, or a log file as it grows.

Nothing here holds a whole log: a step may print gigabytes, and every
follower of every build would otherwise keep its own copy in amberd (and
send it as one frame, which fails over the frame limit). A follower reads
``CHUNK`` bytes at a time and sends each before reading the next, so a slow
client slows only its own stream.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from amber.daemon.errors import NotFound
from amber.sandbox.store import Store

#: The most of a log read (and sent in one event) at a time.
CHUNK = 256 << 10


async def fd_chunks(fd: int, offset: int = 0) -> AsyncIterator[bytes]:
    """What ``fd`` holds from ``offset`` to its current end; closes nothing."""
    while data := await trio.to_thread.run_sync(os.pread, fd, CHUNK, offset):
        offset += len(data)
        yield data


async def blob_chunks(store: Store, digest: bytes) -> AsyncIterator[bytes]:
    """A log blob, chunk by chunk."""
    fd = await trio.to_thread.run_sync(store.open_blob, digest)
    try:
        async for data in fd_chunks(fd):
            yield data
    finally:
        os.close(fd)


class BlobLog:
    """A log already in the store, as a build's followers read it (a cached failure's)."""

    def __init__(self, store: Store, digest: bytes):
        self.store = store
        self.digest = digest

    def chunks(self) -> AsyncIterator[bytes]:
        return blob_chunks(self.store, self.digest)


def open_log_file(path: Path) -> int | None:
    """A step's log file for reading: a regular file amberd wrote, never a link.

    None when there is none (the step has not started, or its log went to
    the store).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise NotFound(f"the log {path.name} cannot be read: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise NotFound(f"the log {path.name} is not a file amberd wrote")
    return fd


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    """A log file as it is now (a step that is running, or was interrupted)."""
    fd = open_log_file(path)
    if fd is None:
        return
    try:
        async for data in fd_chunks(fd):
            yield data
    finally:
        os.close(fd)
