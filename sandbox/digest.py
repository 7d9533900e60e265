"""BLAKE3 hashing tuned for a build store.

Small files dominate builds, so they are read in one ``read`` and hashed in
one call; large files are streamed in big chunks and hashed with blake3's
threads, which release the GIL.
"""

from __future__ import annotations

import blake3

DIGEST_SIZE = 32
HEX_SIZE = 2 * DIGEST_SIZE
#: Reads this large keep syscalls per byte low without holding much memory.
CHUNK = 1 << 20
#: Above this size blake3's multithreaded mode pays for its start-up.
THREADED_MIN = 1 << 22

EMPTY = blake3.blake3(b"").digest()


def hash_bytes(data: bytes) -> bytes:
    """Digest of an in-memory buffer (raw 32 bytes)."""
    if len(data) >= THREADED_MIN:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


def new_hasher(size_hint: int = 0) -> blake3.blake3:
    """A hasher for streamed content; threaded when the content is large."""
    if size_hint >= THREADED_MIN:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


def from_hex(text: str) -> bytes:
    """Parse a hex digest given by a user or a peer; ``ValueError`` if malformed."""
    if len(text) != HEX_SIZE:
        raise ValueError(f"a digest has {HEX_SIZE} hex digits, got {len(text)}: {text!r}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"not a hex digest: {text!r}") from None
