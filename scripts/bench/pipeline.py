#!/usr/bin/env python3
"""Benchmark: a whole cold `amber build` on a Debian rootfs vs the same commands in a chroot of it.

    python scripts/bench/pipeline.py [--runs 5] [--cached-runs 10] [--concurrent 20]
        [--no-podman] [--host-runs N] [--compare VAR=VALUE ...] [--no-fuse-trace] [--edit]

The base is the Debian buildd rootfs that tests/test_rootfs_builds.py uses
(``scripts/make-rootfs``, cached under $AMBER_TEST_CACHE/rootfs; the script
waits if another process is making it), imported as an image the way a user
does (``amber image import bench-buildd dir:PATH``). The spec has the three
steps of zlib: extract, configure, ``make -j2``. In one run, alternating:

1. **chroot**: the same three commands, each ``chroot ROOT /bin/sh -ec``, in a
   fresh directory of one ``cp -a`` copy of the rootfs (made before timing);
2. **amber cold**: ``amber build`` of the spec with a fresh key salt (nothing
   cached: source layout, mount, sandboxes, snapshots, results and the
   client are all in the time), end to end as a user types it.

Pairs alternate which goes first. ``cold_ratio`` is the median of the
per-pair ratios; it is refused (NORESULT, exit 3) when the chroot's runs
spread by more than 25 % (common.py). For every amber build the phases
amberd recorded (``amber show --json``: mount and its parts, sandbox start,
each step's run, snapshots, unmount, ...) are printed as medians beside the
chroot's per-step times, and the FUSE requests of amberd's mounts during the
build, by opcode, from the kernel's fuse tracepoints (fusetrace.py; per step
by time), unless ``--no-fuse-trace``.

``--edit``: every cold amber build also has a source ``edit.c`` whose
content differs from the last build's (a developer's edit-and-rebuild loop),
so the tree it mounts is new each time though the base is not;
``--edit --compare AMBER_SOURCE_LAYER=0`` measures the sources layer
(sandbox/sourcelayer.py) against a fresh lower for every such tree.

``--compare VAR=VALUE`` (repeatable) starts a second amberd with those
variables in its environment, and every pair becomes a triple (chroot, amber,
amber with them): the A/B of a change behind a switch, in the same run.

Then: fully cached rebuilds on the rootfs and on ``host`` (end to end, a new
`amber` process each time), ``amber --version`` beside ``python -S -c pass``
(alternating), podman's cold build of the same steps (one layer per step),
and ``--concurrent`` builds at once for amberd's peak memory.

RESULT lines: ``cold_ratio``, ``cold_ratio_compare`` (with --compare),
``cached_seconds_rootfs``, ``cached_seconds_host``, ``client_start_seconds``
and ``python_start_seconds`` (medians). Targets: cold at most 1.05, cached
at most 0.08 s (rootfs) and 0.06 s (host), client start at most 0.05 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
BIN = Path(sys.executable).parent

from amberd_process import Daemon, cleanup_root  # noqa: E402
from common import Session  # noqa: E402
from fusetrace import FuseTrace, by_opcode, fuse_connections, requests  # noqa: E402
from sources import source_tarball  # noqa: E402

STEPS = [
    ("extract", "tar xf zlib.tar.bz2"),
    ("configure", "cd zlib-* && ./configure >/dev/null"),
    ("make", "cd zlib-* && make -j2 >/dev/null"),
]
STEP_NAMES = [name for name, _ in STEPS]
ROOTFS_IMAGE = "bench-buildd"
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
}
med = statistics.median


def spec_text(salt: str, base: str = "host", edit: bool = False) -> str:
    steps = "".join(f'\n[[step]]\nname = "{n}"\nrun = "{r}"\n' for n, r in STEPS)
    edited = '\n[[source]]\npath = "edit.c"\n' if edit else ""
    return f'[build]\nname = "zlib-bench"\nbase = "{base}"\nkey_salt = "{salt}"\n\n[[source]]\npath = "zlib.tar.bz2"\n{edited}{steps}'


def timed(cmd: list[str], **kwargs) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - started


def buildd_rootfs() -> Path:
    """The rootfs tests/test_rootfs_builds.py builds on (made, or waited for, by make-rootfs)."""
    made = subprocess.run(
        [str(REPO / "scripts" / "make-rootfs")], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        raise SystemExit(f"pipeline.py: scripts/make-rootfs failed:\n{made.stderr}")
    return Path(made.stdout.splitlines()[-1])


# -- one run of each kind ---------------------------------------------------------------


@dataclass
class ChrootRun:
    seconds: float
    steps: dict[str, float]


def chroot_run(chroot: Path, tarball: Path, n: int) -> ChrootRun:
    """The spec's steps as chroot commands in a fresh /build/run-N of the copy."""
    work = chroot / "build" / f"run-{n}"
    work.mkdir()
    shutil.copy(tarball, work / "zlib.tar.bz2")
    os.sync()  # neither kind of run pays for the other's writeback
    steps = {}
    try:
        for name, run in STEPS:
            script = f"cd /build/run-{n} && {run}"
            steps[name] = timed(["chroot", str(chroot), "/bin/sh", "-ec", script], env=CHROOT_ENV)
    finally:
        shutil.rmtree(work)
    return ChrootRun(sum(steps.values()), steps)


@dataclass
class AmberRun:
    seconds: float
    #: Per step: its phases as amberd recorded them (amber show --json).
    steps: dict[str, dict[str, float]]
    #: The build's phases outside the steps.
    build: dict[str, float]
    #: Step name (or "between steps") -> FUSE opcode -> (requests, seconds waited).
    fuse: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)


class MountWatch:
    """The FUSE connections amberd mounts below its root while a build runs (a thread)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.found: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> MountWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        assert self.daemon.process is not None
        while not self._stop.wait(0.01):
            try:
                self.found |= fuse_connections(self.daemon.process.pid, self.daemon.root)
            except OSError:
                return


def amber_run(daemon: Daemon, spec: Path, trace: FuseTrace | None) -> AmberRun:
    os.sync()
    if trace is not None:
        trace.take()  # what came before is not this build's
    with MountWatch(daemon) as watch:
        started = time.perf_counter()
        proc = daemon.amber("build", "--json", str(spec))
        elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"amber build failed:\n{proc.stdout.decode()}\n{proc.stderr.decode()}")
    shown = show(daemon, json.loads(proc.stdout)["build"])
    steps = {s["name"]: dict(s.get("phases") or {}) for s in shown["steps"]}
    run = AmberRun(elapsed, steps, dict(shown.get("phases") or {}))
    if trace is not None:
        run.fuse = fuse_by_step(trace.take(), watch.found, shown["steps"])
    return run


def show(daemon: Daemon, build: str) -> dict:
    """The daemon's ``show`` record itself: epoch times to the microsecond (the
    command's ``--json`` rounds them to whole seconds, too coarse to place a request)."""
    with daemon.connect() as conn:
        return conn.call("show", build=build)


def fuse_by_step(text: bytes, connections: set[int], steps: list[dict]) -> dict:
    """Requests of the build's mounts, by the step whose run they fell in (by time)."""
    offset = time.time() - time.monotonic()  # epoch (the steps' start) -> the trace's mono clock
    spans = [
        (s["name"], s["started"] - offset, s["started"] - offset + s["seconds"])
        for s in steps
        if s.get("started") is not None and s.get("seconds") is not None
    ]
    grouped: dict[str, list] = {}
    for request in requests(text, connections):
        name = next((n for n, a, b in spans if a <= request.sent <= b), "between steps")
        grouped.setdefault(name, []).append(request)
    return {
        name: {op: (c.requests, c.wait_seconds) for op, c in by_opcode(found).items()}
        for name, found in grouped.items()
    }


# -- the rest ---------------------------------------------------------------------------------


def client_start(runs: int) -> tuple[list[float], list[float]]:
    """``amber --version`` and ``python -S -c pass``, alternating: seconds of each."""
    amber, python = [], []
    for _ in range(runs):
        python.append(timed([sys.executable, "-S", "-c", "pass"]))
        amber.append(timed([str(BIN / "amber"), "--version"]))
    return amber, python


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def concurrent_builds(daemon: Daemon, root: Path, tarball: Path, count: int) -> tuple[float, int]:
    specs = []
    for i in range(count):
        d = root / f"many{i}"
        d.mkdir()
        os.link(tarball, d / "zlib.tar.bz2")
        (d / "spec.toml").write_text(spec_text(f"many-{uuid.uuid4()}"))
        specs.append(d / "spec.toml")
    failures = []

    def one(spec: Path) -> None:
        if daemon.amber("build", str(spec)).returncode != 0:
            failures.append(spec)

    threads = [threading.Thread(target=one, args=(s,)) for s in specs]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} concurrent builds failed")
    assert daemon.process is not None
    return time.perf_counter() - started, peak_rss(daemon.process.pid)


def run_checked(daemon: Daemon, *args: str) -> None:
    proc = daemon.amber(*args)
    if proc.returncode != 0:
        raise SystemExit(
            f"amber {' '.join(args)} failed:\n{proc.stdout.decode()}{proc.stderr.decode()}"
        )


def podman_cold(rootfs: Path, tarball: Path, root: Path) -> float | None:
    """podman build of the same steps on the buildd rootfs, one layer per step."""
    ctx = root / "podman"
    ctx.mkdir()
    store = [
        "--root",
        str(ctx / "storage"),
        "--runroot",
        str(ctx / "run"),
        "--storage-driver",
        "vfs",
    ]
    conf = ctx / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                    '[engine]\nruntime = "runc"\n')  # fmt: skip
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", *store, "import", "-", "amber-bench-base"], stdin=tar.stdout, check=True,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    tar.wait()
    shutil.copy(tarball, ctx / "zlib.tar.bz2")
    lines = ["FROM amber-bench-base", "WORKDIR /build", "COPY zlib.tar.bz2 ."]
    lines += [f"RUN {r}" for _, r in STEPS]
    (ctx / "Containerfile").write_text("\n".join(lines) + "\n")
    try:
        return timed(
            ["podman", *store, "build", "--network=none", "-t", "bench", str(ctx)], env=env
        )
    except subprocess.CalledProcessError:
        return None


# -- the run ------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    tarball: Path
    rootfs: Path
    daemons: dict[str, Daemon]  # "amber", and "compare" with --compare
    chroot: Path = field(init=False)
    spec_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.chroot = self.root / "chroot"
        self.spec_dir = self.root / "spec"
        self.spec_dir.mkdir()
        os.link(self.tarball, self.spec_dir / "zlib.tar.bz2")

    def spec(self, base: str, salt: str, edit: bool = False) -> Path:
        """A spec; with ``edit``, its ``edit.c`` source differs from the last one's."""
        path = self.spec_dir / f"{base}-{uuid.uuid4().hex[:8]}.toml"
        path.write_text(spec_text(salt, base, edit))
        if edit:
            (self.spec_dir / "edit.c").write_text(f"/* edit {uuid.uuid4().hex} */\n")
        return path

    def prepare(self) -> None:
        started = time.perf_counter()
        subprocess.run(["cp", "-a", f"{self.rootfs}/.", str(self.chroot)], check=True)
        print(f"cp -a of the rootfs for the chroot: {time.perf_counter() - started:.2f} s")
        for name, daemon in self.daemons.items():
            started = time.perf_counter()
            run_checked(daemon, "image", "import", ROOTFS_IMAGE, f"dir:{self.rootfs}")
            print(f"{name}: amber image import {ROOTFS_IMAGE} dir:{self.rootfs}: "
                  f"{time.perf_counter() - started:.2f} s")  # fmt: skip

    def cold_pairs(self) -> tuple[list[ChrootRun], dict[str, list[AmberRun]]]:
        chroots: list[ChrootRun] = []
        ambers: dict[str, list[AmberRun]] = {name: [] for name in self.daemons}
        trace_name = f"amber-bench-pipeline-{os.getpid()}"
        with FuseTrace(trace_name, buffer_kb=32768) as trace:
            traced = trace if trace.available and not self.args.no_fuse_trace else None
            for n in range(self.args.runs):
                kinds = ["chroot", *self.daemons]
                order = kinds[n % len(kinds) :] + kinds[: n % len(kinds)]  # who goes first rotates
                for kind in order:
                    if kind == "chroot":
                        chroots.append(chroot_run(self.chroot, self.tarball, n))
                    else:
                        spec = self.spec(ROOTFS_IMAGE, f"cold-{uuid.uuid4()}", self.args.edit)
                        ambers[kind].append(amber_run(self.daemons[kind], spec, traced))
                self.print_pair(n, chroots[-1], {k: v[-1] for k, v in ambers.items()})
        return chroots, ambers

    def print_pair(self, n: int, chroot: ChrootRun, ambers: dict[str, AmberRun]) -> None:
        line = f"pair {n + 1}: chroot {chroot.seconds:.2f} s"
        for name, run in ambers.items():
            line += f", {name} {run.seconds:.2f} s (ratio {run.seconds / chroot.seconds:.3f})"
        print(f"{line}  (load {os.getloadavg()[0]:.1f})", flush=True)

    def cached(self, base: str, daemon: Daemon) -> list[float]:
        spec = self.spec(base, "cached")
        run_checked(daemon, "build", str(spec))  # the cold build that fills the cache
        return [amber_run(daemon, spec, None).seconds for _ in range(self.args.cached_runs)]


def breakdown(chroots: list[ChrootRun], runs: list[AmberRun], name: str) -> None:
    """Per step: chroot vs amber's run and its phases; the build's own phases; the rest."""
    print(f"\n-- where a cold build's time goes ({name}; medians of {len(runs)} builds) --")
    print(f"{'':14}{'chroot':>8}{'amber':>8}   amber's phases around the step")
    accounted = []
    for step in STEP_NAMES:
        phases = [r.steps.get(step, {}) for r in runs]
        keys = [k for k in phases[0] if k != "run"]
        around = ", ".join(f"{k} {med(p.get(k, 0.0) for p in phases):.3f}" for k in keys)
        run = med(p.get("run", 0.0) for p in phases)
        print(f"{step:<14}{med(c.steps[step] for c in chroots):8.3f}{run:8.3f}   {around}")
    for r in runs:
        inside = sum(v for p in r.steps.values() for k, v in p.items() if "." not in k)
        accounted.append(inside + sum(r.build.values()))
    print("build         " + ", ".join(
        f"{k} {med(r.build.get(k, 0.0) for r in runs):.3f}" for k in runs[0].build
    ))  # fmt: skip
    rest = med(r.seconds - a for r, a in zip(runs, accounted, strict=True))
    print(f"the rest      {rest:.3f} s: the client (start, connect, spec), the protocol, "
          "the queue and the build's records")  # fmt: skip
    fuse_table(runs)


def fuse_table(runs: list[AmberRun]) -> None:
    """FUSE requests per build (medians), by where they fell and by opcode."""
    traced = [r.fuse for r in runs if r.fuse]
    if not traced:
        return
    print("FUSE requests of amberd's mounts per build (median count, median ms waited):")
    for where in [*STEP_NAMES, "between steps"]:
        ops = sorted({op for f in traced for op in f.get(where, {})})
        if not ops:
            continue
        cells = []
        for op in ops:
            counts = [f.get(where, {}).get(op, (0, 0.0)) for f in traced]
            cells.append(f"{op} {med(c for c, _ in counts):.0f} "
                         f"({1000 * med(s for _, s in counts):.1f} ms)")  # fmt: skip
        print(f"  {where:<14}" + ", ".join(cells))


def measure(session: Session, bench: Bench) -> None:
    args = bench.args
    bench.prepare()
    chroots, ambers = bench.cold_pairs()
    main = bench.daemons["amber"]
    host_cold = []
    for _ in range(args.host_runs):
        host_cold.append(amber_run(main, bench.spec("host", f"cold-{uuid.uuid4()}"), None).seconds)
    cached_rootfs = bench.cached(ROOTFS_IMAGE, main)
    cached_host = bench.cached("host", main)
    client, python = client_start(args.cached_runs)
    podman = None
    if shutil.which("podman") and not args.no_podman:
        podman = podman_cold(bench.rootfs, bench.tarball, bench.root)
    wall, rss = (
        concurrent_builds(main, bench.root, bench.tarball, args.concurrent)
        if args.concurrent
        else (0.0, 0)
    )
    chroot_med = med(c.seconds for c in chroots)
    print(f"\nchroot              median {chroot_med:.2f} s  "
          f"(runs {', '.join(f'{c.seconds:.2f}' for c in chroots)})")  # fmt: skip
    ratios = {}
    for name, runs in ambers.items():
        ratios[name] = med(a.seconds / c.seconds for c, a in zip(chroots, runs, strict=True))
        print(f"amber cold {name:<8} median {med(a.seconds for a in runs):.2f} s  "
              f"ratio {ratios[name]:.3f}  (target <= 1.05)")  # fmt: skip
    for name, runs in ambers.items():
        breakdown(chroots, runs, name)
    print()
    if host_cold:
        print(f"amber cold host     median {med(host_cold):.2f} s (host toolchain: not comparable)")
    for name, runs in (("rootfs", cached_rootfs), ("host", cached_host)):
        print(f"amber cached {name:<6} median {med(runs):.3f} s  min {min(runs):.3f} s")
    print(f"amber --version     median {med(client):.3f} s  beside python -S -c pass "
          f"{med(python):.3f} s")  # fmt: skip
    if podman is not None:
        print(f"podman build cold   {podman:.2f} s   ratio {podman / chroot_med:.3f}")
    else:
        print("podman build        skipped (--no-podman, no podman, or it failed)")
    if args.concurrent:
        print(f"{args.concurrent} concurrent builds {wall:.1f} s; amberd peak RSS "
              f"{rss / 2**20:.0f} MiB (target < 300 MiB)")  # fmt: skip
    baseline = [c.seconds for c in chroots]
    session.ratio("cold_ratio", ratios["amber"], "chroot baseline", baseline)
    if "compare" in ratios:
        session.ratio("cold_ratio_compare", ratios["compare"], "chroot baseline", baseline)
    session.result("cached_seconds_rootfs", med(cached_rootfs))
    session.result("cached_seconds_host", med(cached_host))
    session.result("client_start_seconds", med(client))
    session.result("python_start_seconds", med(python))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="cold pairs (default 5)")
    parser.add_argument("--cached-runs", type=int, default=10,
                        help="cached rebuilds per base and client starts (default 10)")  # fmt: skip
    parser.add_argument("--concurrent", type=int, default=20,
                        help="builds at once for the memory figure (default 20; 0 skips)")  # fmt: skip
    parser.add_argument("--host-runs", type=int, default=0,
                        help="cold builds on the host base too, printed alone (default 0)")  # fmt: skip
    parser.add_argument("--no-podman", action="store_true", help="skip the podman build")
    parser.add_argument("--no-fuse-trace", action="store_true", help="no FUSE tracepoints")
    parser.add_argument("--edit", action="store_true",
                        help="a source edited before every cold build (edit-and-rebuild)")  # fmt: skip
    parser.add_argument("--compare", action="append", default=[], metavar="VAR=VALUE",
                        help="a second amberd with VAR=VALUE in its environment, in every pair")  # fmt: skip
    args = parser.parse_args()
    if args.runs < 1 or args.cached_runs < 1:
        parser.error("--runs and --cached-runs must be at least 1")
    if any("=" not in c for c in args.compare):
        parser.error("--compare takes VAR=VALUE")
    return args


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("pipeline.py: run as root (chroot, amberd)")
    tarball = source_tarball("zlib")
    rootfs = buildd_rootfs()
    root = Path(tempfile.mkdtemp(prefix="amber-bench-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    daemons = {"amber": Daemon(root / "a", jobs=4)}
    if args.compare:
        env = dict(c.split("=", 1) for c in args.compare)
        print(f"compare: a second amberd with {' '.join(args.compare)}")
        daemons["compare"] = Daemon(root / "b", jobs=4, extra_env=env)
    with Session("pipeline.py") as session:
        try:
            for daemon in daemons.values():
                daemon.root.mkdir(mode=0o755)
                daemon.start()
            measure(session, Bench(args, root, tarball, rootfs, daemons))
        finally:
            for daemon in daemons.values():
                if daemon.process is not None:
                    daemon.stop()
            cleanup_root(root)
    session.finish()


if __name__ == "__main__":
    main()
