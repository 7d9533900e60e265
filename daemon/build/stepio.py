"""A step's output and its sandbox call, as the executor needs them.

Output goes to a file as it arrives (so a crash keeps what was printed),
which the build's followers read as it grows; when the step ends the file
becomes a log blob.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

from amber.daemon.build.logs import blob_chunks, fd_chunks, open_log_file
from amber.daemon.build.spec import Step
from amber.sandbox.runner import StepOutcome, run_step
from amber.sandbox.sandboxspec import Bind
from amber.sandbox.store import Store
from amber.sandbox.userns import IdMap


class StepLog:
    """A running step's output: written to its file, capped, followed live.

    Followers read the file (``chunks``), not a copy in memory. Past
    ``limit`` bytes the rest is dropped and the log ends with a line saying
    so. ``blob`` is set before the file is unlinked, so a follower that
    finds no file finds the blob.
    """

    def __init__(self, path: Path, store: Store, limit: int):
        self.path = path
        self.limit = limit
        self.written = 0
        self.truncated = False
        self.blob: bytes | None = None
        self._store = store
        self._grew = trio.Event()
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )

    async def __call__(self, data: bytes) -> None:
        if self._fd is None or self.truncated:
            return
        room = self.limit - self.written
        if len(data) > room:
            data = data[:room] + f"\n[amber: log truncated at {self.limit} bytes]\n".encode()
            self.truncated = True
        _write_all(self._fd, data)
        self.written += len(data)
        self._changed()

    def _changed(self) -> None:
        self._grew.set()
        self._grew = trio.Event()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._changed()

    def store(self, store: Store) -> bytes:
        """Move the log into the store; returns its blob digest (from a worker thread)."""
        if self._fd is not None:
            os.close(self._fd)  # close() proper (and its wake-up) ran before, in the trio thread
            self._fd = None
        with store.batch() as batch:
            digest, _ = store.put_blob_file(self.path, batch)
        self.blob = digest
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return digest

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Everything the step printed, as it prints it, until its log is closed."""
        fd = open_log_file(self.path)
        if fd is None:  # already in the store (or thrown away with a timed-out step)
            if self.blob is not None:
                async for data in blob_chunks(self._store, self.blob):
                    yield data
            return
        offset = 0
        try:
            while True:
                grew = self._grew
                async for data in fd_chunks(fd, offset):
                    offset += len(data)
                    yield data
                if self._fd is None:  # closed: what the file holds is all of it
                    if offset >= os.fstat(fd).st_size:
                        return
                    continue
                await grew.wait()
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def run_sandboxed(
    root: Path,
    *,
    step: Step,
    env: dict[str, str],
    binds: list[tuple[str, str]],
    ids: IdMap,
    output: StepLog,
    on_start: Callable[[list[int]], None] | None = None,
) -> StepOutcome:
    return await run_step(
        root,
        script=step.run,
        cwd=step.cwd,
        env=env,
        network=step.network,
        user=step.user,
        timeout=step.timeout,
        output=output,
        id_map=ids,
        extra_binds=[Bind(Path(src), dest) for src, dest in binds],
        on_start=on_start,
    )
