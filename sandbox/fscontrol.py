"""Controlling filesystem processes from a trio program (the daemon, tests).

``open_overlay`` starts a filesystem process on a tree and yields a handle
to snapshot it; on every way out (normal exit, exception, cancellation, the
process dying or being killed) it stops the process and unmounts whatever is
left below the work directory, so nothing stays mounted.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from . import fsmode
from .mounts import mounts_under, unmount_all_under
from .snapshot import SnapshotStats
from .userns import IDENTITY, IdMap

STOP_GRACE = 10.0
START_TIMEOUT = 30.0


class FilesystemError(Exception):
    """The filesystem process failed to start, died, or refused a request."""


@dataclass
class Snapshot:
    tree: bytes
    stats: SnapshotStats


class OverlayMount:
    """A live build root: ``root`` is the writable overlay mount point."""

    def __init__(self, process: trio.Process, control: trio.SocketStream, root: Path, work: Path):
        self.process = process
        self.root = root
        self.work = work
        self._control = control
        #: The mode it was mounted in (hidden-data may fall back to fuse-data).
        self.fs_mode = ""
        #: Seconds of each part of mounting: ``process`` (a spare taken, or a
        #: process started), then what the process measured (``model``,
        #: ``eager``, ``fuse``, ``overlay``), and ``wait`` (the whole mount request).
        self.timings: dict[str, float] = {}
        self._buffer = b""
        self._lock = trio.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _request(self, message: dict) -> dict:
        async with self._lock:
            reply = await self._exchange(message)
        if not reply.get("ok"):
            raise FilesystemError(reply.get("error", "filesystem process refused the request"))
        return reply

    async def _exchange(self, message: dict) -> dict:
        """Send one control line and read the answer."""
        try:
            await self._control.send_all(json.dumps(message).encode() + b"\n")
            return await self._read_line()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise FilesystemError(f"filesystem process {self.pid} is gone: {exc}") from None

    async def _read_line(self) -> dict:
        while b"\n" not in self._buffer:
            data = await self._control.receive_some(65536)
            if not data:
                raise FilesystemError(f"filesystem process {self.pid} closed its control channel")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    async def wake(self) -> None:
        """Make one FUSE request of the lower, through the overlay (a lookup of a name
        that is not there), before a request the process must read.

        pyfuse3 reads /dev/fuse blocking once trio says it is readable. A
        request withdrawn in between (its caller, a step's process, killed
        before the read: a cancel, a timeout) leaves that read, and with it
        the process's whole loop, blocked until the next FUSE request; after
        a step nothing may make one, and a snapshot or detach sent then went
        unread for ever (seen in CI: `amber cancel` hung). This is that next
        request.
        """

        def lookup() -> None:
            with suppress(OSError):
                os.lstat(self.root / f".amber-wake-{secrets.token_hex(8)}")

        await trio.to_thread.run_sync(lookup, abandon_on_cancel=True)

    async def snapshot(self, *, defer: bool = False) -> Snapshot:
        """The current state as a tree in the store (call between steps).

        ``defer``: answer once the upper is read and the new objects are
        written, and make them durable in the background, so the next step
        can start meanwhile; the tree is not in the store, and nothing may
        record it, until ``settle`` returns.
        """
        await self.wake()
        reply = await self._request({"op": "snapshot", "defer": defer})
        return Snapshot(bytes.fromhex(reply["tree"]), SnapshotStats(**reply["stats"]))

    async def settle(self) -> float:
        """Wait for a deferred snapshot's commit; the seconds it took (0.0: none pending).

        Raises ``FilesystemError`` when it failed (its objects are then gone).
        Not cancelled half-way: it runs beside a step a cancel may end, and
        an answer left unread would be taken for the next request's.
        """
        with trio.CancelScope(shield=True):
            await self.wake()
            reply = await self._request({"op": "settle"})
        return float(reply.get("seconds", 0.0))

    def peak_rss(self) -> int:
        """Peak resident memory of the filesystem process, in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    async def stop(self) -> None:
        with suppress(FilesystemError):
            await self._request({"op": "stop"})

    async def detach(self) -> None:
        """Unmount this build's overlay; the process keeps its lower for `attach`."""
        await self.wake()
        await self._request({"op": "detach"})

    async def attach(self, work: Path, view: bytes | None = None) -> None:
        """A fresh overlay at ``work/root`` over the same lower (after `detach`), showing
        tree ``view`` (None: the lower's) through a sources layer (``sourcelayer.py``)."""
        work.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(work, 0o711)
        started = time.perf_counter()
        request = {"op": "attach", "work": str(work), "view": view.hex() if view else None}
        with trio.fail_after(START_TIMEOUT):
            ready = await self._request(request)
        self.work, self.root = work, work / "root"
        self.timings = {**_timings(ready), "wait": time.perf_counter() - started}


Spawned = tuple[trio.Process, socket.socket]


async def _spawn() -> Spawned:
    """A filesystem process, importing its modules, waiting for a mount request."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = [sys.executable, "-m", "amber.sandbox.fsprocess", "--control-fd", str(child_end.fileno())]
    try:
        process = await trio.lowlevel.open_process(
            cmd, pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL
        )
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    return process, parent_end


class FilesystemPool:
    """Filesystem processes started ahead of need.

    Starting one costs a few hundred milliseconds of interpreter start-up
    and imports (trio, pyfuse3), paid on a build's first cache miss and on
    every ``amber shell``. The pool keeps ``size`` spares that have done that
    work and wait for a mount request; taking one starts its replacement.
    A spare whose controller dies sees its socket close and exits.
    """

    def __init__(self, size: int = 1):
        self.size = size
        self._spares: list[Spawned] = []
        self._closed = False

    async def take(self) -> Spawned:
        taken: Spawned | None = None
        while self._spares and taken is None:
            process, sock = self._spares.pop(0)
            if process.returncode is None:
                taken = (process, sock)
            else:
                sock.close()
        if taken is None:
            taken = await _spawn()
        while not self._closed and len(self._spares) < self.size:
            self._spares.append(await _spawn())
        return taken

    async def aclose(self) -> None:
        self._closed = True
        spares, self._spares = self._spares, []
        for _, sock in spares:
            sock.close()  # EOF: the spare exits
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for process, _ in spares:
                await process.wait()
        for process, _ in spares:
            if process.returncode is None:
                process.kill()


@asynccontextmanager
async def open_overlay(
    state_dir: Path,
    tree: bytes,
    work: Path,
    *,
    ids: IdMap | None = None,
    keep_work: bool = False,
    pool: FilesystemPool | None = None,
    fs_mode: str | None = None,
) -> AsyncIterator[OverlayMount]:
    """Mount ``tree`` writable at ``work/root`` for the duration of the block.

    ``work`` must not exist yet (or be empty); it is removed afterwards
    unless ``keep_work``. With a ``pool``, a warm spare process is used.
    ``fs_mode`` is a mode of ``fsmode.py``; without one, this process's
    default (probed once; ``AMBER_FS_MODE`` overrides it).
    """
    try:
        mount = await start_overlay(state_dir, tree, work, ids=ids, pool=pool, fs_mode=fs_mode)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cleanup_work, work, keep_work)
        raise
    try:
        yield mount
    finally:
        with trio.CancelScope(shield=True):
            await close_overlay(mount)
            await trio.to_thread.run_sync(cleanup_work, work, keep_work)


async def start_overlay(
    state_dir: Path,
    tree: bytes,
    work: Path,
    *,
    ids: IdMap | None = None,
    pool: FilesystemPool | None = None,
    fs_mode: str | None = None,
    home: Path | None = None,
    view: bytes | None = None,
) -> OverlayMount:
    """A filesystem process with ``tree`` mounted at ``work/root`` (see `open_overlay`).

    With ``home``, the lower and the eager layer are mounted there rather
    than below ``work``, so that the process can serve the next build's
    overlay over them (`OverlayMount.attach`). The caller stops it with
    `close_overlay` and removes ``work`` (and ``home``). With ``view``, the
    lower is ``tree`` and the build sees ``view`` (``sourcelayer.py``).
    """
    fs_mode = fsmode.check_mode(fs_mode or fsmode.default_fs_mode().name)
    # Traversable (the sandbox's host uids reach ``work/root``), not listable.
    work.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(work, 0o711)
    started = time.perf_counter()
    process, parent_end = await (pool.take() if pool is not None else _spawn())
    took = time.perf_counter() - started
    parent_end.setblocking(False)
    control = trio.SocketStream(trio.socket.from_stdlib_socket(parent_end))
    request = {
        "op": "mount",
        "state_dir": str(state_dir),
        "tree": tree.hex(),
        "work": str(work),
        "home": str(home) if home is not None else None,
        "view": view.hex() if view is not None else None,
        "id_base": ids.host_base if ids is not None else 0,
        "id_count": ids.count if ids is not None else IDENTITY.count,
        "fs_mode": fs_mode,
    }
    handle = OverlayMount(process, control, work / "root", work)
    try:
        started = time.perf_counter()
        ready = await _ready(handle, request)
        handle.fs_mode = ready.get("fs_mode", fs_mode)
        handle.timings = {"process": took, **_timings(ready), "wait": time.perf_counter() - started}
    except BaseException:
        with trio.CancelScope(shield=True):
            await _shutdown(process, None)
            await control.aclose()
        raise
    return handle


async def _ready(handle: OverlayMount, request: dict) -> dict:
    """Send the mount request and wait (a bounded time) for the process to say it is ready."""
    try:
        with trio.fail_after(START_TIMEOUT):
            ready = await handle._exchange(request)
    except trio.TooSlowError:
        # Only the start: a timeout in the caller's body is the caller's.
        raise FilesystemError(
            f"filesystem process did not mount within {START_TIMEOUT} s"
        ) from None
    if not ready.get("ready"):
        raise FilesystemError(f"filesystem process did not start: {ready}")
    return ready


async def close_overlay(mount: OverlayMount) -> None:
    """Stop the filesystem process (it unmounts what it mounted), killing it if it will not."""
    with trio.CancelScope(shield=True):
        await _shutdown(mount.process, mount)
        await mount._control.aclose()


def _timings(ready: dict) -> dict[str, float]:
    """The numbers of a ready message's ``timings`` (anything else is dropped)."""
    timings = ready.get("timings")
    if not isinstance(timings, dict):
        return {}
    return {str(k): float(v) for k, v in timings.items() if isinstance(v, int | float)}


async def _shutdown(process: trio.Process, mount: OverlayMount | None) -> None:
    if process.returncode is None and mount is not None:
        with trio.move_on_after(STOP_GRACE):
            await mount.stop()
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


def cleanup_work(work: Path, keep_work: bool = False) -> None:
    """Unmount whatever is left below ``work`` and remove it (unless ``keep_work``)."""
    unmount_all_under(work)
    if keep_work:
        return
    if mounts_under(work):
        raise FilesystemError(f"{work} still has mounts; not removing it")
    shutil.rmtree(work, ignore_errors=True)
