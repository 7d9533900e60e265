"""gzip compression spread over threads, pigz's way.

The input is cut into blocks; each block is deflated on a worker thread with
the previous block's last 32 KiB as its dictionary and ends on a sync flush,
so the pieces concatenate into one ordinary deflate stream inside one gzip
member: any gzip reader takes it, the ratio is that of plain gzip, and zlib
releases the GIL so blocks really compress in parallel. The output depends
only on the input, the level and the block size, never on the thread count,
so the same layer gets the same digest on every host.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

BLOCK_SIZE = 1 << 20
WINDOW = 32 << 10
_HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])  # no name, mtime 0, OS unknown


def _deflate(block: bytes, zdict: bytes, level: int, final: bool) -> bytes:
    if zdict:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(block) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


class ParallelGzip:
    """A file-like sink: ``write`` plain bytes, compressed bytes go to ``out``."""

    def __init__(
        self,
        out: Callable[[bytes], object],
        *,
        level: int = 1,
        threads: int | None = None,
        block_size: int = BLOCK_SIZE,
    ):
        self._out = out
        self._level = level
        self._block_size = block_size
        self._threads = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="gzip")
        self._pending: deque[Future[bytes]] = deque()
        self._buf = bytearray()
        self._zdict = b""
        self._crc = 0
        self._size = 0
        self._out(_HEADER)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._buf += data
        while len(self._buf) >= self._block_size:
            block = bytes(self._buf[: self._block_size])
            del self._buf[: self._block_size]
            self._submit(block, final=False)

    def close(self) -> None:
        """Compress what is left and write the gzip trailer."""
        try:
            self._submit(bytes(self._buf), final=True)
            self._buf.clear()
            while self._pending:
                self._out(self._pending.popleft().result())
            self._out(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, block: bytes, *, final: bool) -> None:
        self._pending.append(self._pool.submit(_deflate, block, self._zdict, self._level, final))
        self._zdict = block[-WINDOW:] if len(block) >= WINDOW else (self._zdict + block)[-WINDOW:]
        # Bounded in-flight work keeps memory at a few blocks per thread.
        while len(self._pending) > 2 * self._threads:
            self._out(self._pending.popleft().result())
