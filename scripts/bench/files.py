#!/usr/bin/env python3
"""Benchmark: a step that creates many files, in amber and natively, and its snapshot vs tar.

    python scripts/bench/files.py [--files 20000 [100000 ...]] [--pairs 3] [--builds 10]
                                  [--measure 1,10] [--work-dir DIR] [--ext4-image GIB]
                                  [--file-size BYTES]

Steps that create many files (a node_modules, a kernel's object tree) must
run at native speed in every build of a daemon, and the snapshot of what
they made must cost about what ``tar -cf`` of it costs. For each N given to
``--files`` and each of ``--pairs`` fresh daemons (a real amberd from this
repository's venv, its own state directory), ``--builds`` builds run one
after another in that daemon, each a one-step spec on the ``host`` base::

    mkdir d && cd d && seq 1 N | xargs touch

with a fresh key salt, so every build runs the step (with ``--file-size
BYTES``, files of that many bytes, each of its own content, written by a
shell loop instead of ``touch``). The builds named by
``--measure`` (default: the first and the last, e.g. 1 and 10) are each
paired with the same command run natively just before, in a fresh directory
on the same disk, followed by ``tar -cf`` of what it made. Dirty data is
synced before each timed run, so neither side pays for the other's
writeback. On ext4 without a journal, creating files is slow for minutes
after a deletion in the same inode groups, whoever deleted (README, "Why a
file-heavy step took 3 s, then 15 s"), so there the script runs it all
on a journalled ext4 in a loop-mounted sparse image instead (``--ext4-image
GIB`` anywhere; ``--ext4-image 0`` to measure the disk itself).

From each amber build, ``amber build --json`` gives the step's own time in
the sandbox (``seconds``) and its snapshot's (``snapshot_seconds``); the
whole ``amber build`` wall time is printed beside them.

RESULT lines (each the worst over N and over the measured build indices;
a ratio is refused, NORESULT, when its baseline spread by more than 25 %):

- ``RESULT files_step_ratio``: median over pairs of step / native create
  (target <= 1.10 in the first build and the tenth alike);
- ``RESULT files_snapshot_vs_tar``: median of snapshot / ``tar -cf``
  (target <= 2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import Session

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from amberd_process import Daemon, cleanup_root  # noqa: E402

from amber.daemon.preflight import ext4_journal  # noqa: E402

STEP_TARGET, SNAPSHOT_TARGET = 1.10, 2.0
AUTO_IMAGE_GIB = 8  # sparse: room for 2 x 100,000 inodes (one per 16 KiB) and the store


#: Bytes in each file the step makes (``--file-size``); 0: empty files, made by touch.
FILE_SIZE = 0


def step_command(files: int) -> str:
    if not FILE_SIZE:
        return f"mkdir d && cd d && seq 1 {files} | xargs touch"
    # Each file its own content (its number, zero-padded to the size): no two share a blob.
    fill = f"for i; do printf %0{FILE_SIZE}d $i > $i; done"
    return f"mkdir d && cd d && seq 1 {files} | xargs sh -c '{fill}' sh"


def spec_text(files: int, salt: str, command: str | None = None) -> str:
    run = step_command(files) if command is None else command
    return (
        f'[build]\nname = "files-bench"\nbase = "host"\nkey_salt = "{salt}"\n\n'
        f"[[step]]\nname = \"create\"\nrun = '''{run}'''\n"
    )


def timed(cmd: list[str], cwd: Path) -> float:
    os.sync()
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


@dataclass
class Native:
    create: float
    tar: float


@dataclass
class Amber:
    step: float
    snapshot: float
    build: float


def native_run(root: Path, files: int) -> Native:
    """The step's command in a fresh directory on the same disk, then tar of the result."""
    work = Path(tempfile.mkdtemp(prefix="native-", dir=root))
    try:
        create = timed(["sh", "-c", step_command(files)], work)
        tar = timed(["tar", "-cf", str(work / "d.tar"), "d"], work)
        return Native(create, tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def amber_run(daemon: Daemon, spec: Path, files: int, command: str | None = None) -> Amber:
    spec.write_text(spec_text(files, f"files-{uuid.uuid4()}", command))
    os.sync()
    started = time.perf_counter()
    code, report = daemon.build_json(spec)
    wall = time.perf_counter() - started
    if code != 0 or report.get("status") != "success":
        raise SystemExit(
            f"files.py: amber build failed: {report}\n{daemon.log.read_text()[-2000:]}"
        )
    (step,) = report["steps"]
    if step.get("snapshot_seconds") is None:
        raise SystemExit("files.py: this amberd does not report snapshot_seconds per step")
    return Amber(step["seconds"], step["snapshot_seconds"], wall)


def one_daemon(
    root: Path, files: int, builds: int, measure: set[int], pair: int
) -> dict[int, tuple[Native, Amber]]:
    """``builds`` builds in one fresh daemon; those in ``measure`` paired with a native run."""
    home = root / f"daemon-{files}-{pair}"
    home.mkdir()
    os.chmod(home, 0o755)
    daemon = Daemon(home, jobs=2)
    daemon.start()
    rows = {}
    try:
        spec = home / "spec.toml"
        for index in range(1, builds + 1):
            native = native_run(root, files) if index in measure else None
            amber = amber_run(daemon, spec, files)
            load = os.getloadavg()[0]
            line = (
                f"N={files} daemon {pair} build {index:2d}: amber step {amber.step:6.2f} s, "
                f"snapshot {amber.snapshot:5.2f} s, whole build {amber.build:6.2f} s"
            )
            if native is not None:
                rows[index] = (native, amber)
                line += (
                    f" | native {native.create:6.2f} s, tar {native.tar:5.2f} s"
                    f" | step/native {amber.step / native.create:.2f}, "
                    f"snapshot/tar {amber.snapshot / native.tar:.1f}"
                )
            print(f"{line}  (load {load:.1f})", flush=True)
        empty = amber_run(daemon, spec, files, "true")
        print(f"N={files} daemon {pair}: a `true` step takes {empty.step:.2f} s in the sandbox "
              f"(the fixed part of a step's seconds), its snapshot {empty.snapshot:.3f} s")  # fmt: skip
    finally:
        daemon.stop()
    return rows


def summarise(session: Session, runs: dict[int, dict[int, list[tuple[Native, Amber]]]]) -> None:
    """Per N and build index, then the worst of them as the RESULT lines."""
    med = statistics.median
    worst_step: tuple[float, list[float]] | None = None
    worst_snap: tuple[float, list[float]] | None = None
    print()
    for files, by_index in runs.items():
        # The native command is the same whatever the build index: all its runs are the baseline.
        natives = [n.create for rows in by_index.values() for n, _ in rows]
        tars = [n.tar for rows in by_index.values() for n, _ in rows]
        for index, rows in by_index.items():
            step = med(a.step / n.create for n, a in rows)
            snap = med(a.snapshot / n.tar for n, a in rows)
            whole = med(a.build / n.create for n, a in rows)
            print(
                f"N={files} build {index:2d}: native {med(n.create for n, _ in rows):.2f} s, "
                f"amber step {med(a.step for _, a in rows):.2f} s, ratio {step:.3f} "
                f"(target <= {STEP_TARGET:.2f}); whole build / native {whole:.2f}; "
                f"snapshot {med(a.snapshot for _, a in rows):.2f} s vs tar "
                f"{med(n.tar for n, _ in rows):.2f} s, "
                f"ratio {snap:.1f} (target <= {SNAPSHOT_TARGET:.0f})"
            )
            # The worst case decides, and the baseline runs behind it must be steady.
            if worst_step is None or step > worst_step[0]:
                worst_step = (step, natives)
            if worst_snap is None or snap > worst_snap[0]:
                worst_snap = (snap, tars)
    assert worst_step is not None and worst_snap is not None
    session.ratio("files_step_ratio", worst_step[0], "native create", worst_step[1])
    session.ratio("files_snapshot_vs_tar", worst_snap[0], "tar -cf", worst_snap[1])


def parse_measure(text: str | None, builds: int) -> set[int]:
    if text is None:
        return {1, builds}
    try:
        indices = {int(part) for part in text.split(",")}
    except ValueError:
        raise SystemExit(
            f"files.py: --measure takes build numbers like 1,10, not {text!r}"
        ) from None
    if not indices or min(indices) < 1 or max(indices) > builds:
        raise SystemExit(f"files.py: --measure numbers must lie in 1..{builds}")
    return indices


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, nargs="+", default=[20000],
                        help="files the step creates; several values run one after another "
                        "(default 20000; the issue's other size is 100000)")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=3,
                        help="fresh daemons, each giving one pair per measured build (default 3)")  # fmt: skip
    parser.add_argument("--builds", type=int, default=10,
                        help="builds run one after another in each daemon (default 10)")  # fmt: skip
    parser.add_argument("--measure", metavar="I,J",
                        help="which builds of a daemon are paired with a native run "
                        "(default: the first and the last)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp"),
                        help="parent of the work directory; native runs and amber's state "
                        "both live there, on one disk (default /var/tmp)")  # fmt: skip
    parser.add_argument("--ext4-image", type=int, metavar="GIB",
                        help="run on a fresh ext4 with a journal, a sparse image of GIB GiB "
                        "loop-mounted in the work directory (README: why a step took 3 s, then "
                        "15 s); the default when the work directory is on ext4 without a "
                        f"journal, with {AUTO_IMAGE_GIB} GiB; 0: never")  # fmt: skip
    parser.add_argument("--file-size", type=int, default=0, metavar="BYTES",
                        help="bytes in each file, each file its own content (default 0: "
                        "empty files by touch; the issue's other case is 1024)")  # fmt: skip
    args = parser.parse_args()
    global FILE_SIZE
    FILE_SIZE = args.file_size
    if os.geteuid() != 0:
        raise SystemExit("files.py: run as root (amberd mounts and sandboxes)")
    if args.pairs < 1 or args.builds < 1 or min(args.files) < 1:
        raise SystemExit("files.py: --pairs, --builds and --files must be at least 1")
    measure = parse_measure(args.measure, args.builds)
    image = args.ext4_image
    device, journal = ext4_journal(args.work_dir)
    if image is None and device is not None and not journal:
        print(f"files.py: {args.work_dir} is on ext4 ({device}) without a journal, where creating "
              "files is slow for minutes after any deletion nearby, natively and in amber alike "
              "(README): measuring on a journalled ext4 image instead (--ext4-image 0: on the "
              "disk itself)", flush=True)  # fmt: skip
        image = AUTO_IMAGE_GIB
    with ExitStack() as stack:
        work = args.work_dir
        if image:
            work = stack.enter_context(ext4_image(args.work_dir, image))
        benchmark(args, work, measure)


@contextmanager
def ext4_image(parent: Path, gib: int) -> Iterator[Path]:
    """A journalled ext4 (mkfs.ext4's default) on a sparse image, loop-mounted; removed after."""
    top = Path(tempfile.mkdtemp(prefix="amber-bench-ext4-", dir=parent))
    os.chmod(top, 0o755)  # the sandbox's host uids traverse it to their build roots
    image, mnt = top / "fs.img", top / "fs"
    try:
        with open(image, "wb") as f:
            f.truncate(gib << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        try:
            print(f"files.py: on a journalled ext4 of {gib} GiB at {mnt}", flush=True)
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def benchmark(args: argparse.Namespace, work: Path, measure: set[int]) -> None:
    root = Path(tempfile.mkdtemp(prefix="amber-bench-files-", dir=work))
    os.chmod(root, 0o755)
    runs: dict[int, dict[int, list[tuple[Native, Amber]]]] = {}
    device, journal = ext4_journal(root)
    if device is not None and not journal:
        print(f"files.py: {root} is on ext4 ({device}) without a journal: expect figures "
              "that swing from build to build", flush=True)  # fmt: skip
    with Session("files.py") as session:
        try:
            for files in args.files:
                by_index = runs.setdefault(files, {i: [] for i in sorted(measure)})
                for pair in range(1, args.pairs + 1):
                    rows = one_daemon(root, files, args.builds, measure, pair)
                    for index, row in rows.items():
                        by_index[index].append(row)
        finally:
            cleanup_root(root)
        summarise(session, runs)
    session.finish()


if __name__ == "__main__":
    main()
