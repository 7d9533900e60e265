"""How much an image import may unpack, counted across the whole import.

A compressed archive is decompressed before it is read, and each layer is
decompressed as it is applied: a few kilobytes of gzip can stand for
terabytes. ``Budget`` counts every uncompressed byte of one import (the
archive decompressed, then the layers) against ``import-max-size`` and
refuses the image the moment it would pass it. Spooled data goes to the
state directory's ``tmp`` (an anonymous file, gone when closed, however the
import ends), never to the host's ``/tmp``.
"""

from __future__ import annotations

from dataclasses import dataclass

from amber.daemon.oci.spec import OciError

#: Default cap on what one import may unpack (config ``import-max-size``).
MAX_IMPORT = 256 << 30


@dataclass
class Budget:
    """Uncompressed bytes one import may still unpack."""

    max_size: int = MAX_IMPORT
    #: where a compressed archive is decompressed to; None: the store's tmp
    tmp_dir: str | None = None
    used: int = 0

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > self.max_size:
            raise OciError(
                f"the image unpacks to more than {_gib(self.max_size)} (import-max-size): refused"
            )


def _gib(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"
