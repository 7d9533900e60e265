"""Filesystem processes kept after a build, lower still mounted, for the next build on the same tree.

A fresh mount pays, before the step's first command, for a process, the
eager layer (about 0.1 s for a Debian rootfs), and then, during the build,
for every first lookup of a name in the FUSE lower (overlayfs asks once per
inode, so a fresh mount asks for everything the build touches: about 400
LOOKUPs and 400 GETXATTRs per zlib build, each a round trip to Python).
A lower that served the previous build on the same tree has all of that
in the kernel's caches already. So when a build's mount closes, its
process unmounts only the build's overlay (``detach``) and waits, with its
eager layer and FUSE lower mounted in a directory of its own (``home``);
the next build on the same tree with the same id range gets a fresh upper
and overlay over them (``attach``) in milliseconds.

What a build sees does not change: its overlay and upper are its own and
new (the previous build's upper is removed with its work directory before
anyone else could attach), the lower is read-only, and its content is the
tree's, addressed by digest. The key includes the id range (the lower
shows the tree's owners as that range's host ids), so a lower serves one
build at a time, and two builds running at once never share one: a running
build's ids are its own (``IdPool``). Sequential builds get the lowest free
range, so a workstation's rebuilds and a benchmark's runs reuse one lower.

A build's tree changes with its sources (every edit-rebuild cycle) while
its base stays, so a build that names its ``base`` is served by a lower of
the base, with what its tree adds made as a small sources layer of its own
at attach (``sourcelayer.py``); the key is then the base's. Where no such
layer can be made (too large a difference, a hard-link group, no data-only
layer, ``AMBER_SOURCE_LAYER=0``) the lower is of the tree itself, as before.

An idle lower is stopped ``linger`` seconds after its last build ended
(``AMBER_LOWER_LINGER``, default 60; 0 keeps none, every mount is then as
before), when more than ``keep`` are idle (the oldest), and at ``aclose``
(amberd stopping). A process that failed to detach or attach is stopped,
never reused.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from . import fsmode, sourcelayer
from .fscontrol import (
    FilesystemError,
    FilesystemPool,
    OverlayMount,
    cleanup_work,
    close_overlay,
    start_overlay,
)
from .mounts import mounts_under, unmount_all_under
from .store import Store
from .userns import IdMap

DEFAULT_LINGER = 60.0
#: A detach not answered by then: the process is stopped, not kept.
DETACH_TIMEOUT = 10.0
DEFAULT_KEEP = 4

Key = tuple[str, bytes, int, int, str]


def linger_from_environment(default: float = DEFAULT_LINGER) -> float:
    """``AMBER_LOWER_LINGER`` in seconds (0 disables sharing); unset or unreadable: ``default``."""
    try:
        return max(0.0, float(os.environ["AMBER_LOWER_LINGER"]))
    except (KeyError, ValueError):
        return default


@dataclass
class _Idle:
    mount: OverlayMount
    home: Path
    since: float  # time.monotonic() when its last build ended


class SharedLowers:
    """Idle filesystem processes by (store, tree, id range, mode); see the module notes."""

    def __init__(
        self,
        pool: FilesystemPool | None,
        home_dir: Path,
        *,
        linger: float = DEFAULT_LINGER,
        keep: int = DEFAULT_KEEP,
        store: Store | None = None,
    ):
        self.pool = pool
        #: Where trees are read to plan a sources layer (None: no layers).
        self.store = store
        self.source_layer = sourcelayer.enabled_from_environment()
        self.home_dir = home_dir
        self.linger = linger
        self.keep = keep
        self._idle: dict[Key, _Idle] = {}
        self._homes: dict[int, Path] = {}  # pid of a running process -> its home
        self._count = 0
        self._closed = False
        #: Work directories of ended builds, renamed aside, for ``run`` to delete.
        self._trash: list[Path] = []
        self._wake = trio.Event()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @asynccontextmanager
    async def open(
        self,
        state_dir: Path,
        tree: bytes,
        work: Path,
        *,
        ids: IdMap,
        fs_mode: str,
        base: bytes | None = None,
    ) -> AsyncIterator[OverlayMount]:
        """``tree`` mounted at ``work/root`` for the block, over a kept lower when there is one.

        ``base``: the tree ``tree`` was laid out on; a lower of it serves, with a
        sources layer, when one can be made (see the module notes).
        """
        try:
            lower = await self._lower_for(tree, base, fs_mode)
            key, mount = await self._mount(state_dir, lower, tree, work, ids, fs_mode)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(cleanup_work, work)
            raise
        try:
            yield mount
        finally:
            with trio.CancelScope(shield=True):
                await self._release(key, mount)

    async def _lower_for(self, tree: bytes, base: bytes | None, fs_mode: str) -> bytes:
        """The tree of the lower to serve ``tree`` with: ``base`` when a sources layer can
        make up the difference, else ``tree`` itself."""
        if base is None or base == tree or self.store is None or not self.source_layer:
            return tree
        if self.linger <= 0 or self._closed or fs_mode != fsmode.DATALOWER:
            return tree  # kept for no one; or no data-only layer for its stubs
        ops = await trio.to_thread.run_sync(sourcelayer.plan, self.store, base, tree)
        return tree if ops is None else base

    async def _mount(
        self, state_dir: Path, lower: bytes, tree: bytes, work: Path, ids: IdMap, fs_mode: str
    ) -> tuple[Key, OverlayMount]:
        """``tree`` at ``work/root`` over a lower of ``lower``: kept or new, with its key.

        A sources layer the filesystem process could not make after all (tmpfs
        refused an entry) leaves the build to a lower of ``tree`` itself.
        """
        view = tree if lower != tree else None
        key: Key = (str(state_dir), lower, ids.host_base, ids.count, fs_mode)
        try:
            mount = await self._reuse(key, work, view)
            if mount is None:
                mount = await self._start(state_dir, lower, work, ids, fs_mode, view)
            return key, mount
        except FilesystemError:
            if view is None:
                raise
        await trio.to_thread.run_sync(cleanup_work, work)
        return await self._mount(state_dir, tree, tree, work, ids, fs_mode)

    async def _start(self, state_dir: Path, tree: bytes, work: Path, ids: IdMap, fs_mode: str,
                     view: bytes | None) -> OverlayMount:  # fmt: skip
        """A new process with a lower of ``tree`` (kept after the build when sharing is on)."""
        home = None
        if self.linger > 0 and not self._closed:
            self._count += 1
            home = self.home_dir / f"lower-{os.getpid()}-{self._count}"
        try:
            mount = await start_overlay(state_dir, tree, work, ids=ids, pool=self.pool,
                                        fs_mode=fs_mode, home=home, view=view)  # fmt: skip
        except BaseException:
            if home is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(cleanup_work, home)
            raise
        if home is not None:
            self._homes[mount.pid] = home
        return mount

    async def _reuse(self, key: Key, work: Path, view: bytes | None) -> OverlayMount | None:
        idle = self._idle.pop(key, None)
        if idle is None:
            return None
        try:
            await idle.mount.attach(work, view)
        except (FilesystemError, OSError, trio.TooSlowError):
            await self._stop(idle.mount)
            return None
        return idle.mount

    async def _release(self, key: Key, mount: OverlayMount) -> None:
        """The build is over: keep its process idle (overlay unmounted), or stop it."""
        kept = False
        home = self._homes.get(mount.pid)
        if home is not None and not self._closed and mount.process.returncode is None:
            with trio.move_on_after(DETACH_TIMEOUT), suppress(FilesystemError):
                await mount.detach()  # wakes the loop first (fscontrol.OverlayMount.wake)
                kept = True
        if not kept:
            await self._stop(mount)
        await self._discard(mount.work)
        if kept:
            assert home is not None
            self._idle[key] = _Idle(mount, home, time.monotonic())
            while len(self._idle) > self.keep:
                oldest = min(self._idle, key=lambda k: self._idle[k].since)
                await self._stop(self._idle.pop(oldest).mount)

    async def _stop(self, mount: OverlayMount) -> None:
        await close_overlay(mount)
        home = self._homes.pop(mount.pid, None)
        if home is not None:
            await trio.to_thread.run_sync(cleanup_work, home)

    async def _discard(self, work: Path) -> None:
        """Remove a build's work directory (its upper: thousands of files after a
        compile) off the build's critical path: renamed aside now, deleted by ``run``."""
        self._count += 1
        aside = self.home_dir / f".trash-{os.getpid()}-{self._count}"
        moved = await trio.to_thread.run_sync(_set_aside, work, aside)
        if moved:
            self._trash.append(aside)
            self._wake.set()

    async def _empty_trash(self) -> None:
        while self._trash:
            await trio.to_thread.run_sync(cleanup_work, self._trash.pop(0))

    async def expire(self, now: float | None = None) -> int:
        """Stop the idle lowers whose linger is over; how many."""
        now = time.monotonic() if now is None else now
        over = [k for k, idle in self._idle.items() if now - idle.since >= self.linger]
        for key in over:
            await self._stop(self._idle.pop(key).mount)
        return len(over)

    async def run(self, interval: float = 1.0) -> None:
        """Expire idle lowers until cancelled (a task of the daemon's)."""
        while True:
            with trio.move_on_after(min(interval, max(self.linger, 0.05))):
                await self._wake.wait()
            self._wake = trio.Event()
            with trio.CancelScope(shield=True):
                await self.expire()
                await self._empty_trash()

    async def aclose(self) -> None:
        """Stop every idle lower; builds still running stop theirs when they end."""
        self._closed = True
        with trio.CancelScope(shield=True):
            while self._idle:
                _, idle = self._idle.popitem()
                await self._stop(idle.mount)
            await self._empty_trash()


def _set_aside(work: Path, aside: Path) -> bool:
    """Unmount what is left below ``work`` and rename it to ``aside`` (False: removed here instead)."""
    unmount_all_under(work)
    if mounts_under(work):
        raise FilesystemError(f"{work} still has mounts; not removing it")
    try:
        os.rename(work, aside)
    except FileNotFoundError:
        return False
    except OSError:
        cleanup_work(work)
        return False
    return True
