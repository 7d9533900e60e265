"""Every step and build transition, in one place: memory, database row and event.

A live build's status is in three places at once: the ``Build`` in memory
(``amber ps``, followers), its database rows (``amber show``, ``builds``,
after the daemon restarts) and the event stream clients follow. Writing
them by hand at each call site let them drift (pending steps skipped in the
database with no event; a build cancelled in the queue left its steps
``pending`` forever), so every change goes through ``BuildState``, which
writes all three, and ``recover_interrupted`` for the rows a dead daemon
left. Statuses are ``StrEnum``: their values are what the wire and the
database have always carried.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amber.daemon.build.build import Build
    from amber.daemon.storage.db import Database, Result


class BuildStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    ERRORED = "errored"

    @property
    def live(self) -> bool:
        """Still queued or running (not finished)."""
        return self in (BuildStatus.QUEUED, BuildStatus.RUNNING)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RAN = "ran"
    CACHED = "cached"
    CACHED_FAILURE = "cached-failure"
    FAILED = "failed"
    ERRORED = "errored"
    SKIPPED = "skipped"


class BuildState:
    """The one writer of a live build's statuses (see the module notes)."""

    def __init__(self, db: Database, build: Build):
        self.db = db
        self.build = build

    # -- steps ----------------------------------------------------------------

    def _step(self, index: int, status: StepStatus, note: str | None = None, **row) -> None:
        """Set step ``index`` to ``status`` in memory and its row, and tell the followers."""
        b = self.build
        step = b.steps[index]
        step.status = status
        self.db.update_step(b.id, index, status=status.value, note=note, **row)
        b.emit("step", {"index": index, "name": step.name, "status": status.value,
                        "exit_code": step.exit_code, "seconds": step.seconds,
                        "snapshot_seconds": step.snapshot_seconds, "note": note})  # fmt: skip

    def step_running(self, index: int, before: bytes) -> None:
        step = self.build.steps[index]
        step.started = time.time()
        self._step(index, StepStatus.RUNNING, before_tree=before.hex(), started=step.started)

    def step_done(
        self,
        index: int,
        status: StepStatus,
        result: Result,
        before: bytes,
        after: bytes,
        note: str | None = None,
        phases: str | None = None,
    ) -> None:
        """A step ran (``ran``/``failed``) or was taken from the cache; ``phases``: its JSON."""
        step = self.build.steps[index]
        step.exit_code = result.exit_code
        step.seconds = 0.0 if status == StepStatus.CACHED else result.seconds
        step.log = result.log
        if step.started is None:  # a cache hit: it "ran" now, for no time (amber show's timeline)
            step.started = time.time()
        self._step(index, status, note, exit_code=result.exit_code, signal=result.signal,
                   seconds=step.seconds, before_tree=before.hex(), after_tree=after.hex(), log=result.log,
                   started=step.started, phases=phases)  # fmt: skip

    def step_unstored(self, index: int, reason: str) -> None:
        """Step ``index`` ran, but its snapshot's commit failed: errored, with no after-tree."""
        self._step(index, StepStatus.ERRORED, reason, after_tree=None)

    def skip_pending(self, note: str, start: int = 0) -> None:
        """Every step from ``start`` that has not run yet is ``skipped``, with ``note``."""
        for i in range(start, len(self.build.steps)):
            if self.build.steps[i].status == StepStatus.PENDING:
                self._step(i, StepStatus.SKIPPED, note)

    # -- the build ------------------------------------------------------------

    def start(self) -> None:
        self.build.status = BuildStatus.RUNNING
        self.db.update_build(self.build.id, status=BuildStatus.RUNNING.value)

    def succeeded(self, final_tree: bytes) -> None:
        self.build.status = BuildStatus.SUCCESS
        self.db.update_build(self.build.id, final_tree=final_tree.hex())

    def failed(self, message: str, note: str) -> None:
        """The build failed before any step (a source failed verification)."""
        b = self.build
        b.status, b.error = BuildStatus.FAILED, message
        self.skip_pending(note)

    def freeze(self, index: int) -> None:
        """Step ``index`` failed (ran or cached): the build stops there, frozen."""
        b = self.build
        b.status = BuildStatus.FAILED
        b.frozen = True
        b.failed_step = b.steps[index].name
        self.skip_pending(f"not run: step {b.failed_step} failed", index + 1)

    def errored(self, reason: str) -> None:
        """Stopped for a reason outside the build: running steps errored, the rest skipped."""
        b = self.build
        b.status = BuildStatus.ERRORED
        b.error = reason
        for i, step in enumerate(b.steps):
            if step.status == StepStatus.RUNNING:
                if step.seconds is None and step.started is not None:
                    step.seconds = time.time() - step.started  # until it was stopped
                self._step(i, StepStatus.ERRORED, reason, seconds=step.seconds)
        self.skip_pending(f"not run: {reason}")
        b.note(f"build errored: {reason}")

    def finish(self, phases: str | None = None) -> None:
        """Write the build's final row (``phases``: its JSON); followers are released by ``Build.finish``."""
        b = self.build
        self.db.update_build(
            b.id,
            phases=phases,
            status=BuildStatus(b.status).value,
            frozen=int(b.frozen),
            finished=time.time(),
            failed_step=b.failed_step,
            error=b.error,
        )
        b.finish(b.status)


def recover_interrupted(db: Database, build_id: str, keep_log) -> None:
    """A build a dead daemon left queued or running: errored, its steps settled.

    ``keep_log(idx)`` moves what a running step printed into the store and
    returns the blob's digest (or None). No event: nobody follows a build
    of a previous daemon.
    """
    reason = "interrupted: amberd stopped or crashed"
    db.update_build(build_id, status=BuildStatus.ERRORED.value, error=reason, finished=time.time())
    for step in db.get_steps(build_id):
        if step.status == StepStatus.RUNNING:
            db.update_step(build_id, step.idx, status=StepStatus.ERRORED.value, note=reason,
                           log=keep_log(step.idx))  # fmt: skip
        elif step.status == StepStatus.PENDING:
            db.update_step(build_id, step.idx, status=StepStatus.SKIPPED.value,
                           note=f"not run: {reason}")  # fmt: skip
