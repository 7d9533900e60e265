"""Per-step memory and pids limits, the timeout bound, and each user's share of the jobs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from amberd_process import BIN, Daemon

OTHER = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", str(BIN / "amber")]


def start(root: Path, config: str, jobs: int = 4) -> Daemon:
    path = root / "amberd.toml"
    path.write_text(config)
    return Daemon(root, jobs=jobs).start("--config", str(path))


def one_step(directory: Path, name: str, run: str, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / f"{name}.toml"
    path.write_text(
        f'[build]\nname = "{name}"\nbase = "host"\n[[step]]\nname = "work"\nrun = "{run}"\n{extra}'
    )
    path.chmod(0o644)
    return path


def test_a_step_past_its_memory_limit_is_errored_and_never_cached(daemon_root: Path):
    d = start(daemon_root, 'step-memory-max = "64M"\n')
    try:
        spec = one_step(
            daemon_root / "hog",
            "hog",
            "python3 -c 'import os; b = os.urandom(1) * (300 << 20)'; echo survived",
        )
        for _ in range(2):  # the second build runs the step again: nothing was cached
            code, report = d.build_json(spec)
            assert code != 0
            assert report["status"] == "errored", report
            assert [s["status"] for s in report["steps"]] == ["errored"]
            assert "OOM killer" in report["error"] and "step-memory-max" in report["error"]
        fits = one_step(
            daemon_root / "fits", "fits", "python3 -c 'import os; b = os.urandom(1) * (8 << 20)'"
        )
        code, report = d.build_json(fits)
        assert code == 0 and report["status"] == "success"
    finally:
        assert d.stop() == 0


def test_a_fork_bomb_is_bounded_by_the_pids_limit(daemon_root: Path):
    d = start(daemon_root, "step-pids-max = 32\n")
    try:
        bomb = "i=0; while [ $i -lt 500 ]; do sleep 60 & i=$((i+1)); done; echo forked them all"
        spec = one_step(daemon_root / "bomb", "bomb", bomb)
        code, report = d.build_json(spec)
        assert code != 0 and report["status"] == "failed", report
        log = d.amber("log", report["build"], "--step", "work").stdout
        assert b"forked them all" not in log
        assert b"fork" in log.lower() or b"resource temporarily unavailable" in log.lower(), log
    finally:
        assert d.stop() == 0


def test_a_timeout_over_the_maximum_is_refused_naming_it(daemon_root: Path):
    d = start(daemon_root, 'step-timeout-max = "1h"\n')
    try:
        spec = one_step(daemon_root / "slow", "slow", "true", extra='timeout = "2h"\n')
        proc = d.amber("build", str(spec))
        assert proc.returncode != 0
        assert b"step-timeout-max" in proc.stderr and b"3600s" in proc.stderr, proc.stderr
        assert b"7200s" in proc.stderr
        listed = json.loads(d.amber("builds", "--json").stdout)["builds"]
        assert listed == []  # refused before anything was queued
    finally:
        assert d.stop() == 0


def ps(d: Daemon) -> list[dict]:
    return json.loads(d.amber("ps", "--json").stdout)["builds"]


def test_one_user_filling_the_queue_cannot_starve_another(daemon_root: Path):
    d = start(daemon_root, "socket-mode = 0o666\n", jobs=2)  # jobs-per-user: 1
    env = dict(d.env, HOME="/tmp")
    try:
        theirs = []
        for i in range(3):
            spec = one_step(daemon_root / f"hold{i}", f"hold{i}", "sleep 60")
            proc = subprocess.run([*OTHER, "build", "--detach", "--json", str(spec)],
                                  capture_output=True, env=env)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            theirs.append(json.loads(proc.stdout)["build"])
        mine = json.loads(d.amber("build", "--detach", "--json",
                                  str(one_step(daemon_root / "mine", "mine", "sleep 60"))).stdout)  # fmt: skip
        deadline = time.monotonic() + 60  # a hang guard, not a bound under test
        while True:
            now = {b["id"]: b["status"] for b in ps(d)}
            if now.get(mine["build"]) == "running" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # the second uid's build runs while the first uid's queue waits
        assert now[mine["build"]] == "running", now
        assert sorted(now[b] for b in theirs) == ["queued", "queued", "running"]
        for build in [*theirs, mine["build"]]:
            assert d.amber("cancel", build).returncode == 0
    finally:
        assert d.stop() == 0
