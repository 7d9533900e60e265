"""A snapshot's commit in the background, so the next step starts while it syncs.

A snapshot has two parts: reading the upper and writing the new objects to
the store's ``tmp/`` (``Snapshotter.walk``), which must be done before the
next step changes the upper, and making them durable (two ``syncfs`` and the
renames, ``snapshot.commit``), which need not: the next step never reads
them. ``syncfs`` writes out everything dirty on the store's filesystem (the
step's own output in the upper, and any other process's writes there), so on
a busy host it is most of a snapshot's time. Only one commit runs at a time,
in order; the controller learns its end with ``settle`` and records the tree
only then.
"""

from __future__ import annotations

import time

import trio

from .batch import Batch
from .snapshot import commit


class DeferredCommits:
    """At most one commit running in the background; ``settle`` waits for it."""

    def __init__(self) -> None:
        self._done: trio.Event | None = None
        self._reply: dict = {"ok": True, "seconds": 0.0}

    def start(self, batch: Batch) -> None:
        """Commit ``batch`` in a thread; call ``settle`` first (one at a time)."""
        assert self._done is None, "settle the previous commit first"
        self._done = trio.Event()
        trio.lowlevel.spawn_system_task(self._commit, batch, self._done)

    async def _commit(self, batch: Batch, done: trio.Event) -> None:
        started = time.perf_counter()
        error = await self.run(batch)
        self._reply = {"ok": error is None, "seconds": time.perf_counter() - started}
        if error is not None:
            self._reply["error"] = f"snapshot commit failed: {error}"
        done.set()

    @staticmethod
    async def run(batch: Batch) -> str | None:
        """Commit ``batch`` now (aborted if that fails); why it failed, or None."""
        try:
            # Not abandoned on cancel: a batch is committed or aborted, never left.
            await trio.to_thread.run_sync(commit, batch)
        except Exception as exc:
            return str(exc)
        return None

    async def settle(self) -> dict:
        """The last commit's outcome once it ended, as a control reply (once each)."""
        if self._done is None:
            return {"ok": True, "seconds": 0.0}
        await self._done.wait()
        self._done = None
        reply, self._reply = self._reply, {"ok": True, "seconds": 0.0}
        return reply
