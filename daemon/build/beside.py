"""Run a step while the step before it finishes being stored.

A step's snapshot is committed to the store in the background
(``sandbox/deferredcommit.py``) while the next step runs; the executor
records that step's result once the commit is done. Both are awaited here
side by side, each one's error kept, so neither's failure cancels the other
and the caller gets a plain exception, never a group.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")


def deferring() -> bool:
    """Whether snapshots commit beside the next step: ``AMBER_SNAPSHOT_DEFER=0`` turns it
    off (the A/B of ``scripts/bench/pipeline.py --compare``)."""
    return os.environ.get("AMBER_SNAPSHOT_DEFER", "1") != "0"


async def run_beside(settle: Callable[[], Awaitable[None]], run: Callable[[], Awaitable[T]]) -> T:
    """``run()``'s value once ``settle()`` and it both ended; the first error of either raised."""
    errors: list[Exception] = []
    values: list[T] = []

    async def settling() -> None:
        try:
            await settle()
        except Exception as exc:
            errors.append(exc)
            nursery.cancel_scope.cancel()  # the build errors: its next step need not run on

    async def running() -> None:
        try:
            values.append(await run())
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(settling)
        nursery.start_soon(running)
    if errors:
        raise errors[0]
    return values[0]
