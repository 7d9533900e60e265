"""Benchmark: a real C build on amber's overlay filesystem vs a plain directory.

Usage (as root)::

    /work/venv/bin/python scripts/bench/fs.py [--runs N] [--mode MODE[,MODE...]]
        [--keep] [--work-dir DIR]

What it measures. A Debian buildd root filesystem (``scripts/make-rootfs``)
is the build root; zlib's orig tarball (``scripts/fetch-sources zlib``) is
extracted, configured and built with ``make -j2`` inside it, in two setups:

* **plain**: the rootfs copied with ``cp -a`` into a fresh directory;
* **amber**: the rootfs imported into a fresh amber store once, then, for
  every run, mounted with ``open_overlay`` in each ``--mode`` and
  snapshotted after the build. ``datalower`` (Linux 6.5+): FUSE metadata
  lower + kernel overlayfs, blobs as a data-only layer; ``fuse-data`` (the
  fallback for older kernels, ``sandbox/fsmode.py``): the FUSE lower serves
  file data too. Default: the mode amberd would pick here.
* ``--mode linkfarm`` (an estimate, not a mode amber has): the base as a
  hard-link farm under a kernel overlayfs, the way ostree checks out. The
  tree is checked out once (in a real farm these inodes, one per distinct
  content and metadata, would live in the store); every run links a farm
  from it with ``cp -al`` (its "mount" time) and builds on an overlay over
  that. No snapshot is taken (it would be the same walk of the upper).

Both builds run under ``chroot`` so that *every* file the build touches, the
compiler, headers, libraries and the shell included, comes from the root
filesystem under test, which is what a build in amber's sandbox does; a build
that only wrote into a mounted directory would measure the toolchain on the
host's own filesystem instead. Each phase (extract, configure, make) is one
chroot command timed by wall clock, so the per-phase ratios show where the
overhead concentrates.

Runs alternate (plain, amber, plain, amber, ...) with fresh directories and
mounts each time, so drift on the machine (page cache, other load) hits both
alike; caches are deliberately not dropped, but dirty data is synced before
each build so neither pays for the other's writeback. The RESULT is the
median of the per-pair wall-clock ratios, per mode. Because other work on a shared
machine makes wall time noisy, the CPU-time ratio (the build's processes,
plus the filesystem process for amber) is printed beside it.

Where the remaining cost goes: per-phase medians and ratios; the FUSE
requests the lower filesystem received per phase and per opcode, with the
time callers waited for each (the kernel's ``fuse`` tracepoints, read from a
private tracefs instance: nothing in amber is instrumented, and two
tracepoint hits per request cost far less than the requests themselves);
and the filesystem process's CPU time during the build.

Finally a separate mount of a synthetic 100,000-file tree is walked
(``find -type f | wc -l``) and every file is ``stat``-ed through it, to
measure the filesystem process's memory on a large tree.

Targets: build ratio <= 1.10 (aim 1.05); filesystem process peak RSS
< 150 MiB. One line ``RESULT fs_build_ratio_<mode> <ratio>`` per mode,
then ``RESULT fs_build_ratio <ratio>`` for the first mode.

Everything lives in one temporary work directory (default under /var/tmp,
the same filesystem as the rootfs cache here) and is removed on every way
out, Ctrl-C included; mounts are undone by ``open_overlay``. ``--keep``
leaves the directory (store, plain copies, amber upper layers) for
inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from common import Session
from fusetrace import FuseTrace, OpCost

from amber.sandbox import fsmode
from amber.sandbox import tree as treefmt
from amber.sandbox.checkout import checkout
from amber.sandbox.fscontrol import Snapshot, open_overlay
from amber.sandbox.importer import import_directory
from amber.sandbox.mounts import mount, mounts_under, umount, unmount_all_under
from amber.sandbox.snapshot import SnapshotStats
from amber.sandbox.store import Store
from amber.sandbox.tree import Entry

REPO = Path(__file__).resolve().parents[2]
MS_BIND = 4096
PHASES = ("extract", "configure", "make")
BUILD_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
}
RATIO_TARGET, RATIO_AIM = 1.10, 1.05
RSS_TARGET_MIB = 150
BIG_TREE_DIRS, BIG_TREE_FILES_PER_DIR = 100, 1000  # 100,000 files
MTIME = 1_600_000_000_123_456_789
MIB = 1 << 20
LINKFARM = "linkfarm"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- fixtures ------------------------------------------------------------------


def ensure_fixtures() -> tuple[Path, Path]:
    """The rootfs directory and zlib's tarball, made or fetched if missing.

    Both scripts are idempotent and cheap when their result is cached, and
    they print where it is.
    """
    rootfs = _script_output([str(REPO / "scripts/make-rootfs")]).splitlines()[-1]
    for line in _script_output([str(REPO / "scripts/fetch-sources"), "zlib"]).splitlines():
        name, _, path = line.partition(" ")
        if name == "zlib":
            return Path(rootfs), Path(path)
    sys.exit("fs.py: scripts/fetch-sources did not report the zlib tarball")


def _script_output(cmd: list[str]) -> str:
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"fs.py: {' '.join(cmd)} failed (exit {result.returncode})")
    return result.stdout.strip()


# -- running commands ----------------------------------------------------------


async def _kill_group(process: trio.Process) -> None:
    """Cancellation: the command runs in its own session; end all of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Timing:
    wall: float = 0.0
    cpu: float = 0.0  # user + system of the command and all its descendants

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run_timed(cmd: list[str], log: Path, **kwargs) -> Timing:
    """Run ``cmd`` with output appended to ``log``; wall and CPU seconds.

    CPU time comes from RUSAGE_CHILDREN, which gains the command's whole
    process tree when it is reaped; no other child of ours ends meanwhile.
    """
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        cpu = children_cpu()
        start = time.perf_counter()
        result = await trio.run_process(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
            start_new_session=True,
            deliver_cancel=_kill_group,
            **kwargs,
        )
        timing = Timing(time.perf_counter() - start, children_cpu() - cpu)
    if result.returncode != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{tail}")
    return timing


def build_phases(tarball: Path) -> dict[str, str]:
    """The shell command of each phase, run inside the chroot."""
    source = "cd /build/zlib-*/"
    return {
        "extract": f"cd /build && tar xf {tarball.name}",
        "configure": f"{source} && ./configure",
        "make": f"{source} && make -j2",
    }


async def build_in_chroot(
    root: Path, tarball: Path, log: Path, after_phase: Callable[[str], None] | None = None
) -> dict[str, Timing]:
    """Build zlib inside ``root``; the timing of each phase."""
    shutil.copy2(tarball, root / "build" / tarball.name)  # before the clock starts
    # Let the writeback of earlier work (the rootfs copy, the last run's
    # deletions) finish now rather than during the timed build.
    await trio.to_thread.run_sync(os.sync)
    times = {}
    with host_dev_null(root):
        for phase, script in build_phases(tarball).items():
            cmd = ["chroot", str(root), "/bin/sh", "-c", script]
            times[phase] = await run_timed(cmd, log, env=BUILD_ENV)
            if after_phase is not None:
                after_phase(phase)
    return times


@contextlib.contextmanager
def host_dev_null(root: Path):
    """The host's /dev/null bound over the root's: amber's mounts are nodev (as
    a sandbox's /dev comes from bwrap), so the rootfs's own node cannot be opened."""
    target = root / "dev" / "null"
    mount("/dev/null", target, "none", "", MS_BIND)
    try:
        yield
    finally:
        umount(target, lazy=True)


# -- the filesystem process ------------------------------------------------------


@dataclass
class ProcessUsage:
    """CPU time and read syscalls of a process, from /proc."""

    cpu_seconds: float
    read_calls: int

    @classmethod
    def of(cls, pid: int) -> ProcessUsage:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
        reads = 0
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("syscr:"):
                    reads = int(line.split()[1])
        return cls(cpu, reads)

    def __sub__(self, other: ProcessUsage) -> ProcessUsage:
        return ProcessUsage(
            self.cpu_seconds - other.cpu_seconds, self.read_calls - other.read_calls
        )


# -- one run of each kind ------------------------------------------------------------


@dataclass
class PlainRun:
    copy_seconds: float
    phases: dict[str, Timing]

    @property
    def total(self) -> float:
        return sum(t.wall for t in self.phases.values())

    @property
    def cpu(self) -> float:
        return sum(t.cpu for t in self.phases.values())


@dataclass
class AmberRun:
    mount_seconds: float
    phases: dict[str, Timing]
    snapshot: Snapshot
    fs_usage: ProcessUsage  # during the build
    fuse: dict[str, dict[str, OpCost]]  # phase -> opcode -> cost
    peak_rss_build: int
    peak_rss_snapshot: int

    @property
    def total(self) -> float:
        return sum(t.wall for t in self.phases.values())

    @property
    def cpu(self) -> float:
        """The build's CPU time plus the filesystem process's."""
        return sum(t.cpu for t in self.phases.values()) + self.fs_usage.cpu_seconds


async def plain_run(rootfs: Path, tarball: Path, work: Path, keep: bool) -> PlainRun:
    root = work / "root"
    work.mkdir()
    try:
        copy = await run_timed(["cp", "-a", f"{rootfs}/.", str(root)], work / "log")
        phases = await build_in_chroot(root, tarball, work / "log")
        return PlainRun(copy.wall, phases)
    finally:
        if not keep:
            remove_tree(work)


async def amber_run(
    store: Store, tree: bytes, tarball: Path, work: Path, keep: bool, mode: str
) -> AmberRun:
    work.mkdir()
    try:
        start = time.perf_counter()
        async with open_overlay(
            store.state_dir, tree, work / "fs", keep_work=keep, fs_mode=mode
        ) as mnt:
            mount_seconds = time.perf_counter() - start
            before = ProcessUsage.of(mnt.pid)
            connection = os.minor(os.stat(mnt.work / "layers/lower").st_dev)
            with FuseTrace(f"amber-bench-fs-{os.getpid()}", connection) as trace:
                phases = await build_in_chroot(mnt.root, tarball, work / "log", trace.collect)
            usage = ProcessUsage.of(mnt.pid) - before
            rss_build = mnt.peak_rss()
            snapshot = await mnt.snapshot()
            rss_snapshot = mnt.peak_rss()
        return AmberRun(
            mount_seconds, phases, snapshot, usage, trace.phases, rss_build, rss_snapshot
        )
    finally:
        if not keep:
            remove_tree(work)


async def linkfarm_run(farm_base: Path, tarball: Path, work: Path, keep: bool) -> AmberRun:
    """The estimate of a hard-link farm: ``cp -al`` of a checkout, an overlay on top."""
    work.mkdir()
    dirs = {name: work / name for name in ("lower", "upper", "work", "root")}
    try:
        start = time.perf_counter()
        await run_timed(["cp", "-al", str(farm_base), str(dirs["lower"])], work / "log")
        for name in ("upper", "work", "root"):
            dirs[name].mkdir()
        options = (
            f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']},"
            "metacopy=on,redirect_dir=on,index=off,xino=off"
        )
        mount("amber-bench", dirs["root"], "overlay", options)
        try:
            mount_seconds = time.perf_counter() - start
            phases = await build_in_chroot(dirs["root"], tarball, work / "log")
        finally:
            umount(dirs["root"], lazy=True)
        none = ProcessUsage(0.0, 0)
        return AmberRun(mount_seconds, phases, Snapshot(b"", SnapshotStats()), none, {}, 0, 0)
    finally:
        if not keep:
            remove_tree(work)


# -- the store ------------------------------------------------------------------------


def import_rootfs(state_dir: Path, rootfs: Path) -> tuple[Store, bytes, float]:
    store = Store.open(state_dir)
    start = time.perf_counter()
    tree = import_directory(store, rootfs)
    return store, tree, time.perf_counter() - start


def synthetic_tree(store: Store, dirs: int, files_per_dir: int) -> bytes:
    """``level0/dNNN/fNNNNN.c``: distinct small blobs, written in one batch."""
    with store.batch() as batch:
        level = []
        for d in range(dirs):
            files = []
            for i in range(files_per_dir):
                content = f"/* file {i} of directory {d} */\n".encode()
                blob = store.put_blob_bytes(content, batch)
                name = f"f{i:05d}.c".encode()
                files.append(Entry(name, treefmt.FILE, 0o644, 0, 0, MTIME, len(content), blob))
            leaf = store.put_tree(files, batch)
            level.append(Entry(f"d{d:03d}".encode(), treefmt.DIR, 0o755, 0, 0, MTIME, 0, leaf))
        top = store.put_tree(level, batch)
        return store.put_tree([Entry(b"level0", treefmt.DIR, 0o755, 0, 0, MTIME, 0, top)], batch)


@dataclass
class BigTreeRun:
    files_found: int
    files_statted: int
    find_seconds: float
    stat_seconds: float
    peak_rss: int


def stat_every_file(root: Path) -> int:
    count = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.stat(os.path.join(dirpath, name))
            count += 1
    return count


async def big_tree_run(store: Store, tree: bytes, work: Path, keep: bool, mode: str) -> BigTreeRun:
    async with open_overlay(store.state_dir, tree, work, keep_work=keep, fs_mode=mode) as mnt:
        start = time.perf_counter()
        found = await trio.run_process(
            ["sh", "-c", f"find '{mnt.root}' -type f | wc -l"],
            capture_stdout=True,
            start_new_session=True,
            deliver_cancel=_kill_group,
        )
        find_seconds = time.perf_counter() - start
        start = time.perf_counter()
        statted = await trio.to_thread.run_sync(stat_every_file, mnt.root)
        stat_seconds = time.perf_counter() - start
        rss = mnt.peak_rss()
    return BigTreeRun(int(found.stdout), statted, find_seconds, stat_seconds, rss)


def remove_tree(path: Path) -> None:
    """Delete ``path``, never into a filesystem still mounted below it."""
    unmount_all_under(path)
    if mounts_under(path):
        print(f"fs.py: {path} still has mounts; leaving it", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


# -- reporting -------------------------------------------------------------------------


@dataclass
class Results:
    mode: str
    plain: list[PlainRun] = field(default_factory=list)  # shared by every mode's Results
    amber: list[AmberRun] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [a.total / p.total for p, a in zip(self.plain, self.amber, strict=True)]


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def print_pair(n: int, plain: PlainRun, amber: AmberRun, mode: str) -> None:
    snap = amber.snapshot.stats
    phases = " ".join(
        f"{ph} {plain.phases[ph].wall:.2f}/{amber.phases[ph].wall:.2f}" for ph in PHASES
    )
    print(
        f"pair {n} {mode}: plain {plain.total:5.2f} s  amber {amber.total:5.2f} s  "
        f"ratio {amber.total / plain.total:.3f}  (CPU {amber.cpu / plain.cpu:.3f})  "
        f"plain/amber: {phases}\n"
        f"        cp -a {plain.copy_seconds:.2f} s; mount {amber.mount_seconds:.3f} s; "
        f"snapshot {snap.seconds:.3f} s: {snap.trees_written} trees, "
        f"{snap.blobs_written} blobs written, {snap.files_hashed} files hashed",
        flush=True,
    )


def load_note() -> str:
    """Other work on the machine inflates FUSE round trips more than plain I/O."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busy = "; wall-clock ratios are unreliable" if load > cores else ""
    return f"load average {load:.2f} on {cores} CPUs{busy}"


def print_summary(
    results: Results, big: BigTreeRun | None, load_before: str
) -> tuple[float, list[float]]:
    plain, amber = results.plain, results.amber
    med = statistics.median
    ratio = med(results.ratios())
    med_plain, med_amber = med(p.total for p in plain), med(a.total for a in amber)
    print(f"\n== summary: {results.mode} ==")
    print(f"machine                       before: {load_before}\n{'':30}after:  {load_note()}")
    print(f"median plain build            {med_plain:.2f} s")
    print(f"median amber build            {med_amber:.2f} s")
    print(f"ratio of medians              {med_amber / med_plain:.3f}")
    cpu_ratio = med(a.cpu / p.cpu for p, a in zip(plain, amber, strict=True))
    print(
        f"CPU-time ratio (median pair)  {cpu_ratio:.3f}  (build + FS process CPU; "
        "less sensitive to other load on the machine than wall time)"
    )
    verdict = "ok" if ratio <= RATIO_TARGET else "ABOVE TARGET"
    print(
        f"median of per-pair ratios     {ratio:.3f}  "
        f"(target <= {RATIO_TARGET:.2f}, aim {RATIO_AIM:.2f}: {verdict})"
    )
    print(f"median mount time             {med(a.mount_seconds for a in amber):.3f} s")
    print(f"median cp -a of the rootfs    {med(p.copy_seconds for p in plain):.2f} s")
    if big is None:  # the link-farm estimate: no FUSE process, no snapshot
        return ratio, [p.total for p in plain]
    first = amber[0].snapshot.stats
    print(
        f"snapshot after the build      {med(a.snapshot.stats.seconds for a in amber):.3f} s "
        f"median; the first, into a store without the outputs: {first.seconds:.3f} s, "
        f"{first.trees_written} trees, {first.blobs_written} blobs, "
        f"{first.files_hashed} files hashed, {mib(first.bytes_written)} written"
    )
    rss_build = max(a.peak_rss_build for a in amber)
    rss_snap = max(a.peak_rss_snapshot for a in amber)
    print(
        f"FS process peak RSS, build    {mib(rss_build)} "
        f"({mib(rss_snap)} after the snapshot; target < {RSS_TARGET_MIB} MiB)"
    )
    print(
        f"FS process peak RSS, 100k     {mib(big.peak_rss)} "
        f"(find saw {big.files_found} files in {big.find_seconds:.2f} s; "
        f"stat of {big.files_statted} files {big.stat_seconds:.2f} s)"
    )
    print_cost_breakdown(results)
    return ratio, [p.total for p in plain]


def print_cost_breakdown(results: Results) -> None:
    med = statistics.median
    runs = len(results.amber)
    print("\n== where the remaining cost goes ==")
    print(
        f"{'phase':<10} {'plain s':>8} {'amber s':>8} {'extra s':>8} {'ratio':>6}"
        f" {'FUSE requests':>14} {'FUSE wait s':>12}"
    )
    for ph in PHASES:
        p = med(r.phases[ph].wall for r in results.plain)
        a = med(r.phases[ph].wall for r in results.amber)
        costs = [c for r in results.amber for c in r.fuse.get(ph, {}).values()]
        requests = sum(c.requests for c in costs) / runs
        wait = sum(c.wait_seconds for c in costs) / runs
        print(f"{ph:<10} {p:8.2f} {a:8.2f} {a - p:8.2f} {a / p:6.3f} {requests:14.0f} {wait:12.3f}")
    print("(times: medians; FUSE figures: means per build, wait summed over requests)")
    print_fuse_ops(results)
    cpu = med(a.fs_usage.cpu_seconds for a in results.amber)
    reads = med(a.fs_usage.read_calls for a in results.amber)
    build = med(a.total for a in results.amber)
    print(
        f"FS process during a build: {cpu:.2f} s CPU ({100 * cpu / build:.1f}% of the build's "
        f"wall time), {reads:.0f} read syscalls (~FUSE requests served)"
    )


def print_fuse_ops(results: Results) -> None:
    totals: dict[str, OpCost] = {}
    for run in results.amber:
        for costs in run.fuse.values():
            for op, cost in costs.items():
                total = totals.setdefault(op, OpCost())
                total.requests += cost.requests
                total.wait_seconds += cost.wait_seconds
    if not totals:
        return
    runs = len(results.amber)
    print(f"{'FUSE op':<12} {'per build':>9} {'wait s':>7} {'us each':>8}")
    for op, cost in sorted(totals.items(), key=lambda kv: -kv[1].wait_seconds):
        each = 1e6 * cost.wait_seconds / cost.requests
        print(f"{op:<12} {cost.requests / runs:9.0f} {cost.wait_seconds / runs:7.3f} {each:8.0f}")


# -- main --------------------------------------------------------------------------------


async def benchmark(
    args: argparse.Namespace, rootfs: Path, tarball: Path, work: Path
) -> tuple[dict[str, float], list[float]]:
    """Every mode's median ratio, pairs interleaved: plain, mode 1, mode 2, ...; plain totals."""
    load_before = load_note()
    store, tree, seconds = await trio.to_thread.run_sync(import_rootfs, work / "state", rootfs)
    print(f"import of the rootfs into a fresh store: {seconds:.2f} s ({tree.hex()[:16]})")
    if LINKFARM in args.modes:
        farm_base = work / "farm-base"
        await trio.to_thread.run_sync(checkout, store, tree, farm_base)
    plain_runs: list[PlainRun] = []
    results = {mode: Results(mode, plain_runs) for mode in args.modes}
    for n in range(1, args.runs + 1):
        plain = await plain_run(rootfs, tarball, work / f"plain-{n}", args.keep)
        plain_runs.append(plain)
        for mode in args.modes:
            run_dir = work / f"{mode}-{n}"
            if mode == LINKFARM:
                amber = await linkfarm_run(farm_base, tarball, run_dir, args.keep)
            else:
                amber = await amber_run(store, tree, tarball, run_dir, args.keep, mode)
            results[mode].amber.append(amber)
            print_pair(n, plain, amber, mode)
    start = time.perf_counter()
    big_tree = await trio.to_thread.run_sync(
        synthetic_tree, store, BIG_TREE_DIRS, BIG_TREE_FILES_PER_DIR
    )
    print(f"\nsynthetic 100,000-file tree written in {time.perf_counter() - start:.2f} s")
    ratios = {}
    for mode in args.modes:
        big = None
        if mode != LINKFARM:
            big = await big_tree_run(store, big_tree, work / f"big-{mode}", args.keep, mode)
        ratios[mode], plain_totals = print_summary(results[mode], big, load_before)
    return ratios, plain_totals


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    known = (*fsmode.MODES, LINKFARM)
    for mode in modes:
        if mode not in known:
            raise argparse.ArgumentTypeError(f"unknown mode {mode!r} (known: {', '.join(known)})")
    if not modes or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError("give each mode once")
    return modes


async def run_until_signal(
    args: argparse.Namespace, rootfs: Path, tarball: Path, work: Path
) -> tuple[dict[str, float], list[float]] | None:
    """The benchmark, cancelled cleanly (mounts undone) on SIGINT/SIGTERM."""
    outcome: list[tuple[dict[str, float], list[float]]] = []

    async def watch_signals(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"\nfs.py: {signal.Signals(signum).name}, cleaning up", file=sys.stderr)
                scope.cancel()
                return

    async def run(scope: trio.CancelScope) -> None:
        outcome.append(await benchmark(args, rootfs, tarball, work))
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, nursery.cancel_scope)
        nursery.start_soon(run, nursery.cancel_scope)
    return outcome[0] if outcome else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="pairs of builds (default 5)")
    parser.add_argument(
        "--mode",
        dest="modes",
        type=parse_modes,
        help="comma-separated: datalower (Linux 6.5+), fuse-data (the fallback), linkfarm "
        "(an estimate of a hard-link farm); each pair runs plain then every mode "
        "(default: the mode amberd would pick here)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp"), help="parent of it")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("fs.py: must run as root (chroot, mounts)")
    if args.runs < 1:
        sys.exit("fs.py: --runs must be at least 1")
    if args.modes is None:
        args.modes = [fsmode.default_fs_mode().name]
    rootfs, tarball = ensure_fixtures()
    work = Path(tempfile.mkdtemp(prefix="amber-bench-fs-", dir=args.work_dir))
    print(f"rootfs {rootfs}\ntarball {tarball}\nwork {work}\nmodes {', '.join(args.modes)}")
    sys.stdout.flush()
    session = Session("fs.py").begin()
    try:
        outcome = trio.run(run_until_signal, args, rootfs, tarball, work)
    finally:
        if args.keep:
            unmount_all_under(work)
            print(f"kept {work}", file=sys.stderr)
        else:
            remove_tree(work)
    if outcome is None:
        sys.exit(130)
    session.end()
    ratios, plain_totals = outcome
    for mode, ratio in ratios.items():
        session.ratio(
            f"fs_build_ratio_{mode.replace('-', '_')}", ratio, "plain build", plain_totals
        )
    session.ratio("fs_build_ratio", ratios[args.modes[0]], "plain build", plain_totals)
    session.finish()


if __name__ == "__main__":
    main()
