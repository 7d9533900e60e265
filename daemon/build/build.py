"""A build while it lives in the daemon: its state and its event history.

Events (step started/finished, notes, and where a step's log is) are
appended to a history that any number of followers replay and then follow,
so a client that disconnects and comes back with ``amber log -f`` sees
everything. The history holds no log bytes: a follower reaching a step's
log reads it from the step's log file (or blob) in bounded chunks. The build
itself runs in the daemon's nursery, never in a connection's, so it goes on
when its client leaves.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from amber.daemon.build.spec import Spec
from amber.daemon.build.state import BuildStatus, StepStatus
from amber.daemon.oci.auth import Credentials

#: Step statuses a client sees (kept as names here for the modules that read them).
RUNNING, RAN, CACHED, CACHED_FAILURE, FAILED, ERRORED, SKIPPED, PENDING = (
    StepStatus.RUNNING,
    StepStatus.RAN,
    StepStatus.CACHED,
    StepStatus.CACHED_FAILURE,
    StepStatus.FAILED,
    StepStatus.ERRORED,
    StepStatus.SKIPPED,
    StepStatus.PENDING,
)


#: The history entry that says where a step's log is (never sent as such).
_LOG_SOURCE = "log-source"


class LogSource(Protocol):
    def chunks(self) -> AsyncIterator[bytes]: ...


@dataclass
class StepState:
    name: str
    status: StepStatus = StepStatus.PENDING
    exit_code: int | None = None
    seconds: float | None = None
    started: float | None = None
    #: The snapshot after the step, apart from ``seconds`` (the step's own run).
    snapshot_seconds: float | None = None
    log: str | None = None  # the log blob's digest, once the step has one

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": str(self.status),
            "exit_code": self.exit_code,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "snapshot_seconds": _rounded(self.snapshot_seconds),
        }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


@dataclass
class Build:
    id: str
    uid: int
    gid: int
    spec: Spec
    spec_path: str
    retry_failed: bool = False
    #: The submitter's supplementary groups: what its sources and base are read with.
    groups: tuple[int, ...] = ()
    pin: str | None = None
    out_link: str | None = None
    #: The out-link's parent directory, opened by the client; closed when the build ends.
    out_link_dir: int | None = None
    #: Root only: the out-link keeps set-id bits, security.* xattrs and devices.
    out_link_privileged: bool = False
    export_on_failure: str | None = None  # oci | docker-archive | registry
    export_path: str | None = None
    #: The directory the export on failure goes to, opened by the client; closed when the build ends.
    export_dir: int | None = None
    export_ref: str | None = None
    #: Per build (``--cache-from``/``--cache-to``/``--no-remote``): overrides [[cache.remote]].
    cache_from: str | None = None
    cache_to: str | None = None
    no_remote: bool = False
    #: The user's credentials for a docker:// base's registry (this request's, never stored).
    credentials: Credentials | None = field(default=None, repr=False)
    status: BuildStatus = BuildStatus.QUEUED
    frozen: bool = False
    failed_step: str | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    steps: list[StepState] = field(default_factory=list)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cancelled: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    #: Where notes are kept for ``amber log`` once the build is gone (the
    #: manager points it at the database).
    keep_note: Callable[[str], None] | None = None
    _history: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        if not self.steps:
            self.steps = [StepState(s.name) for s in self.spec.steps]

    # -- events -------------------------------------------------------------

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self._history.append((name, {"build": self.id, **data}))
        self._changed.set()
        self._changed = trio.Event()

    def emit_log(self, step: str, source: LogSource) -> None:
        """Step ``step``'s output is ``source``: followers stream it from there."""
        self._history.append((_LOG_SOURCE, {"step": step, "source": source}))
        self._changed.set()
        self._changed = trio.Event()

    def note(self, message: str) -> None:
        """A note for the clients following now, and for ``amber log`` later."""
        self.emit("note", {"message": message})
        if self.keep_note is not None:
            self.keep_note(message)

    def finish(self, status: BuildStatus) -> None:
        self.status = status
        self.finished = time.time()
        self.done.set()
        self._changed.set()

    async def follow(
        self, *, only: frozenset[str] | None = None, step: str | None = None
    ) -> AsyncIterator[tuple[str, dict]]:
        """Every event so far, then new ones until the build is done.

        ``only`` keeps the events of those names; ``step`` those of that
        step (notes, which belong to no step, go with it).
        """
        index = 0
        while True:
            while index < len(self._history):
                name, data = self._history[index]
                index += 1
                shown = "log" if name == _LOG_SOURCE else name
                if only is not None and shown not in only:
                    continue
                if step is not None and data.get("step") != step:
                    continue
                if name == _LOG_SOURCE:
                    async for chunk in data["source"].chunks():
                        yield "log", {"build": self.id, "step": data["step"], "data": chunk}
                else:
                    yield name, data
            if self.done.is_set():
                return
            await self._changed.wait()

    # -- views ----------------------------------------------------------------

    @property
    def current_step(self) -> str | None:
        for s in self.steps:
            if s.status == RUNNING:
                return s.name
        return None

    def result(self) -> dict[str, Any]:
        return {
            "build": self.id,
            "name": self.spec.name,
            "status": str(self.status),
            "frozen": self.frozen,
            "failed_step": self.failed_step,
            "error": self.error,
            "created": self.created,
            "finished": self.finished,
            "steps": [s.summary() for s in self.steps],
        }
