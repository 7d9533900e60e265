"""Which state of a build a shell, diff or export looks at.

- default: the state at failure (the failing step's after-tree), or the
  final state of a build that succeeded;
- ``before``: the state before the failing (or named) step;
- ``step``: the state after a named step, of any build.

With the tree come the step's cwd and environment, so a shell lands where
the step ran, as it ran.

A state may be a remote cache's only (a lazy hit, ``remote/lazy.py``):
``make_local`` is the one boundary where a shell, diff, export, out-link or
verify has it pulled, and then works as if the build had run here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from amber.daemon.errors import NotFound
from amber.daemon.remote.pull import Miss
from amber.daemon.storage.db import BuildRecord, Database, StepRecord
from amber.sandbox.digest import from_hex

if TYPE_CHECKING:
    from amber.daemon.context import DaemonContext
    from amber.daemon.storage.roots import Hold


@dataclass
class FrozenState:
    build: BuildRecord
    step: StepRecord
    tree: bytes
    before: bool
    cwd: str
    env: dict[str, str]
    user: str
    run: str

    @property
    def label(self) -> str:
        where = "before" if self.before else "after"
        return f"{self.build.id}, {where} step {self.step.name}"


def resolve_state(
    db: Database, record: BuildRecord, *, step: str | None, before: bool
) -> FrozenState:
    steps = db.get_steps(record.id)
    if not steps:
        raise NotFound(f"build {record.id} has no steps")
    if step is not None:
        chosen = next((s for s in steps if s.name == step), None)
        if chosen is None:
            names = ", ".join(s.name for s in steps)
            raise NotFound(f"build {record.id} has no step {step!r} (steps: {names})")
    elif record.failed_step is not None:
        chosen = next(s for s in steps if s.name == record.failed_step)
    else:
        done = [s for s in steps if s.after_tree]
        if not done:
            raise NotFound(f"build {record.id} has no step that finished ({record.status})")
        chosen = done[-1]
    tree_hex = chosen.before_tree if before else chosen.after_tree
    if not tree_hex:
        state = "started" if before else "finished"
        raise NotFound(f"step {chosen.name} of build {record.id} never {state}; no state to show")
    definition = json.loads(chosen.definition)
    return FrozenState(
        build=record,
        step=chosen,
        tree=from_hex(tree_hex),
        before=before,
        cwd=definition.get("cwd") or definition.get("workdir") or "/",
        env=dict(definition.get("env") or {}),
        user=definition.get("user", "build"),
        run=definition.get("run", ""),
    )


async def make_local(ctx: DaemonContext, hold: Hold, trees: Iterable[bytes], what: str) -> None:
    """Hold ``trees``, and pull those a remote cache holds and the store lacks.

    ``what`` names the state for the error a user reads when a pull fails.
    A tree no remote result names is left to the caller's completeness check.
    """
    trees = list(dict.fromkeys(trees))
    await trio.to_thread.run_sync(hold.add, trees)
    remote = [t for t in trees if ctx.db.remote_sources(tree=t.hex())]
    if not remote or ctx.remote is None:
        return
    try:
        await ctx.remote.ensure_local(remote)
    except Miss as exc:
        raise NotFound(
            f"the state of {what} is in a remote cache and could not be pulled: {exc}"
        ) from None
