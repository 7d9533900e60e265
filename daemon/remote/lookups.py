"""Every step key of a build looked up in the remotes at once, before the first step.

Step keys are input-addressed (build/keys.py: each from the key before it
and the step's definition, never from a result), so a build knows all of
them before it starts. One round trip per step, one after the other, is
what made a fully cached build from a remote slow; here the tags are asked
for ``AT_ONCE`` at a time, on kept-alive connections (a client per worker,
reused for the next key), and each answer is verified exactly as a lookup
at the step would be (``pull.lookup``: signature, trust, config digest).

The answers are kept as outcomes (a hit, none, or the ``Miss`` with its
reason) for ``RemoteCache.find`` to take, so every note a step would have
written is written, at its step. Remotes are asked in order: a key the
first one holds (or refuses on trust) is not asked of the next.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

import outcome
import trio

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.remote import pull
from amber.daemon.remote.config import Remote

#: Lookups in flight at once, per remote: each a worker thread and a connection.
AT_ONCE = 8

Lookup = Callable[[RegistryClient, Remote, str], "pull.Found | None"]


class Prefetched:
    """Answers of the remotes for keys, each taken once by the step that needs it."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, str], outcome.Outcome] = {}

    def put(self, url: str, key: str, answer: outcome.Outcome) -> None:
        self._answers[(url, key)] = answer

    def take(self, url: str, key: str) -> outcome.Outcome | None:
        """The answer ``url`` gave for ``key`` (None: not asked); unwrap it to use it."""
        return self._answers.pop((url, key), None)

    def clear(self) -> None:
        self._answers.clear()

    def __len__(self) -> int:
        return len(self._answers)


def _goes_on(answer: outcome.Outcome) -> bool:
    """Whether a key's lookup goes on to the next remote (as ``find`` would)."""
    if isinstance(answer, outcome.Error):
        return isinstance(answer.error, pull.Miss)
    return answer.value is None


async def prefetch(
    remotes: list[Remote],
    keys: list[str],
    lookup: Lookup,
    client_for: Callable[[Remote], RegistryClient],
) -> Prefetched:
    """Ask ``remotes`` (in order) for ``keys``, ``AT_ONCE`` at a time each."""
    found = Prefetched()
    todo = list(keys)
    for remote in remotes:
        if not todo:
            break
        answers = await _ask(remote, todo, lookup, client_for)
        for key, answer in answers.items():
            found.put(remote.url, key, answer)
        todo = [k for k in todo if _goes_on(answers[k])]
    return found


async def _ask(
    remote: Remote,
    keys: list[str],
    lookup: Lookup,
    client_for: Callable[[Remote], RegistryClient],
) -> dict[str, outcome.Outcome]:
    """One remote's answers for ``keys``; each worker keeps its connection for the next key."""
    limiter = trio.CapacityLimiter(AT_ONCE)
    clients: queue.SimpleQueue[RegistryClient] = queue.SimpleQueue()
    answers: dict[str, outcome.Outcome] = {}

    def one_sync(key: str) -> outcome.Outcome:
        try:
            client = clients.get_nowait()
        except queue.Empty:
            client = client_for(remote)
        try:
            return outcome.capture(lookup, client, remote, key)
        finally:
            clients.put(client)

    async def one(key: str) -> None:
        answers[key] = await trio.to_thread.run_sync(one_sync, key, limiter=limiter)

    try:
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
    finally:
        while not clients.empty():
            clients.get_nowait().close()
    return answers
