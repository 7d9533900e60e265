#!/usr/bin/env python3
"""Benchmark: how long the `amber` client takes to start, beside Python's own start.

    python scripts/bench/client.py [--runs N] [--amber PATH]

In one run, alternating, a new process each time (as a user types it):

1. ``python -S -c pass`` and ``python -c pass`` with the interpreter amber
   runs on: the floor without and with ``site`` (the venv's .pth files);
2. ``amber --version``: the client's start alone, no daemon involved;
3. ``amber ps`` against a running amberd (connect, hello, one request);
4. ``amber build`` of a fully cached one-step spec on the ``host`` base.

The load average is printed before and after (common.py). RESULT lines
(medians): ``client_version_seconds``, ``client_ps_seconds``,
``client_build_cached_seconds``, and the ratios ``client_version_vs_python``
(``amber --version`` over ``python -c pass``; refused when those runs spread
by more than 25 %) and ``client_version_vs_python_S`` (over ``python -S``).
Target: ``amber --version`` within 0.05 s, about ``python -c pass``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
BIN = Path(sys.executable).parent

from amberd_process import Daemon, cleanup_root  # noqa: E402
from common import Session  # noqa: E402

SPEC = '[build]\nname = "client-bench"\nbase = "host"\n\n[[step]]\nname = "one"\nrun = "true"\n'


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def measure(runs: int, amber: str, daemon: Daemon, spec: Path) -> dict[str, list[float]]:
    """Each command once per round, round after round: seconds per command."""
    python = str(BIN / "python") if (BIN / "python").exists() else sys.executable
    commands = {
        "python -S -c pass": [python, "-S", "-c", "pass"],
        "python -c pass": [python, "-c", "pass"],
        "amber --version": [amber, "--version"],
        "amber ps": [amber, "ps"],
        "amber build (cached)": [amber, "build", str(spec)],
    }
    for cmd in commands.values():  # warm the page cache and the build cache
        timed(cmd, daemon.env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            times[name].append(timed(cmd, daemon.env))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="rounds (default 20)")
    parser.add_argument(
        "--amber",
        default=str(BIN / "amber"),
        help="the amber command to time (default: the one beside this Python; "
        "/usr/local/bin/amber is what scripts/setup installs)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (amberd runs as root)")
    if args.runs < 2:
        raise SystemExit("client.py: --runs must be at least 2")
    root = Path(tempfile.mkdtemp(prefix="amber-bench-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    spec = root / "spec.toml"
    spec.write_text(SPEC)
    daemon = Daemon(root, jobs=2)
    with Session("client.py") as session:
        daemon.start()
        try:
            times = measure(args.runs, args.amber, daemon, spec)
        finally:
            daemon.stop()
            cleanup_root(root)
    med = {name: statistics.median(runs) for name, runs in times.items()}
    print()
    for name, runs in times.items():
        print(f"{name:<22} median {med[name]:.4f} s  min {min(runs):.4f} s  max {max(runs):.4f} s")
    session.result("client_version_seconds", med["amber --version"], 4)
    session.result("client_ps_seconds", med["amber ps"], 4)
    session.result("client_build_cached_seconds", med["amber build (cached)"], 4)
    version = med["amber --version"]
    session.ratio(
        "client_version_vs_python",
        version / med["python -c pass"],
        "python -c pass",
        times["python -c pass"],
    )
    session.ratio(
        "client_version_vs_python_S",
        version / med["python -S -c pass"],
        "python -S -c pass",
        times["python -S -c pass"],
    )
    session.finish()


if __name__ == "__main__":
    main()
