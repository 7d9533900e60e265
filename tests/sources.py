"""Real Debian source tarballs for tests and benchmarks.

    from tests.sources import source_tarball
    tarball = source_tarball("zlib")   # Path to zlib_1.2.13.dfsg.orig.tar.bz2

Tarballs live in $AMBER_TEST_CACHE/sources (default
/var/cache/amber-test/sources) and are listed in its MANIFEST
("name filename sha256 version" per line). A missing or corrupt one is fetched by
running scripts/fetch-sources, which needs network access to the Debian
mirror configured in /etc/apt and write access to the cache.

Note the compression differs (zlib's is .tar.bz2, the others .tar.gz):
unpack with `tar xf`, which detects it, not `tar xzf`.
"""

import hashlib
import os
import subprocess
from pathlib import Path

__all__ = ["KNOWN", "SourceUnavailable", "cache_dir", "source_tarball"]

REPO = Path(__file__).resolve().parent.parent
FETCH = REPO / "scripts" / "fetch-sources"
DEFAULT_CACHE = "/var/cache/amber-test"
KNOWN = ("zlib", "hello", "lua5.4")


class SourceUnavailable(RuntimeError):
    """The tarball is not cached and scripts/fetch-sources could not get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("AMBER_TEST_CACHE") or DEFAULT_CACHE)


def _manifest() -> dict:
    out = {}
    try:
        text = (cache_dir() / "sources" / "MANIFEST").read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            out[parts[0]] = (parts[1], parts[2])
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached(name: str):
    entry = _manifest().get(name)
    if entry is None:
        return None
    path = cache_dir() / "sources" / entry[0]
    if path.is_file() and _sha256(path) == entry[1]:
        return path
    return None


def source_tarball(name: str) -> Path:
    """Path of the cached Debian orig tarball of source package NAME.

    Runs scripts/fetch-sources NAME when it is not cached (or fails its
    checksum); raises SourceUnavailable with the script's output if that
    does not produce it."""
    path = _cached(name)
    if path is not None:
        return path
    try:
        res = subprocess.run(
            [str(FETCH), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
        )
        output, rc = res.stdout, res.returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        output, rc = str(e), None
    path = _cached(name)
    if path is None:
        raise SourceUnavailable(
            f"source tarball {name!r} is not in {cache_dir() / 'sources'} and "
            f"{FETCH} {name} could not fetch it (exit status {rc}; set "
            f"AMBER_TEST_CACHE to a writable directory if the default is not):\n" + output[-3000:]
        )
    return path
