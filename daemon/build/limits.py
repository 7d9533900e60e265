"""Per-step resource limits: a cgroup of its own for each step (memory, pids).

Each step's processes start in a fresh cgroup with ``step-memory-max`` and
``step-pids-max`` (``on_start`` moves the sandbox's first two processes in
before the command runs, so every later process inherits it). The cgroup's
OOM-kill counter tells a step the OOM killer stopped (``errored``, never
cached: it says nothing about the step) from one that failed by itself.

cgroup v2 (``memory.max``, ``pids.max``, ``memory.events``) where its
controllers are available to amberd; the v1 ``memory`` and ``pids``
hierarchies otherwise (``memory.limit_in_bytes``, ``memory.oom_control``).
Where neither can be created (no cgroupfs, no delegation), steps run under
``RLIMIT_AS`` only (a poor proxy for memory: it counts address space, not
use) and without a pids limit: ``RLIMIT_NPROC`` counts per uid, and every
step of every build runs as the same mapped uid, so it would cap all steps
together. amberd says so in its log when it starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from pathlib import Path

log = logging.getLogger("amber.limits")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class StepCgroup:
    """One step's cgroup (one directory per hierarchy); ``remove`` once the step is gone."""

    def __init__(self, dirs: dict[str, Path], v2: bool):
        self.dirs = dirs  # controller ("memory", "pids", or "" for v2) -> directory
        self.v2 = v2

    def join(self, pids: list[int]) -> None:
        for directory in self.dirs.values():
            for pid in pids:
                (directory / "cgroup.procs").write_text(f"{pid}\n")

    def oom_kills(self) -> int:
        """How many processes of the step the OOM killer stopped."""
        directory = self.dirs["" if self.v2 else "memory"]
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            for line in (directory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        for directory in self.dirs.values():
            with contextlib.suppress(OSError):
                directory.rmdir()


class Limits:
    """Where step cgroups go on this machine, and the limits they get."""

    def __init__(self, memory_max: int, pids_max: int, root: Path = CGROUP_ROOT):
        self.memory_max = memory_max or machine_memory() // 2
        self.pids_max = pids_max
        self.root = root
        self.parents = self._parents()
        if not self.parents:
            log.warning(
                "no cgroup for steps (no writable cgroup v2 with memory and pids, nor v1 memory "
                "and pids hierarchies): steps get RLIMIT_AS %d and no pids limit",
                self.memory_max,
            )

    def _parents(self) -> dict[str, Path]:
        """Directories under which step cgroups are made (empty: none usable)."""
        name = f"amber-steps.{os.getpid()}"
        unified = self.root / "cgroup.controllers"
        if unified.exists():
            own = _own_v2_cgroup()
            controllers = unified.read_text().split()
            if own is not None and {"memory", "pids"} <= set(controllers):
                parent = self.root / own.lstrip("/") / name
                with contextlib.suppress(OSError):
                    parent.mkdir(exist_ok=True)
                    (parent / "cgroup.subtree_control").write_text("+memory +pids\n")
                    return {"": parent}
            return {}
        parents = {}
        for controller in ("memory", "pids"):
            parent = self.root / controller / name
            try:
                parent.mkdir(exist_ok=True)
            except OSError:
                return {}
            parents[controller] = parent
        return parents

    def step_cgroup(self, name: str) -> StepCgroup | None:
        """A fresh cgroup with this amberd's limits (None: cgroups not usable here)."""
        if not self.parents:
            return None
        dirs = {}
        try:
            for controller, parent in self.parents.items():
                directory = parent / name
                directory.mkdir()
                dirs[controller] = directory
                self._limit(controller, directory)
        except OSError:
            StepCgroup(dirs, "" in self.parents).remove()
            raise
        return StepCgroup(dirs, "" in self.parents)

    def _limit(self, controller: str, directory: Path) -> None:
        if controller == "":
            (directory / "memory.max").write_text(f"{self.memory_max}\n")
            swap = directory / "memory.swap.max"
            if swap.exists():  # no swapping around the limit
                swap.write_text("0\n")
            (directory / "pids.max").write_text(f"{self.pids_max}\n")
        elif controller == "memory":
            (directory / "memory.limit_in_bytes").write_text(f"{self.memory_max}\n")
            memsw = directory / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # no swapping around the limit
                memsw.write_text(f"{self.memory_max}\n")
        else:
            (directory / "pids.max").write_text(f"{self.pids_max}\n")

    def rlimit(self, pids: list[int]) -> None:
        """The fallback without cgroups: cap each process's address space."""
        for pid in pids:
            with contextlib.suppress(OSError):
                resource.prlimit(pid, resource.RLIMIT_AS, (self.memory_max, self.memory_max))

    def close(self) -> None:
        """Remove this amberd's parent cgroups (empty once every step has ended)."""
        for parent in self.parents.values():
            with contextlib.suppress(OSError):
                parent.rmdir()


class StepLimits:
    """The limits of one step run: its cgroup (or rlimits), set up as the sandbox starts."""

    def __init__(self, limits: Limits | None, name: str):
        self.limits = limits
        self.name = name
        self.cgroup: StepCgroup | None = None
        self.memory_max = limits.memory_max if limits is not None else 0

    def apply(self, pids: list[int]) -> None:
        """``run_step``'s ``on_start``: the sandbox's first processes join the step's limits."""
        if self.limits is None:
            return
        self.cgroup = self.limits.step_cgroup(self.name)
        if self.cgroup is None:
            self.limits.rlimit(pids)
        else:
            self.cgroup.join(pids)

    def close(self) -> int:
        """Remove the cgroup (the step is gone); returns its OOM kills."""
        if self.cgroup is None:
            return 0
        kills = self.cgroup.oom_kills()
        self.cgroup.remove()
        return kills


def _own_v2_cgroup() -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None
