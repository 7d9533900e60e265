"""Which state of a build a shell, diff or export looks at.

- default: the state at failure (the failing step's after-tree), or the
  final state of a build that succeeded;
- ``before``: the state before the failing (or named) step;
- ``step``: the state after a named step, of any build.

With the tree come the step's cwd and environment, so a shell lands where
the step ran, as it ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from amber.daemon.errors import NotFound
from amber.daemon.storage.db import BuildRecord, Database, StepRecord
from amber.sandbox.digest import from_hex


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
