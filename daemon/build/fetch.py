"""Downloading ``url`` sources into the store, once, by the daemon.

The sandbox never fetches: amberd does, before the first step, and keeps
what it fetched in the store by digest. A download index (the ``downloads``
table) maps each fetched content's sha256 and BLAKE3 digests to its blob,
so a later build that names the same digest finds it there and never
touches the network again: it works offline.

Where a source is looked for, in order:

- the store, when the spec's ``blake3`` names a blob it holds, or the index
  knows its ``sha256``;
- each mirror of the config (``mirrors``), for ``http://`` and ``https://``
  sources: a mirror is a URL prefix, and the candidate is the prefix, a
  ``/`` and the *file name* of the source URL, i.e. the last segment of its
  path as written in the URL (``https://mirror.example/pkgs`` and
  ``https://zlib.net/fossils/zlib-1.2.13.tar.gz`` give
  ``https://mirror.example/pkgs/zlib-1.2.13.tar.gz``). This is how Buildroot's
  and Heads' package mirrors are laid out: one flat folder of tarballs;
- the source's own URL. ``file://`` URLs are opened by a helper that is the
  client for real (sandbox/asuser.py), like ``path`` sources, and are not mirrored.

Each candidate is streamed to a temporary file in the store while sha256
and BLAKE3 are computed (one read of the bytes), then checked against the
spec's digests: only content that matches becomes a blob. A mismatch is
remembered and the next candidate tried; when no candidate has the right
content, ``DigestMismatch`` names the expected and the actual digest. The
build then *fails* (the spec or the upstream file is wrong, retrying will
not help) rather than *errors*; a source nobody could serve (network down,
404 everywhere) raises ``SourceError`` and the build errors, since that is
outside the build and may pass.

Downloads run in worker threads (stdlib ``urllib``, blocking) under
``FetchLimits``: a stall timeout (``fetch-timeout``: no byte for that long
and the candidate is given up, however long the whole download takes) and a
size cap (``source-max-size``). ``file://`` URLs must name regular files
(``/dev/zero`` or a FIFO is refused before a byte is read). A cancelled
build stops its download at the next chunk. Large downloads report progress
as build notes.

Builds that need the same content at once wait for one download rather than
each fetching it, but only while that download makes progress: a waiter
whose holder has sent nothing for half the stall timeout fetches on its own
into its own temporary file (the store's rename makes the first to finish
win), so one user's stuck download never holds another's build hostage.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import trio

from amber.client import __version__
from amber.client.units import human_bytes
from amber.daemon.build.spec import Source, Spec
from amber.daemon.config import Config
from amber.daemon.errors import NotFound
from amber.daemon.storage.db import Database
from amber.daemon.userfiles import NotRegularFile, open_regular_as
from amber.daemon.userthreads import run_as_user
from amber.sandbox.asuser import HelperError, Unreadable, User, UserReader
from amber.sandbox.digest import CHUNK, from_hex, new_hasher
from amber.sandbox.store import Batch, Store

__all__ = [
    "MAX_DOWNLOAD",
    "TIMEOUT",
    "DigestMismatch",
    "FetchLimits",
    "Fetched",
    "Progress",
    "SourceError",
    "candidate_urls",
    "fetch_sources",
    "known_source",
    "open_url",
]

#: Default stall timeout (connecting, and each read) for one candidate, in seconds.
TIMEOUT = 30.0
#: Default size cap: a download larger than this is refused (a runaway or hostile server).
MAX_DOWNLOAD = 64 << 30
_READ = 4 * CHUNK

Note = Callable[[str], None]


@dataclass(frozen=True)
class FetchLimits:
    """How long a source may send nothing, and how large it may be (config options
    ``fetch-timeout`` and ``source-max-size``)."""

    stall_timeout: float = TIMEOUT
    max_size: int = MAX_DOWNLOAD

    @classmethod
    def of(cls, config: Config) -> FetchLimits:
        return cls(config.fetch_timeout, config.source_max_size)


class SourceError(NotFound):
    """A source could not be had (no candidate reachable, too large, unreadable)."""


class DigestMismatch(SourceError):
    """Content whose digest is not the one the spec names: the build fails."""

    def __init__(self, label: str, where: str, algorithm: str, expected: str, actual: str):
        origin = "" if where in label else f" (from {where})"
        super().__init__(
            f"{label}: {algorithm} mismatch{origin}: expected {expected}, got {actual}"
        )
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class Fetched:
    """A source's verified content in the store."""

    blob: bytes  # BLAKE3 digest, the store's name for it
    size: int
    sha256: str | None  # None only for content found by BLAKE3 alone
    url: str | None  # where it came from this time; None when it was in the store


def source_label(index: int, source: Source) -> str:
    """How messages name a source: ``source[2] https://...`` (1-based, as in the spec)."""
    return f"source[{index + 1}] {source.url or source.path}"


# --------------------------------------------------------------------------- candidates


def candidate_urls(url: str, mirrors: Sequence[str]) -> list[str]:
    """Where to look for ``url``, in order: each mirror, then the URL itself.

    Only http(s) sources are mirrored, by file name (see the module docstring).
    """
    parts = urllib.parse.urlsplit(url)
    name = parts.path.rsplit("/", 1)[-1]
    # A name that decodes to a path (%2F, "..") would climb out of a file://
    # mirror, which the daemon reads with its own rights: such URLs are not mirrored.
    plain = urllib.parse.unquote(name)
    safe = plain not in ("", ".", "..") and not any(c in plain for c in "/\\\0")
    out: list[str] = []
    if parts.scheme in ("http", "https") and safe:
        for mirror in mirrors:
            candidate = f"{mirror.rstrip('/')}/{name}"
            if candidate not in out and candidate != url:
                out.append(candidate)
    out.append(url)
    return out


# --------------------------------------------------------------------------- the index


def known_source(
    store: Store, db: Database, source: Source, label: str | None = None
) -> Fetched | None:
    """The source's content when the store already holds it (no network, no read).

    Raises:
        DigestMismatch: the index knows content with the spec's sha256 whose
            BLAKE3 differs from the spec's ``blake3``: the two digests
            cannot both be right.
    """
    if source.sha256 is not None:
        row = db.find_download(sha256=source.sha256)
        if row is not None and store.has_blob(from_hex(row["blob"])):
            if source.blake3 is not None and row["blob"] != source.blake3:
                raise DigestMismatch(
                    label or f"source {source.url}",
                    f"the content with sha256 {source.sha256}",
                    "blake3",
                    source.blake3,
                    row["blob"],
                )
            return Fetched(from_hex(row["blob"]), row["size"], row["sha256"], None)
    if source.blake3 is not None and source.sha256 is None:
        blob = from_hex(source.blake3)
        if store.has_blob(blob):
            row = db.find_download(blob=source.blake3)
            sha256 = row["sha256"] if row is not None else None
            return Fetched(blob, os.stat(store.blob_path(blob)).st_size, sha256, None)
    return None


# --------------------------------------------------------------------------- progress


class Progress:
    """Decides when a download is worth a note: every 10% (or 5 s when the
    size is unknown), at most once a second, so small or fast downloads say
    nothing between their start and end notes."""

    def __init__(
        self,
        say: Note,
        label: str,
        total: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.say = say
        self.label = label
        self.total = total if total else None
        self.clock = clock
        self.started = self.last = clock()
        self.next_tenth = 1

    def update(self, done: int) -> None:
        now = self.clock()
        if now - self.last < 1.0:
            return
        rate = done / max(now - self.started, 1e-6)
        if self.total is not None:
            tenth = done * 10 // self.total
            if tenth < self.next_tenth:
                return
            self.next_tenth = tenth + 1
            text = f"{tenth * 10}% of {human_bytes(self.total)}"
        elif now - self.last < 5.0:
            return
        else:
            text = f"{human_bytes(done)} so far"
        self.last = now
        self.say(f"{self.label}: {text} ({human_bytes(int(rate))}/s)")


# --------------------------------------------------------------------------- fetching


@dataclass
class _Download:
    """A download under way that other builds may wait for."""

    done: trio.Event = field(default_factory=trio.Event)
    #: time.monotonic() of its last sign of life (start, a candidate, a chunk)
    alive: float = field(default_factory=time.monotonic)


# The download of each expected digest under way, if any.
_inflight: dict[str, _Download] = {}


async def _wait_for_other(key: str, patience: float) -> None:
    """Wait while another build's download of ``key`` makes progress.

    Returns when there is none (any more), or when the one there has shown
    no sign of life for ``patience`` seconds: the caller then fetches on its
    own rather than share its stall.
    """
    while (other := _inflight.get(key)) is not None:
        left = other.alive + patience - time.monotonic()
        if left <= 0:
            return
        with trio.move_on_after(left):
            await other.done.wait()


@contextlib.contextmanager
def _holding(key: str) -> Iterator[_Download]:
    """Announce this download of ``key`` to waiters (unless a stuck one already is)."""
    mine = _Download()
    registered = key not in _inflight
    if registered:
        _inflight[key] = mine
    try:
        yield mine
    finally:
        mine.done.set()
        if registered:
            del _inflight[key]


async def fetch_sources(
    store: Store,
    db: Database,
    spec: Spec,
    *,
    mirrors: Sequence[str],
    uid: int,
    gid: int,
    groups: tuple[int, ...] = (),
    note: Note,
    limits: FetchLimits = FetchLimits(),
) -> dict[int, Fetched]:
    """Every ``url`` source of ``spec`` in the store, by its index in ``spec.sources``.

    ``note`` is called on the trio thread with progress messages. Cancelling
    stops a download at its next chunk and leaves nothing in the store.

    Raises:
        DigestMismatch: no candidate had content with the spec's digests.
        SourceError: no candidate could be read at all.
    """
    out: dict[int, Fetched] = {}
    for index, source in enumerate(spec.sources):
        if source.url is None:
            continue
        out[index] = await fetch_one(
            store,
            db,
            index,
            source,
            mirrors=mirrors,
            user=User(uid, gid, groups),
            note=note,
            limits=limits,
        )
    return out


async def fetch_one(
    store: Store,
    db: Database,
    index: int,
    source: Source,
    *,
    mirrors: Sequence[str],
    user: User,
    note: Note,
    limits: FetchLimits = FetchLimits(),
) -> Fetched:
    """One url source (see ``fetch_sources``)."""
    assert source.url is not None
    label = source_label(index, source)
    known = known_source(store, db, source, label)
    if known is not None:
        return known
    key = source.sha256 or source.blake3 or source.url
    await _wait_for_other(key, limits.stall_timeout / 2)
    known = known_source(store, db, source, label)  # another build may have fetched it
    if known is not None:
        return known
    with _holding(key) as mine:
        mismatch: DigestMismatch | None = None
        failures: list[str] = []
        candidates = candidate_urls(source.url, mirrors)
        for number, url in enumerate(candidates, 1):
            mirror = "" if url == source.url else f" from {url}"
            note(f"{label}: fetching{mirror}")
            more = "; trying the next place" if number < len(candidates) else ""
            mine.alive = time.monotonic()
            try:
                fetched = await _in_thread(
                    store, label, source, url, user=user, note=note, limits=limits, alive=mine,
                )  # fmt: skip
            except DigestMismatch as exc:
                mismatch = mismatch or exc  # reported unless another candidate has it right
                note(f"{label}: {url} has other content ({exc.algorithm} {exc.actual}){more}")
                continue
            except SourceError as exc:
                failures.append(f"{url}: {exc.message}")
                note(f"{label}: {url}: {exc.message}{more}")
                continue
            assert fetched.sha256 is not None
            db.put_download(fetched.blob.hex(), fetched.sha256, fetched.size, url)
            note(f"{label}: fetched {human_bytes(fetched.size)}{mirror}, verified")
            return fetched
    if mismatch is not None:
        raise mismatch
    raise SourceError(f"{label}: could not fetch it: " + "; ".join(failures))


async def _in_thread(
    store: Store,
    label: str,
    source: Source,
    url: str,
    *,
    user: User,
    note: Note,
    limits: FetchLimits,
    alive: _Download,
) -> Fetched:
    """Run one download in a worker thread; cancelling the caller stops it."""
    stop = threading.Event()

    def say(message: str) -> None:
        with contextlib.suppress(trio.RunFinishedError, trio.Cancelled):
            trio.from_thread.run_sync(note, message)

    def work() -> Fetched:
        own = url == source.url  # a file:// mirror is the admin's, read as the daemon
        with open_url(url, user=user if own else User(0, 0), limits=limits) as (stream, total):
            progress = Progress(say, label, total)

            def update(done: int) -> None:
                alive.alive = time.monotonic()  # a float store: safe from this thread
                progress.update(done)

            with store.batch() as batch:
                return ingest(
                    store, stream, source, url, label, total, update, batch, stop,
                    max_size=limits.max_size, stall_timeout=limits.stall_timeout,
                )  # fmt: skip

    try:
        # A file:// source of the user's is read by their helper, which they may stop:
        # on their own threads. Downloads and the admin's mirrors are no one's to stall.
        reader = user.uid if url == source.url and url.startswith("file:") else 0
        return await run_as_user(reader, work, abandon_on_cancel=True)
    except BaseException:
        stop.set()  # an abandoned thread stops at its next chunk and cleans up
        raise


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would follow ftp:// too)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),  # honours the daemon's http(s)_proxy
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def open_url(
    url: str, *, user: User, limits: FetchLimits = FetchLimits()
) -> Iterator[tuple[BinaryIO, int | None]]:
    """A readable stream on ``url`` and its size when known. Blocking.

    A ``file://`` URL must name a regular file (a link to one is followed,
    as the user: a URL is not a path in the spec's directory).
    """

    parts = urllib.parse.urlsplit(url)
    try:
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise SourceError(f"file:// url on another host: {url}")
            path = urllib.request.url2pathname(parts.path)
            with UserReader(user) as reader:
                fd = open_regular_as(reader, path, follow_symlinks=True)
            stream: BinaryIO = os.fdopen(fd, "rb")
            total: int | None = os.fstat(stream.fileno()).st_size
        else:
            request = urllib.request.Request(url, headers={"User-Agent": f"amber/{__version__}"})
            stream = _opener().open(request, timeout=limits.stall_timeout)
            length = stream.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
    except urllib.error.HTTPError as exc:
        raise SourceError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise SourceError(str(exc.reason)) from None
    except (Unreadable, HelperError) as exc:
        raise SourceError(str(exc)) from None
    except NotRegularFile as exc:
        raise SourceError(f"{exc}: only regular files can be sources") from None
    except TimeoutError:
        raise SourceError(_stalled(limits.stall_timeout, 0)) from None
    except (OSError, ValueError) as exc:
        raise SourceError(getattr(exc, "strerror", None) or str(exc)) from None
    try:
        if total is not None and total > limits.max_size:
            raise SourceError(_too_large(total, limits.max_size))
        yield stream, total
    finally:
        stream.close()


def ingest(
    store: Store,
    stream: BinaryIO,
    source: Source,
    where: str,
    label: str,
    total: int | None,
    progress: Callable[[int], None],
    batch: Batch,
    stop: threading.Event | None = None,
    *,
    max_size: int = MAX_DOWNLOAD,
    stall_timeout: float = TIMEOUT,
) -> Fetched:
    """Copy ``stream`` into ``batch``, hashing as it goes, if it has the source's digests.

    One read of the bytes: each chunk goes to a temporary file in the store
    and into a sha256 and a BLAKE3 hasher. Only verified content joins the
    batch (made durable with the rest of it); anything else leaves no trace.

    Raises:
        DigestMismatch: the content is not what the spec names.
        SourceError: reading failed, or the content is larger than allowed.
    """
    sha = hashlib.sha256()
    b3 = new_hasher(total or 0)
    fd, temp = batch.new_temp()
    try:
        try:
            size = _copy(stream, fd, (sha, b3), progress, stop, max_size, stall_timeout)
        finally:
            os.close(fd)
        if total is not None and size != total:
            raise SourceError(f"got {size} bytes of {total}")
        blob, sha256 = b3.digest(), sha.hexdigest()
        for algorithm, expected, actual in (
            ("sha256", source.sha256, sha256),
            ("blake3", source.blake3, blob.hex()),
        ):
            if expected is not None and expected != actual:
                raise DigestMismatch(label, where, algorithm, expected, actual)
    except BaseException:
        batch.discard(temp)
        raise
    batch.adopt_blob(temp, blob, size)
    return Fetched(blob, size, sha256, where)


def _copy(
    stream: BinaryIO,
    fd: int,
    hashers: tuple,
    progress: Callable[[int], None],
    stop: threading.Event | None,
    max_size: int,
    stall_timeout: float,
) -> int:
    """``stream`` into ``fd`` and every hasher, chunk by chunk; the size copied."""
    size = 0
    read = getattr(stream, "read1", stream.read)  # what has arrived, not a full buffer
    try:
        while chunk := read(_READ):
            if stop is not None and stop.is_set():
                raise SourceError("cancelled")
            size += len(chunk)
            if size > max_size:
                raise SourceError(_too_large(size, max_size, more=True))
            for hasher in hashers:
                hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            progress(size)
    except TimeoutError:
        raise SourceError(_stalled(stall_timeout, size)) from None
    except (OSError, ValueError) as exc:  # resets are OSErrors
        raise SourceError(f"reading failed after {human_bytes(size)}: {exc}") from None
    return size


def _too_large(size: int, limit: int, *, more: bool = False) -> str:
    what = f"more than {human_bytes(size - 1)}" if more else human_bytes(size)
    return f"{what}: larger than the {human_bytes(limit)} a source may be (source-max-size)"


def _stalled(timeout: float, size: int) -> str:
    return f"stalled: nothing arrived for {timeout:g}s after {human_bytes(size)} (fetch-timeout)"
