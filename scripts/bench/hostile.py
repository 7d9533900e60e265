#!/usr/bin/env python3
"""Benchmark: amberd under a hostile member of the amber group (issue 12).

    python scripts/bench/hostile.py [--frames 10000] [--idle 200] [--builds 5]

1. ``--builds`` builds at once (a CPU-bound shell loop on the ``host``
   base, fresh key salts so nothing is cached), alone: their wall time;
2. the same builds again (new salts) while, as other uids, ``--idle``
   connections say hello and then nothing (uid 4242) and ``--frames``
   hostile frames arrive from ``--workers`` processes (uids 4243...):
   oversized and lying lengths, empty maps by the million, deep nesting,
   huge map and string headers, invalid msgpack, descriptors in the middle
   of a frame, requests without a hello (tests/hostile.py, ``storm``).

Prints the attacks amberd refused (an error reply or a hang-up; never a
success, never a hang), amberd's peak memory (VmHWM of the daemon process)
and how much slower the builds were under attack: the builds run alone
before and after the attack, and ``slowdown_ratio`` is the attacked run over
their median, refused (NORESULT, exit 3) when the two runs alone spread by
more than 25 % (common.py, which also prints the load before and after).
The last lines are ``RESULT hostile_survived N/N``, ``RESULT peak_rss_mib M``
(target: under 300) and ``RESULT slowdown_ratio R``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from amberd_process import Daemon, cleanup_root, make_root  # noqa: E402
from common import Session  # noqa: E402

HOSTILE = REPO / "tests" / "hostile.py"
LOOP = "i=0; while [ $i -lt {n} ]; do i=$((i+1)); done"


def spec_text(salt: str, loops: int) -> str:
    return (
        f'[build]\nname = "hostile-bench"\nbase = "host"\nkey_salt = "{salt}"\n\n'
        f'[[step]]\nname = "spin"\nrun = "{LOOP.format(n=loops)}"\n'
    )


def run_builds(d: Daemon, count: int, loops: int) -> float:
    """``count`` builds at once; the wall time until the last one ends."""
    specs = []
    for i in range(count):
        spec = d.root / f"spec-{uuid.uuid4().hex[:8]}-{i}.toml"
        spec.write_text(spec_text(uuid.uuid4().hex, loops))
        specs.append(spec)
    codes: list[int] = []

    def one(spec: Path) -> None:
        codes.append(d.amber("build", "--json", str(spec)).returncode)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - started
    if codes != [0] * count:
        raise SystemExit(f"builds failed: exit codes {codes}")
    return took


def as_uid(uid: int, *args: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *args]


def peak_rss(d: Daemon) -> int:
    for line in Path(f"/proc/{d.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def under_attack(d: Daemon, ns: argparse.Namespace) -> tuple[float, int, str]:
    """The builds' wall time while attacked; attacks refused; what the idle clients saw."""
    hostile = [sys.executable, str(HOSTILE), str(d.socket)]
    idle = subprocess.Popen(
        as_uid(4242, *hostile, "idle", str(ns.idle)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    held = idle.stdout.readline().strip()
    per_worker = ns.frames // ns.workers
    storms = [
        subprocess.Popen(
            as_uid(4243 + i, *hostile, "storm", str(per_worker)), stdout=subprocess.PIPE, text=True
        )
        for i in range(ns.workers)
    ]
    took = run_builds(d, ns.builds, ns.loops)
    survived = 0
    for proc in storms:
        out, _ = proc.communicate()
        survived += int(out.split()[1]) if out.startswith("survived") else 0
    idle.stdin.close()
    idle.wait()
    return took, survived, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--builds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loops", type=int, default=1_000_000, help="shell loop per build")
    ns = parser.parse_args()
    ns.frames -= ns.frames % ns.workers

    root = make_root()
    config = root / "amberd.toml"
    config.write_text("socket-mode = 0o666\n")  # the attackers are other uids
    session = Session("hostile.py").begin()
    d = Daemon(root, jobs=ns.builds).start("--config", str(config))
    try:
        alone = [run_builds(d, ns.builds, ns.loops)]
        print(f"{ns.builds} builds alone: {alone[0]:.2f}s", flush=True)
        attacked, survived, held = under_attack(d, ns)
        print(f"{ns.builds} builds under attack: {attacked:.2f}s", flush=True)
        print(f"{ns.idle} idle connections of uid 4242: {held}")
        alive = d.amber("status").returncode == 0 and d.process.poll() is None
        print(f"amberd answers afterwards: {alive}")
        alone.append(run_builds(d, ns.builds, ns.loops))
        print(f"{ns.builds} builds alone again: {alone[1]:.2f}s", flush=True)
        rss = peak_rss(d)
    finally:
        d.stop()
        cleanup_root(root)
    session.end()
    print(f"RESULT hostile_survived {survived if alive else 0}/{ns.frames}", flush=True)
    session.result("peak_rss_mib", rss / (1 << 20), 0)
    session.ratio("slowdown_ratio", attacked / statistics.median(alone), "builds alone", alone)
    session.finish()


if __name__ == "__main__":
    main()
