"""Threads for a request's work that its user can stall: a few per uid, apart from trio's.

Reading a user's paths waits on their own helper process (sandbox/asuser.py),
which they may stop: up to ``READY_SECONDS`` before it starts, up to
``REPLY_SECONDS`` a message after. On trio's shared threads (40 in all), a
user with 40 connections could hold every one of them, and with them every
other user's requests and builds. Here each uid has ``PER_UID`` threads of
its own: a user who stalls their helpers waits only for themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")
#: Requests of one uid reading as that uid at once (more wait their turn).
PER_UID = 4
_limiters: dict[int, trio.CapacityLimiter] = {}


async def run_as_user(
    uid: int, fn: Callable[..., T], *args: object, abandon_on_cancel: bool = False
) -> T:
    """``fn(*args)`` on a thread, one of ``uid``'s ``PER_UID`` (root: trio's shared ones)."""
    if uid == 0:  # root's reads start no helper a user could stop
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
    limiter = _limiters.get(uid)
    if limiter is None:
        limiter = _limiters[uid] = trio.CapacityLimiter(PER_UID)
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter,
                                         abandon_on_cancel=abandon_on_cancel)  # fmt: skip
