"""A step's output and its sandbox call, as the executor needs them.

Output goes to a file as it arrives (so a crash keeps what was printed) and
to the build's followers; when the step ends the file becomes a log blob.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from amber.daemon.build.spec import Step
from amber.sandbox.runner import Bind, IdMap, StepOutcome, run_step
from amber.sandbox.store import Store


class StepLog:
    def __init__(self, path: Path, emit: Callable[[bytes], None]):
        self.path = path
        self._emit = emit
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )

    async def __call__(self, data: bytes) -> None:
        if self._fd is not None:
            os.write(self._fd, data)
        self._emit(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def store(self, store: Store) -> bytes:
        """Move the log into the store; returns its blob digest."""
        self.close()
        with store.batch() as batch:
            digest, _ = store.put_blob_file(self.path, batch)
        self.discard()
        return digest

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def run_sandboxed(
    root: Path,
    *,
    step: Step,
    env: dict[str, str],
    binds: list[tuple[str, str]],
    ids: IdMap,
    output: StepLog,
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
    )
