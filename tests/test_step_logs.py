"""Step logs of any size reach the user whole, without amberd holding them in memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from amberd_process import Daemon

BIN = Path(sys.executable).parent
MIB = 1 << 20
BIG = 40 * MIB
#: A line of 32 bytes, repeated: 40 MiB of it is what the step prints.
LINE = "0123456789abcdef0123456789abcde"


def big_spec(directory: Path, name: str, run: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(
        f'[build]\nname = "{name}"\nbase = "host"\n[[step]]\nname = "loud"\nrun = "{run}"\n'
    )
    return path


def expected(size: int) -> bytes:
    out = subprocess.run(
        ["sh", "-c", f"yes {LINE} | head -c {size}"], capture_output=True, check=True
    )
    return out.stdout


def peak_rss(pid: int) -> int:
    """The daemon's high-water resident memory, from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_a_40_mib_log_reaches_amber_log_whole_and_a_replay_shows_its_end(amberd: Daemon):
    spec = big_spec(amberd.root / "big", "big", f"yes {LINE} | head -c {BIG}")
    code, report = amberd.build_json(spec)
    assert code == 0 and report["status"] == "success", report
    shown = amberd.amber("log", report["build"], "--step", "loud")
    assert shown.returncode == 0, shown.stderr
    assert hashlib.sha256(shown.stdout).hexdigest() == hashlib.sha256(expected(BIG)).hexdigest()

    failing = big_spec(
        amberd.root / "bigfail", "bigfail", f"yes {LINE} | head -c {BIG}; echo THE-END; exit 3"
    )
    first = amberd.amber("build", str(failing))
    assert first.returncode != 0
    replay = amberd.amber("build", str(failing))
    assert replay.returncode != 0, replay.stderr
    assert b"step loud: cached failure (exit 3)" in replay.stdout
    assert b"loud | THE-END\n" in replay.stdout
    assert len(replay.stdout) >= BIG  # the whole log was replayed, not only its last frame

    # amberd streamed 160 MiB of log (two builds, a log, a replay) and never held it
    assert amberd.process is not None
    assert peak_rss(amberd.process.pid) < 200 * MIB


def test_the_step_log_cap_truncates_with_a_note(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text('step-log-max = "1M"\n')
    amberd = Daemon(daemon_root).start("--config", str(config))
    try:
        spec = big_spec(daemon_root / "capped", "capped", f"yes {LINE} | head -c {3 * MIB}")
        code, report = amberd.build_json(spec)
        assert code == 0 and report["status"] == "success", report
        shown = amberd.amber("log", report["build"], "--step", "loud").stdout
        kept, note = shown[:MIB], shown[MIB:]
        assert kept == expected(MIB)
        assert note == f"\n[amber: log truncated at {MIB} bytes]\n".encode()
        notes = amberd.amber("log", report["build"]).stdout
        assert b"log truncated at 1048576 bytes (step-log-max)" in notes
        shown_json = json.loads(amberd.amber("show", report["build"], "--json").stdout)
        assert shown_json["status"] == "success"
    finally:
        assert amberd.stop() == 0


HUGE = 200 * MIB


def process_running(argv: list[str]) -> int | None:
    """The pid of a process (in any pid namespace) whose command line is ``argv``."""
    wanted = "\0".join(argv).encode() + b"\0"
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "cmdline").read_bytes() == wanted:
                    return int(entry.name)
            except OSError:  # ended meanwhile
                continue
    return None


def test_a_follower_attaching_mid_step_gets_the_whole_log_and_amberd_holds_none_of_it(
    amberd: Daemon,
):
    """``amber log -f`` started after a step printed 200 MiB, while it still runs, shows
    all of it; amberd streams it from the log file, so its memory does not grow by it."""
    # The step holds in a sleep of its own after printing, until the test ends it.
    hold = ["sleep", f"{3000 + os.getpid() % 1000}.5"]
    spec = big_spec(amberd.root / "late", "late", f"yes {LINE} | head -c {HUGE}; "
                    f"{' '.join(hold)} || echo released; echo THE-END")  # fmt: skip
    assert amberd.process is not None
    before = peak_rss(amberd.process.pid)
    started = amberd.amber("build", "--detach", "--json", str(spec))
    assert started.returncode == 0, started.stderr
    build = json.loads(started.stdout)["build"]
    deadline = time.monotonic() + 300
    while (sleeper := process_running(hold)) is None:  # then all 200 MiB are printed
        assert time.monotonic() < deadline, amberd.log.read_text()[-2000:]
        time.sleep(0.05)
    follow = subprocess.Popen(
        [str(BIN / "amber"), "log", "-f", build], stdout=subprocess.PIPE, env=amberd.env
    )
    # Should the follower never print, the step still ends (and the test fails).
    unstick = threading.Timer(300, os.kill, (sleeper, signal.SIGTERM))
    unstick.start()
    try:
        assert follow.stdout is not None
        header = follow.stdout.readline()  # attached: the replay has begun
        assert header == b"==> step loud <==\n", header
    finally:
        unstick.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.kill(sleeper, signal.SIGTERM)  # the step goes on
    shown = follow.stdout.read()
    assert follow.wait(120) == 0
    assert len(shown) >= HUGE
    assert hashlib.sha256(shown[:HUGE]).digest() == hashlib.sha256(expected(HUGE)).digest()
    assert b"released\nTHE-END\n" in shown[HUGE:], shown[HUGE : HUGE + 200]  # the step went on
    assert peak_rss(amberd.process.pid) - before < 100 * MIB
