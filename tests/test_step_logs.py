"""Step logs of any size reach the user whole, without amberd holding them in memory."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from amberd_process import Daemon

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
