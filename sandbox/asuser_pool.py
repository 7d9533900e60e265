"""Idle ``asuser`` helpers kept for the same user's next request.

Starting a helper is a fork of the daemon and a Python start-up as the user:
20-40 ms, two of them per build with a local source (its spec's modes, then
its content), which was most of what a fully cached build cost in amberd. A
helper that finished its request cleanly (``UserReader.idle``) waits for the
next one anyway, so it is kept, for a while, for that same identity only:
uid, gid and supplementary groups alike, so that a request never reads with
groups its client does not have now. Reuse changes no trust: a helper is the
user's process either way, and everything it sends is checked as before.

Helpers are started on threads of this module's own, which live as long as
the daemon: ``PR_SET_PDEATHSIG`` fires when the *thread* that started a
helper ends, and trio's worker threads end when idle, which would kill a
kept helper under the next request. A helper that died (or was killed by its
user) is dropped when next taken; one left idle for ``IDLE_SECONDS`` is
killed and reaped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from .asuser import User, UserReader

IDLE_SECONDS = 20.0
#: Idle helpers kept per identity and in all.
PER_USER = 2
TOTAL = 16

_Key = tuple[int, int, tuple[int, ...]]


def _key(user: User) -> _Key:
    return (user.uid, user.gid, tuple(sorted(set(user.groups))))


class ReaderPool:
    """Idle helpers by identity; ``lease`` hands one out (or starts one) for a ``with`` block."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: dict[_Key, list[tuple[float, UserReader]]] = {}
        self._starter = ThreadPoolExecutor(max_workers=4, thread_name_prefix="asuser-start")
        self._timer: threading.Timer | None = None

    @contextlib.contextmanager
    def lease(self, user: User) -> Iterator[UserReader]:
        """A helper for ``user``: kept afterwards if its last request ended cleanly."""
        reader = self._take(user) or self._start(user)
        done = False
        try:
            yield reader
            done = True
        finally:
            if done and reader.idle and reader.alive():
                self._give_back(reader)
            else:
                reader.close()

    def _start(self, user: User) -> UserReader:
        """A new helper, forked on a long-lived thread (its death signal follows the thread)
        but waited for on the caller's: a helper its user stops holds up no one else."""
        reader = self._starter.submit(UserReader, user, handshake=False).result()
        reader.handshake()
        return reader

    def _take(self, user: User) -> UserReader | None:
        with self._lock:
            kept = self._idle.get(_key(user), [])
            while kept:
                _, reader = kept.pop()
                if reader.alive():
                    return reader
                reader.close()  # reaped: the user may have killed their helper
        return None

    def _give_back(self, reader: UserReader) -> None:
        with self._lock:
            kept = self._idle.setdefault(_key(reader.user), [])
            if len(kept) >= PER_USER or sum(map(len, self._idle.values())) >= TOTAL:
                reader.close()
                return
            kept.append((time.monotonic(), reader))
            if self._timer is None:
                self._arm()

    def _arm(self) -> None:
        self._timer = threading.Timer(self.idle_seconds, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def expire(self, now: float | None = None) -> int:
        """Kill the helpers idle longer than ``idle_seconds``; how many there were."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._timer = None
            old = []
            for key, kept in list(self._idle.items()):
                old += [r for t, r in kept if now - t >= self.idle_seconds]
                kept[:] = [(t, r) for t, r in kept if now - t < self.idle_seconds]
                if not kept:
                    del self._idle[key]
            if self._idle:
                self._arm()
        for reader in old:
            reader.close()
        return len(old)

    def close(self) -> None:
        """Kill every idle helper (the daemon is stopping, or a test is done)."""
        self.expire(now=float("inf"))


POOL = ReaderPool()
lease = POOL.lease
