"""Why a step's end says nothing about the step: errored, never cached.

A step that timed out, met the OOM killer or failed while the state
directory's filesystem was full would fail the same way on a quieter or
emptier host, or not at all: caching it would replay a failure that is the
machine's, not the step's.
"""

from __future__ import annotations

import os
from pathlib import Path

from amber.daemon.build.stepio import StepOutcome

#: Free space under which a failed step is taken to have failed for want of it.
FULL_BELOW = 64 << 20


def not_a_result(
    name: str, timeout: float, outcome: StepOutcome, oom_kills: int, memory_max: int,
    state_dir: Path,
) -> str | None:  # fmt: skip
    """Why step ``name``'s end is not a result (the build errors with it), or None."""
    if outcome.timed_out:
        return f"step {name} timed out after {timeout:g} s"
    if oom_kills:
        return (
            f"step {name} was stopped by the OOM killer: it used more memory than "
            f"step-memory-max ({memory_max} bytes); not cached"
        )
    if outcome.exit_code != 0 and store_full(state_dir):
        return (
            f"step {name} failed while the state directory's filesystem was full "
            "(ENOSPC): not cached; free space and build again"
        )
    return None


def store_full(state_dir: Path) -> bool:
    """Whether the store and the steps' upper layers (one filesystem) are out of space."""
    st = os.statvfs(state_dir)
    return st.f_bavail * st.f_frsize < FULL_BELOW
