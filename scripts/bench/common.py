"""What every benchmark in scripts/bench/ does the same way: the load, and noisy baselines.

A ratio against a baseline is only worth reporting when the baseline itself
was steady: on a shared machine other work inflates some runs and not
others, and a ratio of two noisy numbers says more about the neighbours
than about amber. So every benchmark

- prints the load average when it starts and when it has measured
  (``with Session(...)``, or ``begin()`` and ``end()``), and
- reports a ratio through ``Session.ratio``, which prints
  ``RESULT <name> <value>`` only when the baseline's runs spread by at most
  25 % ((max - min) / median); otherwise it prints ``NORESULT <name>: ...``
  saying why and asking for a quieter machine, and the script exits with
  status 3 at the end (``Session.exit_code``), after everything else it
  measured has been printed.

Plain measurements that are not ratios (seconds, bytes) are printed with
``Session.result`` as they are, next to the load.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Sequence

MAX_SPREAD = 0.25
REFUSED_EXIT = 3


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def spread(runs: Sequence[float]) -> float | None:
    """(max - min) / median of the runs; None when there are fewer than two."""
    if len(runs) < 2:
        return None
    middle = statistics.median(runs)
    return (max(runs) - min(runs)) / middle if middle > 0 else float("inf")


def refusal(baseline: str, runs: Sequence[float]) -> str | None:
    """Why a ratio against these baseline runs must not be reported (None: it may)."""
    s = spread(runs)
    if s is None:
        return f"one run of the {baseline} cannot show its spread; run at least two"
    if s > MAX_SPREAD:
        times = ", ".join(f"{r:.3f}" for r in runs)
        return (
            f"the {baseline} spread {100 * s:.0f} % (> {100 * MAX_SPREAD:.0f} %) across "
            f"{len(runs)} runs ({times} s): the machine is too busy for a ratio; "
            "run again on a quieter machine"
        )
    return None


class Session:
    """One benchmark run: load before and after, RESULT lines, refusals."""

    def __init__(self, name: str):
        self.name = name
        self.refused: list[str] = []

    def begin(self) -> Session:
        print(f"{self.name}: before: {load_average()}", flush=True)
        return self

    def end(self) -> None:
        print(f"{self.name}: after:  {load_average()}", flush=True)

    def __enter__(self) -> Session:
        return self.begin()

    def __exit__(self, *exc_info: object) -> None:
        self.end()

    def result(self, name: str, value: float, digits: int = 3) -> None:
        print(f"RESULT {name} {value:.{digits}f}", flush=True)

    def ratio(self, name: str, value: float, baseline: str, runs: Sequence[float]) -> bool:
        """``RESULT name value`` if the baseline ``runs`` were steady; else a refusal."""
        why = refusal(baseline, runs)
        if why is None:
            self.result(name, value)
            return True
        self.refuse(name, f"{why} (the unguarded ratio was {value:.3f})")
        return False

    def refuse(self, name: str, why: str) -> None:
        """``NORESULT name: why``: the figure could not be measured fairly."""
        self.refused.append(name)
        print(f"NORESULT {name}: {why}", flush=True)

    @property
    def exit_code(self) -> int:
        return REFUSED_EXIT if self.refused else 0

    def finish(self) -> None:
        """Exit with status 3 when a ratio was refused, so scripts notice."""
        if self.refused:
            print(f"{self.name}: refused {', '.join(self.refused)}", file=sys.stderr)
            sys.exit(self.exit_code)
