"""Controlling filesystem processes from a trio program (the daemon, tests).

``open_overlay`` starts a filesystem process on a tree and yields a handle
to snapshot it; on every way out (normal exit, exception, cancellation, the
process dying or being killed) it stops the process and unmounts whatever is
left below the work directory, so nothing stays mounted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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

    async def snapshot(self) -> Snapshot:
        """The current state as a tree in the store (call between steps)."""
        reply = await self._request({"op": "snapshot"})
        return Snapshot(bytes.fromhex(reply["tree"]), SnapshotStats(**reply["stats"]))

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
    fs_mode = fsmode.check_mode(fs_mode or fsmode.default_fs_mode().name)
    # Traversable (the sandbox's host uids reach ``work/root``), not listable.
    work.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(work, 0o711)
    process, parent_end = await (pool.take() if pool is not None else _spawn())
    parent_end.setblocking(False)
    control = trio.SocketStream(trio.socket.from_stdlib_socket(parent_end))
    mount: OverlayMount | None = None
    request = {
        "op": "mount",
        "state_dir": str(state_dir),
        "tree": tree.hex(),
        "work": str(work),
        "id_base": ids.host_base if ids is not None else 0,
        "id_count": ids.count if ids is not None else IDENTITY.count,
        "fs_mode": fs_mode,
    }
    try:
        handle = OverlayMount(process, control, work / "root", work)
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
        handle.fs_mode = ready.get("fs_mode", fs_mode)
        mount = handle
        yield mount
    finally:
        with trio.CancelScope(shield=True):
            await _shutdown(process, mount)
            await control.aclose()
            await trio.to_thread.run_sync(_cleanup, work, keep_work)


async def _shutdown(process: trio.Process, mount: OverlayMount | None) -> None:
    if process.returncode is None and mount is not None:
        with trio.move_on_after(STOP_GRACE):
            await mount.stop()
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


def _cleanup(work: Path, keep_work: bool) -> None:
    unmount_all_under(work)
    if keep_work:
        return
    if mounts_under(work):
        raise FilesystemError(f"{work} still has mounts; not removing it")
    shutil.rmtree(work, ignore_errors=True)
