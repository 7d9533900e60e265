"""Where a build's time went: seconds per phase, for ``amber show --json`` and the debug log.

A cold build is the steps' own run plus what amber adds around them: laying
out the sources, mounting the root (a filesystem process, the eager layer,
the FUSE lower, the overlay), starting and ending each sandbox, the snapshot
after each step, storing the log and recording the result. Knowing each of
these separately is how the gap to a plain chroot is found, so every build
keeps them: per build (``resolve_base``, ``sources``, ``unmount``, ...) and
per step (``mount`` and its parts, ``sandbox_start``, ``run``,
``sandbox_end``, ``snapshot``, ``log``, ``record``, and ``settle.commit``:
the step before's snapshot commit, which ran beside this step).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Phases:
    """Seconds per named phase, in the order each was first met."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)

    def update(self, parts: dict[str, float], prefix: str = "") -> None:
        """Add each of ``parts`` (e.g. what the filesystem process measured), named ``prefix`` + name."""
        for name, seconds in parts.items():
            if isinstance(seconds, int | float):
                self.add(prefix + name, float(seconds))

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (added to what ``name`` had), however it ends."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def rounded(self) -> dict[str, float]:
        """Milliseconds are what a reader needs; more digits are noise."""
        return {name: round(s, 4) for name, s in self.seconds.items()}

    def to_json(self) -> str:
        return json.dumps(self.rounded())

    def describe(self) -> str:
        """``mount 0.251 s, run 1.204 s, ...``: one line for the log."""
        return ", ".join(f"{name} {s:.3f} s" for name, s in self.seconds.items())

    def __bool__(self) -> bool:
        return bool(self.seconds)


def parse(text: str | None) -> dict[str, float] | None:
    """A database column of phases back to a mapping (None when never recorded)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
