#!/usr/bin/env python3
"""Benchmark: a step cache shared through a registry, against local hits, skopeo and no remote.

    python scripts/bench/remote.py [--runs N] [--cached-runs N]

All in one run, on a private docker-registry on loopback and private amberd
hosts (own state directories and keys; B trusts A), with the zlib build of
pipeline.py (extract, configure, make -j2; the ``host`` base and the zlib
tarball of the test cache, so no network is needed):

1. cached: host A's fully cached rebuild (local hits) beside host B's build
   of the same spec with an empty store, every step a remote hit (a fresh B
   each round, warmed up by a build of another spec, not timed), end to end,
   alternating. ``RESULT remote_cached_ratio`` (B / A, target <= 2) and
   ``remote_cached_seconds`` (B's median, target <= 0.2 s).
2. pull: ``amber pull KEY`` of the make step's result and closure (on the
   buildd rootfs imported as an image, or ``--pull-base host``) into an
   empty store (a fresh B each round) beside ``skopeo copy docker://... dir:``
   of the same state exported as an image (``amber export --push``),
   alternating. ``RESULT pull_vs_skopeo`` (target <= 1). ``--baseline BIN``
   (another venv's bin, e.g. of main): its amber pulls too, first in every
   other round, ``RESULT pull_baseline_vs_skopeo``: old and new on the same
   machine state (file creation on this ext4 slows for minutes after many
   deletes, so runs minutes apart do not compare).
3. cold: A's cold build (a fresh key salt) with the remote on (lookups on
   each miss, results pushed in the background) beside ``--no-remote``,
   ``--runs`` pairs (default 5), alternating which goes first, the queue
   drained between builds (untimed). ``RESULT push_on_cold_ratio``, the
   median of the pairs' ratios (target <= 1.03). In a fleet the registry is
   another machine; here it shares the CPUs, so by default its threads are
   put at SCHED_IDLE to model that (printed; ``--registry-shares-cpu``
   leaves it at normal priority, also printed). The load of a shared
   machine decides wall times more than pushing does, so CPU is measured
   too: ``RESULT push_cpu_seconds`` (amberd's CPU with pushing on less off,
   median) and ``registry_cpu_seconds`` (the registry's, receiving).
4. bytes: a build with one more step writing one small file, pushed; then
   the same build with that file's content changed: ``RESULT
   second_result_bytes``, what the second push uploaded (target: that file
   plus metadata), beside the first result's bytes.
5. status: ``amber status`` ``--runs`` times while amberd pushes a
   4,000-file result, beside as many after the push, both with one CPU hog
   more than there are CPUs, so that the idle-priority pusher is preempted
   all the time. ``RESULT status_during_push_ratio`` (target <= 1.05; the
   pusher as a thread of amberd's gave 1.13: preempted holding the GIL).

Ratios are refused (NORESULT, exit 3) when the baseline's runs spread by
more than 25 % (common.py); run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from amberd_process import BIN, Daemon, cleanup_root  # noqa: E402
from common import Session  # noqa: E402
from conftest import serve_registry  # noqa: E402
from pipeline import ROOTFS_IMAGE, buildd_rootfs, run_checked, spec_text  # noqa: E402
from sources import source_tarball  # noqa: E402
from test_remote import public  # noqa: E402
from test_remote_idle import pusher  # noqa: E402
from test_remote_share import host  # noqa: E402

WARM_UP = '[build]\nname = "warm-up"\nbase = "host"\n\n[[step]]\nname = "w"\nrun = "true"\n'
MARK = '\n[[step]]\nname = "mark"\nrun = "echo {0} > marker"\n'


class Bench:
    """The registry, host A, the spec directory, and fresh B hosts on demand."""

    def __init__(self, root: Path, registry: str, tarball: Path):
        self.root = root
        self.trunk = f"http://{registry}/amber/trunk"
        self.registry = registry
        self.registry_config = root / "registry" / "registry.yml"
        self.specs = root / "specs"
        self.specs.mkdir()
        os.link(tarball, self.specs / "zlib.tar.bz2")
        self.a = host(root, "ci-a", [(self.trunk, True)])
        self.b_count = 0

    def spec(self, name: str, text: str) -> Path:
        path = self.specs / f"{name}.toml"
        path.write_text(text)
        return path

    def fresh_b(self, bin_dir: Path = BIN) -> Daemon:
        """An empty host B, trusting A, its host base already fingerprinted (``bin_dir``:
        another venv's amber, the baseline's)."""
        self.b_count += 1
        b = host(self.root, f"ci-b{self.b_count}", [(self.trunk, False)], sign=False,
                 trusted={"ci-a": public(self.a)}, bin_dir=bin_dir)  # fmt: skip
        run_checked(b, "build", "--no-remote", str(self.spec("warm-up", WARM_UP)))
        return b

    def drop(self, b: Daemon) -> None:
        """Stop ``b``; its files go with the bench's root at the end, not now.

        Deleting a store of 13,000 files between rounds made the next round
        pay for it: on ext4 without a journal (this machine's) an inode freed
        in the last minutes is skipped, one by one, by every file created in
        its block group afterwards, so a round after a delete ran 3x slower.
        """
        b.stop()

    def tags(self) -> int:
        try:
            url = f"http://{self.registry}/v2/amber/trunk/tags/list"
            with urllib.request.urlopen(url) as r:
                return len(json.load(r).get("tags") or [])
        except OSError:
            return 0

    def wait_tags(self, count: int) -> None:
        deadline = time.monotonic() + 600
        while self.tags() < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"the push queue did not reach {count} results")
            time.sleep(0.1)


def timed_amber(daemon: Daemon, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    proc = daemon.amber(*args)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(
            f"amber {' '.join(args)} failed:\n{proc.stdout.decode()}{proc.stderr.decode()}"
        )
    return elapsed, proc.stdout.decode()


def build_id(daemon: Daemon, spec: Path, *extra: str) -> str:
    code, report = daemon.build_json(spec, *extra)
    if code != 0:
        raise SystemExit(f"build of {spec} failed: {report}")
    return report["build"]


def cached(bench: Bench, session: Session, runs: int) -> None:
    spec = bench.spec("cached", spec_text(f"cached-{uuid.uuid4()}"))
    build_id(bench.a, spec)
    bench.wait_tags(3)
    local, remote = [], []
    for i in range(runs):
        b = bench.fresh_b()
        local.append(timed_amber(bench.a, "build", str(spec))[0])
        seconds, out = timed_amber(b, "build", "--json", str(spec))
        remote.append(seconds)
        bench.drop(b)
        statuses = [s["status"] for s in json.loads(out)["steps"]]
        if statuses != ["cached"] * 3:
            raise SystemExit(f"B's build was not all remote hits: {statuses}")
        print(f"round {i + 1}: A local cached {local[-1]:.3f} s, B from the remote {seconds:.3f} s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    med = statistics.median
    print(
        f"cached: A local median {med(local):.3f} s, B remote median {med(remote):.3f} s "
        "(targets: ratio <= 2, B <= 0.2 s)"
    )
    session.ratio(
        "remote_cached_ratio",
        med(r / a for a, r in zip(local, remote, strict=True)),
        "local cached build",
        local,
    )
    session.result("remote_cached_seconds", med(remote))


def pull_vs_skopeo(
    bench: Bench, session: Session, runs: int, base: str, baseline: Path | None
) -> None:
    """On the buildd rootfs (``--pull-base rootfs``, the issue's case) the closure is
    the whole rootfs and throughput decides; on ``host`` it is 4 MB and start-up does.
    ``baseline``: another venv's bin directory, whose amber pulls too in each round
    (first in odd rounds, second in even ones), ``RESULT pull_baseline_vs_skopeo``."""
    if base == "rootfs":
        run_checked(bench.a, "image", "import", ROOTFS_IMAGE, f"dir:{buildd_rootfs()}")
        base = ROOTFS_IMAGE
    spec = bench.spec("pull", spec_text(f"pull-{uuid.uuid4()}", base))
    build = build_id(bench.a, spec, "--no-remote")
    run_checked(bench.a, "push", build)
    shown = json.loads(bench.a.amber("show", "--json", build).stdout)
    key = shown["steps"][-1]["key"]
    ref = f"{bench.registry}/amber/zlib-export:bench"
    run_checked(bench.a, "export", build, "--push", ref, "--insecure")
    amber, old, skopeo = [], [], []
    for i in range(runs):
        said = {}
        # Alternating which goes first: the second finds the disk as the first left it.
        for which in (["old", "new"] if i % 2 == 0 else ["new", "old"]) if baseline else ["new"]:
            seconds, said[which] = timed_pull(bench, key, BIN if which == "new" else baseline)
            (amber if which == "new" else old).append(seconds)
        target = Path(tempfile.mkdtemp(dir=bench.root))  # kept until the end, as B's stores
        children = children_cpu()
        started = time.perf_counter()
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                        f"dir:{target}"], check=True)  # fmt: skip
        skopeo.append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in target.iterdir())
        before = f"baseline amber pull {said['old']}; " if old else ""
        print(f"round {i + 1}: {before}amber pull {said['new']}; skopeo copy {skopeo[-1]:.3f} s "
              f"(CPU {children_cpu() - children:.2f} s; {size} bytes) "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    med = statistics.median
    print(f"pull: amber median {med(amber):.3f} s, skopeo median {med(skopeo):.3f} s (target <= 1)")
    session.ratio(
        "pull_vs_skopeo",
        med(a / s for a, s in zip(amber, skopeo, strict=True)),
        "skopeo copy",
        skopeo,
    )
    if old:
        print(f"pull: baseline ({baseline}) amber median {med(old):.3f} s")
        session.ratio("pull_baseline_vs_skopeo",
                      med(a / s for a, s in zip(old, skopeo, strict=True)), "skopeo copy",
                      skopeo)  # fmt: skip


def timed_pull(bench: Bench, key: str, bin_dir: Path) -> tuple[float, str]:
    """``amber pull KEY`` into a fresh B of ``bin_dir``'s amber: seconds, and what it said."""
    b = bench.fresh_b(bin_dir)
    assert b.process is not None
    cpu = process_cpu(b.process.pid)
    seconds, out = timed_amber(b, "pull", key)
    cpu = process_cpu(b.process.pid) - cpu
    bench.drop(b)
    return seconds, f"{seconds:.3f} s (amberd CPU {cpu:.2f} s; {out.strip()})"


def process_cpu(pid: int, stat: Path | None = None) -> float:
    """A process's CPU seconds so far, all its threads (or the one task of ``stat``)."""
    with open(stat or f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of the finished child processes so far (skopeo's)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def with_pusher(pid: int) -> list[int]:
    """amberd ``pid`` and its push process (``amber-push``, a child: its CPU is pushing's)."""
    return [pid, pusher(pid)]


def cpu_of(pids: list[int]) -> float:
    return sum(process_cpu(pid) for pid in pids)


def registry_pids(config: Path) -> list[int]:
    """The docker-registry process serving ``config`` (this bench's own)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and str(config).encode() in argv and b"serve" in argv:
            found.append(int(proc.name))
    return found


def lower_registry(config: Path) -> str:
    """Every thread of the bench's registry at SCHED_IDLE (new ones inherit it): what
    the build on this machine would see if the registry were another machine."""
    pids = registry_pids(config)
    if not pids:
        raise SystemExit(f"no docker-registry process serving {config}")
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))
    return f"docker-registry (pid {', '.join(map(str, pids))}) lowered to SCHED_IDLE"


def cold(bench: Bench, session: Session, runs: int, registry_note: str) -> None:
    print(f"cold: the registry runs on this machine's {os.cpu_count()} CPUs: {registry_note}",
          flush=True)  # fmt: skip
    assert bench.a.process is not None
    amberd, registry = with_pusher(bench.a.process.pid), registry_pids(bench.registry_config)
    on, off, cpu, reg = [], [], {"on": [], "off": []}, {"on": [], "off": []}
    for i in range(runs):
        pushed = bench.tags()
        spec_off = bench.spec("cold-off", spec_text(f"cold-off-{uuid.uuid4()}"))
        spec_on = bench.spec("cold-on", spec_text(f"cold-on-{uuid.uuid4()}"))
        pair = [("off", spec_off, ("--no-remote",)), ("on", spec_on, ())]
        for what, spec, extra in pair if i % 2 == 0 else pair[::-1]:
            before, reg_before = cpu_of(amberd), cpu_of(registry)
            seconds = timed_amber(bench.a, "build", *extra, str(spec))[0]
            if what == "on":
                bench.wait_tags(pushed + 3)  # the queue drained: its CPU is counted
            cpu[what].append(cpu_of(amberd) - before)
            reg[what].append(cpu_of(registry) - reg_before)
            (off if what == "off" else on).append(seconds)
        print(f"pair {i + 1}: remote off {off[-1]:.2f} s, on {on[-1]:.2f} s, ratio "
              f"{on[-1] / off[-1]:.3f}; amberd CPU off {cpu['off'][-1]:.2f} s, on (pushes "
              f"included) {cpu['on'][-1]:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    med = statistics.median
    ratio = med(n / f for n, f in zip(on, off, strict=True))
    print(
        f"cold: off median {med(off):.2f} s, on median {med(on):.2f} s, median of the "
        f"{runs} pairs' ratios {ratio:.3f} (target <= 1.03); {registry_note}"
    )
    session.ratio("push_on_cold_ratio", ratio, "cold build without the remote", off)
    # CPU, unlike wall time, does not depend on the neighbours: what pushing costs the machine.
    push_cpu = med(n - f for n, f in zip(cpu["on"], cpu["off"], strict=True))
    reg_cpu = med(reg["on"])
    print(f"cold: pushing cost amberd {push_cpu:.2f} s CPU per build (median; in its idle-priority "
          f"push process), {100 * push_cpu / med(off):.1f} % of the build's wall time; the registry "
          f"took {reg_cpu:.2f} s CPU receiving it ({registry_note})")  # fmt: skip
    session.result("push_cpu_seconds", push_cpu)
    session.result("registry_cpu_seconds", reg_cpu)


#: A step of 4,000 small files (a fresh salt each time: a result to push).
MANY = (
    '[build]\nname = "many"\nbase = "host"\n\n[[step]]\nname = "many"\nrun = '
    '"mkdir m && for i in $(seq 1 4000); do echo {salt} $i > m/$i; done"\n'
)


def loop_quiet(pid: int, limit: float = 60) -> None:
    """Wait until amberd's main thread (its trio loop) has run under 20 ms in a second."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = process_cpu(pid, stat)
        time.sleep(1)
        if process_cpu(pid, stat) - before < 0.02:
            return


def status_during_push(bench: Bench, session: Session, runs: int) -> None:
    """``amber status`` while amberd pushes a 4,000-file result beside after it, both with
    one CPU hog more than there are CPUs (so the idle-priority pusher is preempted)."""
    hogs = []

    def hog(on: bool) -> None:
        for p in hogs:
            p.kill()
            p.wait()
        hogs[:] = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range((os.cpu_count() or 1) + 1) if on]  # fmt: skip

    pushed, during, after = bench.tags(), [], []
    try:
        hog(True)
        build_id(bench.a, bench.spec("many", MANY.format(salt=uuid.uuid4())))
        assert bench.a.process is not None
        loop_quiet(bench.a.process.pid)  # the build's own work done: only the push is left
        for _ in range(runs):
            during.append(timed_amber(bench.a, "status")[0])
        still = bench.tags() == pushed  # the push was on throughout
        hog(False)
        bench.wait_tags(pushed + 1)
        hog(True)
        for _ in range(runs):
            after.append(timed_amber(bench.a, "status")[0])
    finally:
        hog(False)
    med = statistics.median
    print(f"status: during the push {min(during):.3f}-{max(during):.3f} s (median "
          f"{med(during):.3f}), after {min(after):.3f}-{max(after):.3f} s (median "
          f"{med(after):.3f}); the push {'lasted' if still else 'ended before the end of'} the "
          f"runs; load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    if not still:
        session.refuse("status_during_push_ratio", "the push ended while status was timed")
        return
    session.ratio("status_during_push_ratio", med(during) / med(after), "status after", after)


def second_result(bench: Bench, session: Session) -> None:
    salt = f"bytes-{uuid.uuid4()}"
    sent = []
    for content in ("first", "second"):
        spec = bench.spec(f"bytes-{content}", spec_text(salt) + MARK.format(content))
        build = build_id(bench.a, spec, "--no-remote")
        _, out = timed_amber(bench.a, "push", "--json", build)
        summary = json.loads(out)
        sent.append(summary["bytes"])
        print(f"{content} result: pushed {summary['pushed']}, present {summary['present']}, "
              f"{summary['bytes']} bytes uploaded, blobs {summary['blobs']}", flush=True)  # fmt: skip
    print(
        f"the second result differs by one {len('second') + 1}-byte file: it uploaded "
        f"{sent[1]} bytes (the first build's four results: {sent[0]} bytes)"
    )
    session.result("second_result_bytes", sent[1], digits=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="cold pairs (default 5)")
    parser.add_argument("--registry-shares-cpu", action="store_true",
                        help="leave the local docker-registry at normal priority in the cold "
                        "part (default: SCHED_IDLE, modelling a registry on another machine)")  # fmt: skip
    parser.add_argument("--cached-runs", type=int, default=5,
                        help="rounds of the cached and pull comparisons (default 5)")  # fmt: skip
    parser.add_argument("--only", metavar="PARTS", default="cached,pull,cold,bytes,status",
                        help="comma-separated parts to run (default: all: "
                        "cached,pull,cold,bytes,status)")  # fmt: skip
    parser.add_argument("--pull-base", choices=("rootfs", "host"), default="rootfs",
                        help="the base of the pulled build (default rootfs: the buildd rootfs "
                        "as an image, made by scripts/make-rootfs)")  # fmt: skip
    parser.add_argument("--baseline", type=Path, metavar="BIN",
                        help="another install's bin directory (a venv of the old amber): its "
                        "amber pulls beside this one in each pull round")  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    if args.runs < 2 or args.cached_runs < 2:
        raise SystemExit("remote.py: --runs and --cached-runs must be at least 2 (a spread)")
    if shutil.which("skopeo") is None or shutil.which("docker-registry") is None:
        raise SystemExit("remote.py needs skopeo and docker-registry (apt-get install them)")
    tarball = source_tarball("zlib")
    root = Path(tempfile.mkdtemp(prefix="amber-bench-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    with Session("remote.py") as session:
        try:
            (root / "registry").mkdir()
            with serve_registry(root / "registry") as registry:
                bench = Bench(root, registry, tarball)
                note = "docker-registry at normal priority, sharing them (--registry-shares-cpu)"
                parts = {"cached": lambda: cached(bench, session, args.cached_runs),
                         "pull": lambda: pull_vs_skopeo(bench, session, args.cached_runs,
                                                        args.pull_base, args.baseline),
                         "cold": lambda: cold(bench, session, args.runs, note),
                         "status": lambda: status_during_push(bench, session, args.runs),
                         "bytes": lambda: second_result(bench, session)}  # fmt: skip
                for part in args.only.split(","):
                    if part == "cold" and not args.registry_shares_cpu:
                        note = lower_registry(bench.registry_config)
                    parts[part]()
                bench.a.stop()
        finally:
            cleanup_root(root)
    session.finish()


if __name__ == "__main__":
    main()
