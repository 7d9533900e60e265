#!/usr/bin/env python3
"""Benchmark: `amber export` of a 1 GiB frozen state against `tar` of the same tree, and `amber shell`.

    python scripts/bench/export.py [--runs 3] [--shell-runs 10] [--scale 1.0]

All in one run, on a private amberd with its own state directory:

1. A busybox root is imported as image ``bb``, and a build whose one step
   writes about 1 GiB into ``/build`` and then fails on purpose (exit 1), so
   the build is frozen with that state. The mix: one 400 MiB file, 2,000
   files of 100-500 KiB (about 590 MiB), both from /dev/urandom (so nothing
   compresses or deduplicates), and 20,000 small text files of 0.3-4 KiB in
   200 directories.
2. export: ``amber export BUILD -o FILE`` (the default oci format: a tar
   holding the base layer and the step's layer, uncompressed), end to end, a
   new `amber` process each time; the file is deleted between runs.
3. tar: the failed step's after-tree is checked out into a plain directory
   (the store's own ``checkout``; the tree is read from the daemon's database)
   and ``tar -cf FILE -C DIR .`` of it is timed, on the same disk.
   Export and tar runs alternate, so both see the same page cache and
   writeback; the ratio is the median of the runs' export/tar ratios. CPU
   seconds (amberd's and the client's for export, tar's own) are printed
   too: on a busy machine they say more than wall time.
4. shell: ``amber shell BUILD -- true``, end to end, a new `amber` process
   each time (connect, mount the frozen state under a fresh writable layer,
   start the sandbox, run ``true``, tear it down); median and minimum.

Targets: export close to tar (ratio about 1.0), shell under 0.3 s (entering a
failed build tree with BuildStream takes about 2.6 s here). The last line is
``RESULT export_ratio <x>``.
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
from common import Session  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="export and tar runs (median)")
    parser.add_argument("--shell-runs", type=int, default=10, help="amber shell runs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 1 GiB mix")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")

    # SIGTERM unwinds like Ctrl-C, so the finally below always runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = make_root()
    daemon = Daemon(root, jobs=2)
    session = Session("export.py").begin()
    try:
        print(f"state root {root}", flush=True)
        daemon.start()
        build = frozen_build(daemon, root, args.scale)

        tree = failed_after_tree(daemon.state, build)
        checkout_dir = root / "checkout"
        started = time.perf_counter()
        checkout(Store(daemon.state), tree, checkout_dir)
        files, content = tree_stats(checkout_dir)
        print(
            f"checked out {tree.hex()[:16]} in {time.perf_counter() - started:.1f} s: "
            f"{files} files, {content / MiB:.0f} MiB",
            flush=True,
        )

        amber = str(Path(sys.executable).parent / "amber")
        assert daemon.process is not None
        pid = daemon.process.pid
        export_file = root / "export.tar"
        tar_file = root / "plain.tar"
        pairs: list[tuple[tuple[float, float], tuple[float, float]]] = []
        export_size = tar_size = 0
        for run in range(args.runs):
            export_file.unlink(missing_ok=True)
            e = timed([amber, "export", build, "-o", str(export_file)], daemon.env, pid)
            export_size = export_file.stat().st_size
            export_file.unlink()
            tar_file.unlink(missing_ok=True)
            t = timed(["tar", "-cf", str(tar_file), "-C", str(checkout_dir), "."])
            tar_size = tar_file.stat().st_size
            tar_file.unlink()
            pairs.append((e, t))
            print(
                f"run {run + 1}: export {e[0]:.2f} s (cpu {e[1]:.2f} s), "
                f"tar {t[0]:.2f} s (cpu {t[1]:.2f} s), ratio {e[0] / t[0]:.3f}",
                flush=True,
            )

        shells = []
        for _ in range(args.shell_runs):
            shells.append(timed([amber, "shell", build, "--", "true"], daemon.env, pid))
        shell_wall = [w for w, _ in shells]

        export_med = statistics.median(e[0] for e, _ in pairs)
        tar_med = statistics.median(t[0] for _, t in pairs)
        ratio = statistics.median(e[0] / t[0] for e, t in pairs)
        cpu_ratio = statistics.median(e[1] / t[1] for e, t in pairs)
        print()
        session.end()
        print(
            f"amber export  median {export_med:.2f} s  {export_size} bytes "
            f"({export_size / MiB:.0f} MiB, {export_size / MiB / export_med:.0f} MiB/s)"
        )
        print(
            f"tar -cf       median {tar_med:.2f} s  {tar_size} bytes "
            f"({tar_size / MiB:.0f} MiB, {tar_size / MiB / tar_med:.0f} MiB/s)"
        )
        print(
            f"archive size  export/tar {export_size / tar_size:.4f} "
            f"({export_size - tar_size:+d} bytes)"
        )
        print(
            f"export/tar    {ratio:.3f} wall (median of pairs; target about 1.0), "
            f"{cpu_ratio:.3f} CPU (amberd + amber vs tar)"
        )
        print(
            f"amber shell BUILD -- true  median {statistics.median(shell_wall):.3f} s  "
            f"min {min(shell_wall):.3f} s  max {max(shell_wall):.3f} s  over {len(shells)} runs, "
            f"cpu median {statistics.median(c for _, c in shells):.3f} s  (target < 0.3 s)"
        )
        session.ratio("export_ratio", ratio, "tar -cf", [t[0] for _, t in pairs])
    finally:
        # Cleanup must not be cut short by a second Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if daemon.process is not None:
                daemon.stop()
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
