"""``show``: one build as a record.

``show`` answers from the database (plus the live build's status, which
the database only learns at the end) and the store (log sizes), so it works
on running, finished and imported builds alike. Times stay epoch seconds on
the wire; the client formats them.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
from typing import TYPE_CHECKING, Any

import trio

from amber.daemon.api.operation import operation
from amber.daemon.build import phases
from amber.daemon.build.state import StepStatus
from amber.sandbox.digest import from_hex

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.context import DaemonContext
    from amber.daemon.server import Connection
    from amber.daemon.storage.db import StepRecord

#: Step statuses whose result came from the cache, not from running here.
_CACHED = frozenset({StepStatus.CACHED, StepStatus.CACHED_FAILURE})


@operation(build=str)
async def show(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    record = api.record(conn, args["build"])  # its owner or root only
    live = api.manager.get(record.id)
    steps = api.ctx.db.get_steps(record.id)
    entries = await trio.to_thread.run_sync(_step_entries, api.ctx, record.id, steps)
    spec = json.loads(record.spec)
    return {
        "build": record.id,
        "name": record.name,
        "uid": record.uid,
        "user": _user_name(record.uid),
        "base": record.base,
        "base_owner": record.base_owner,  # whose image a named base was (0: shared)
        "base_digest": record.base_digest,  # a docker:// base: the digest it resolved to
        "host": socket.gethostname(),
        "imported_from": spec.get("imported_from"),
        "spec_path": record.spec_path,
        "status": live.status if live is not None else record.status,
        "frozen": bool(live.frozen if live is not None else record.frozen),
        "failed_step": record.failed_step,
        "error": record.error,
        "created": record.created,
        "finished": record.finished,
        # Seconds outside the steps (queued, resolve_base, sources, cache, unmount, ...).
        "phases": phases.parse(record.phases),
        "steps": entries,
    }


def _step_entries(
    ctx: DaemonContext, build_id: str, steps: list[StepRecord]
) -> list[dict[str, Any]]:
    """Each step as ``show`` reports it (blocking: reads the store and the results)."""
    out = []
    for step in steps:
        cached = step.status in _CACHED
        result = ctx.db.get_result(step.key) if step.key else None
        entry: dict[str, Any] = {
            "index": step.idx,
            "name": step.name,
            "status": step.status,
            "exit_code": step.exit_code,
            "signal": step.signal,
            # Time spent in this build: a cache hit (or a replayed failure) takes none.
            "seconds": 0.0 if cached else _rounded(step.seconds),
            "started": step.started,
            "key": step.key,
            "before_tree": step.before_tree,
            "after_tree": step.after_tree,
            "log": step.log,
            "log_bytes": _log_size(ctx, build_id, step),
            "note": step.note,
            "host": result.host if result is not None else None,
            # Where running it here went (mount, sandbox_start, run, snapshot, ...).
            "phases": phases.parse(step.phases),
        }
        if cached and result is not None:
            entry["cached_from"] = result.build_id
            entry["original_seconds"] = _rounded(result.seconds)
        out.append(entry)
    return out


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)  # as build results give them


def _log_size(ctx: DaemonContext, build_id: str, step: StepRecord) -> int | None:
    """The step's output in bytes: its log blob, or the file a running step writes."""
    path = ctx.store.blob_path(from_hex(step.log)) if step.log else None
    if path is None and step.status == StepStatus.RUNNING:
        path = ctx.step_log_path(build_id, step.idx)
    if path is None:
        return None
    try:
        return os.stat(path).st_size
    except FileNotFoundError:  # collected, or not written yet
        return None


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
