#!/usr/bin/env python3
"""Benchmark: `amber export` of a 1 GiB frozen state against `tar` of the same tree, and `amber shell`.

    python scripts/bench/export.py [--runs 5] [--shell-runs 10] [--scale 1.0] [--baseline DIR]

All in one run, on a private amberd with its own state directory:

1. A busybox root is imported as image ``bb``, and a build whose one step
   writes about 1 GiB into ``/build`` and then fails on purpose (exit 1), so
   the build is frozen with that state. The mix: one 400 MiB file, 2,000
   files of 100-500 KiB (about 590 MiB), both from /dev/urandom (so nothing
   compresses or deduplicates), and 20,000 small text files of 0.3-4 KiB in
   200 directories.
2. export: ``amber export BUILD -o FILE`` (the default oci format: a tar
   holding the base layer and the step's layer, uncompressed), end to end, a
   new `amber` process each time; the file is deleted between runs. Timed
   twice a round: ``first`` with amberd's remembered layer digests
   forgotten (a state's first export hashes every layer), then ``again``
   (the same state once more: the digests are known, nothing is hashed).
3. tar: the failed step's after-tree is checked out into a plain directory
   (the store's own ``checkout``; the tree is read from the daemon's database)
   and ``tar -cf FILE -C DIR .`` of it is timed, on the same disk.
4. ``--baseline DIR``: another checkout with its own ``.venv`` (say a
   worktree of main) is timed side by side: its amberd is started on the
   same state directory in place of the new one (one runs at a time) for a
   ``baseline`` export each round, a first one (its digests forgotten too).

   The commands of a round run in an order that alternates between rounds,
   so all see the same page cache and writeback; each ratio is the median of
   the rounds' export/tar ratios, wall and CPU (amberd's and the client's
   for export, tar's own): on a busy machine CPU says more than wall time.
   The load average is printed with every round.
5. shell: ``amber shell BUILD -- true``, end to end, a new `amber` process
   each time (connect, mount the frozen state under a fresh writable layer,
   start the sandbox, run ``true``, tear it down); median and minimum.

Targets: export at most as long as tar (ratio 1.0), shell under 0.3 s
(entering a failed build tree with BuildStream takes about 2.6 s here).
``RESULT export_vs_tar_wall`` and ``_cpu`` are the first export's,
``export_again_vs_tar_*`` the repeated one's, ``main_export_vs_tar_*`` the
baseline's; the last line is ``RESULT export_ratio <x>`` (the first
export's wall ratio, as before).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sqlite3
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from amberd_process import Daemon, cleanup_root, make_root  # noqa: E402
from common import Session, load_average  # noqa: E402
from rootfs import make_busybox_root  # noqa: E402

from amber.sandbox.checkout import checkout  # noqa: E402
from amber.sandbox.digest import from_hex  # noqa: E402
from amber.sandbox.store import Store  # noqa: E402

MiB = 1 << 20

# The step: one big file, medium files of (100 + i*37 mod 401) KiB, small
# files of three sizes, all distinct content; then fail so the state is frozen.
STEP = r"""
mkdir -p big medium small
head -c {big} /dev/urandom > big/blob.bin
i=0
while [ $i -lt {medium} ]; do
  d=medium/d$((i % 20))
  [ -d $d ] || mkdir $d
  head -c $(( (100 + (i * 37) % 401) * 1024 )) /dev/urandom > $d/f$i.bin
  i=$((i + 1))
done
s=0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrst
s=$s$s$s
m=$s$s$s$s
l=$m$m$m$m
i=0
while [ $i -lt {small} ]; do
  d=small/d$((i / 100))
  [ -d $d ] || mkdir $d
  case $((i % 3)) in
    0) printf '%s %d\n' "$s" $i > $d/s$i.txt ;;
    1) printf '%s %d\n' "$m" $i > $d/s$i.txt ;;
    *) printf '%s %d\n' "$l" $i > $d/s$i.txt ;;
  esac
  i=$((i + 1))
done
echo "wrote $(du -sk . | cut -f1) KiB"
exit 1
"""

SPEC = """[build]
name = "export-bench"
base = "bb"
workdir = "/build"

[[step]]
name = "fill"
timeout = "30m"
run = '''{run}'''
"""


def run_checked(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    proc = daemon.amber(*args)
    if proc.returncode != 0:
        raise SystemExit(
            f"amber {' '.join(args)} exited with {proc.returncode}:\n"
            f"{proc.stdout.decode()}\n{proc.stderr.decode()}\n"
            f"daemon log:\n{daemon.log.read_text()[-3000:]}"
        )
    return proc


def timed(
    cmd: list[str], env: dict[str, str] | None = None, daemon_pid: int | None = None
) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, CPU seconds of it plus amberd's meanwhile)."""
    cpu0 = _children_cpu() + (_process_cpu(daemon_pid) if daemon_pid else 0.0)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env)
    elapsed = time.perf_counter() - started
    cpu = _children_cpu() + (_process_cpu(daemon_pid) if daemon_pid else 0.0) - cpu0
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr.decode()[-3000:]}"
        )
    return elapsed, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """User and system time of ``pid``'s threads and reaped children so far
    (amberd's filesystem processes and sandboxes)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def frozen_build(daemon: Daemon, root: Path, scale: float) -> str:
    bbroot = root / "bbroot"
    make_busybox_root(bbroot)
    run_checked(daemon, "image", "import", "bb", f"dir:{bbroot}")
    spec_dir = root / "spec"
    spec_dir.mkdir()
    run = STEP.format(
        big=int(400 * MiB * scale), medium=int(2000 * scale), small=int(20000 * scale)
    )
    (spec_dir / "spec.toml").write_text(SPEC.format(run=run))
    started = time.perf_counter()
    code, report = daemon.build_json(spec_dir / "spec.toml")
    if code != 1 or not report.get("frozen"):
        raise SystemExit(f"expected a frozen failure, got exit {code}: {report}")
    build = report["build"]
    wrote = daemon.amber("log", build).stdout.decode().strip().splitlines()
    note = next((line for line in wrote if "wrote" in line), "")
    print(f"frozen build {build} in {time.perf_counter() - started:.1f} s ({note.strip()})")
    return build


def failed_after_tree(state: Path, build: str) -> bytes:
    db = sqlite3.connect(f"file:{state / 'amber.db'}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT after_tree FROM build_steps WHERE build_id = ? AND status = 'failed'",
            (build,),
        ).fetchone()
    finally:
        db.close()
    if not row or not row[0]:
        raise SystemExit(f"build {build} has no failed step with an after-tree")
    return from_hex(row[0])


def tree_stats(top: Path) -> tuple[int, int]:
    """(regular files, bytes in them) under ``top``."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


class Exports:
    """The timed commands of one benchmark: exports by each daemon, and tar.

    ``daemons`` share one state directory and socket (the new code's, and a
    baseline checkout's when given); one runs at a time and ``use`` switches.
    The new code's export is timed twice per round: ``first`` with the layer
    digests forgotten (what a state's first export costs), then ``again``
    (an export of the same state, the digests known).
    """

    def __init__(self, daemons: dict[str, Daemon], build: str, checkout_dir: Path, root: Path):
        self.daemons = daemons
        self.current = daemons["new"]
        self.build = build
        self.checkout_dir = checkout_dir
        self.out = root / "export.tar"
        self.tar_out = root / "plain.tar"
        self.sizes: dict[str, int] = {}

    def use(self, name: str) -> Daemon:
        if self.current is not self.daemons[name]:
            self.current.stop()
            self.current = self.daemons[name].start()
        return self.current

    def export(self, name: str) -> tuple[float, float]:
        daemon = self.use("baseline" if name == "baseline" else "new")
        if name in ("first", "baseline"):  # the baseline's first export, too
            forget_digests(daemon.state)
        assert daemon.process is not None
        self.out.unlink(missing_ok=True)
        cmd = [str(daemon.bin / "amber"), "export", self.build, "-o", str(self.out)]
        timing = timed(cmd, daemon.env, daemon.process.pid)
        self.sizes[name] = self.out.stat().st_size
        self.out.unlink()
        return timing

    def tar(self) -> tuple[float, float]:
        self.tar_out.unlink(missing_ok=True)
        timing = timed(["tar", "-cf", str(self.tar_out), "-C", str(self.checkout_dir), "."])
        self.sizes["tar"] = self.tar_out.stat().st_size
        self.tar_out.unlink()
        return timing

    def round(self, run: int) -> dict[str, tuple[float, float]]:
        """One of each, in an order that alternates, so none always runs first."""
        order = ["tar", "first", "again", *(["baseline"] if "baseline" in self.daemons else [])]
        if run % 2:
            order.reverse()  # but the first export still before the one again
            first, again = order.index("first"), order.index("again")
            order[min(first, again)], order[max(first, again)] = "first", "again"
        times = {name: self.tar() if name == "tar" else self.export(name) for name in order}
        line = ", ".join(f"{n} {w:.2f} s (cpu {c:.2f})" for n, (w, c) in times.items())
        print(f"run {run + 1}: {line}; {load_average()}", flush=True)
        return times


def forget_digests(state: Path) -> None:
    """The layer digests amberd remembers from earlier exports, forgotten (a first export)."""
    path = state / "layer-digests.db"
    if path.exists():
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM layers")


def check_out(daemon: Daemon, build: str, root: Path) -> Path:
    tree = failed_after_tree(daemon.state, build)
    checkout_dir = root / "checkout"
    started = time.perf_counter()
    checkout(Store(daemon.state), tree, checkout_dir)
    files, content = tree_stats(checkout_dir)
    print(f"checked out {tree.hex()[:16]} in {time.perf_counter() - started:.1f} s: "
          f"{files} files, {content / MiB:.0f} MiB", flush=True)  # fmt: skip
    return checkout_dir


def time_shells(daemon: Daemon, build: str, runs: int) -> list[tuple[float, float]]:
    assert daemon.process is not None
    amber = str(daemon.bin / "amber")
    return [timed([amber, "shell", build, "--", "true"], daemon.env, daemon.process.pid)
            for _ in range(runs)]  # fmt: skip


def report(
    session: Session, exports: Exports, rounds: list[dict[str, tuple[float, float]]]
) -> None:
    """Medians per command, and each export's wall and CPU ratio to tar (median of the rounds')."""
    tar_walls = [r["tar"][0] for r in rounds]
    for name in rounds[0]:
        wall = statistics.median(r[name][0] for r in rounds)
        cpu = statistics.median(r[name][1] for r in rounds)
        size = exports.sizes[name]
        print(
            f"{name:9} median {wall:.2f} s, cpu {cpu:.2f} s, {size} bytes ({size / MiB / wall:.0f} MiB/s)"
        )
    results = {
        "first": "export_vs_tar",
        "again": "export_again_vs_tar",
        "baseline": "main_export_vs_tar",
    }
    for name, result in results.items():
        if name not in rounds[0]:
            continue
        wall = statistics.median(r[name][0] / r["tar"][0] for r in rounds)
        cpu = statistics.median(r[name][1] / r["tar"][1] for r in rounds)
        print(
            f"{name:9} / tar: {wall:.3f} wall, {cpu:.3f} CPU (amberd + amber vs tar; target <= 1.0)"
        )
        session.ratio(f"{result}_wall", wall, "tar -cf", tar_walls)
        session.ratio(f"{result}_cpu", cpu, "tar -cf", [r["tar"][1] for r in rounds])
    print(f"archive size  export/tar {exports.sizes['first'] / exports.sizes['tar']:.4f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=5, help="rounds of export and tar runs (median)"
    )
    parser.add_argument("--shell-runs", type=int, default=10, help="amber shell runs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 1 GiB mix")
    parser.add_argument(
        "--baseline", type=Path, help="a checkout (with .venv) to time side by side, e.g. of main"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    # SIGTERM unwinds like Ctrl-C, so the finally below always runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = make_root()
    daemons = {"new": Daemon(root, jobs=2)}
    if args.baseline:
        daemons["baseline"] = Daemon(root, jobs=2, bin_dir=args.baseline.resolve() / ".venv/bin")
    session = Session("export.py").begin()
    exports = None
    try:
        print(f"state root {root}", flush=True)
        daemons["new"].start()
        build = frozen_build(daemons["new"], root, args.scale)
        exports = Exports(daemons, build, check_out(daemons["new"], build, root), root)
        rounds = [exports.round(run) for run in range(args.runs)]
        shells = time_shells(exports.use("new"), build, args.shell_runs)
        print()
        session.end()
        report(session, exports, rounds)
        walls = [w for w, _ in shells]
        print(f"amber shell BUILD -- true  median {statistics.median(walls):.3f} s  "
              f"min {min(walls):.3f} s  max {max(walls):.3f} s  over {len(shells)} runs, "
              f"cpu median {statistics.median(c for _, c in shells):.3f} s  (target < 0.3 s)")  # fmt: skip
        session.ratio("export_ratio", statistics.median(r["first"][0] / r["tar"][0] for r in rounds),
                      "tar -cf", [r["tar"][0] for r in rounds])  # fmt: skip
    finally:
        # Cleanup must not be cut short by a second Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            running = exports.current if exports else daemons["new"]
            if running.process is not None:
                running.stop()
        finally:
            left = cleanup_root(root)
            if left:
                print(f"unmounted leftovers: {left}", file=sys.stderr)
    session.finish()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; daemon stopped and state root removed", file=sys.stderr)
        sys.exit(130)
