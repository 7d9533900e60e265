"""A hostile member of the amber group against the real amberd (issue 12 #8).

Each attack runs as uid 4242 (tests/hostile.py under setpriv) and is judged
by what the victim sees: amberd's peak memory (VmHWM), its open descriptors
(/proc/PID/fd), whether it hangs up, and whether other users are served.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon

HOSTILE = Path(__file__).with_name("hostile.py")
PEAK_RSS_BOUND = 300 << 20


def as_uid(uid: int, *args: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *args]


def hostile(d: Daemon, *args: str) -> subprocess.Popen:
    """tests/hostile.py as uid 4242, its output readable line by line."""
    cmd = as_uid(4242, sys.executable, str(HOSTILE), str(d.socket), *args)
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)


def line_of(proc: subprocess.Popen, guard: float = 60) -> str:
    """The attacker's next line; the guard only keeps a broken daemon from hanging the suite."""
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], guard)
        assert ready, f"the attacker is still waiting for amberd (said {line!r})"
        byte = os.read(proc.stdout.fileno(), 1)
        assert byte, f"the attacker ended (said {line!r})"
        line += byte
    return line.decode().strip()


def status(d: Daemon, key: str) -> int:
    for line in Path(f"/proc/{d.process.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for amberd")


def open_fds(d: Daemon) -> int:
    return len(os.listdir(f"/proc/{d.process.pid}/fd"))


@pytest.fixture
def daemon(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text('socket-mode = 0o666\nmax-connections-per-uid = 20\nhello-timeout = "1s"\n')
    d = Daemon(daemon_root).start("--config", str(config))
    yield d
    assert d.stop() == 0


def test_huge_frames_get_an_error_or_a_hang_up_and_memory_stays_bounded(daemon: Daemon):
    proc = hostile(daemon, "frames", "3")
    out, _ = proc.communicate(timeout=600)
    results = dict(line.split(" ", 1) for line in out.decode().splitlines())
    from hostile import FRAMES

    assert set(results) == set(FRAMES)
    for name, outcomes in results.items():
        for outcome in outcomes.split(","):
            assert outcome == "closed" or outcome.startswith("replied "), (name, outcome)
            assert outcome != "replied ok", name
    assert status(daemon, "VmHWM") < PEAK_RSS_BOUND
    assert daemon.amber("status").returncode == 0


def test_idle_connections_of_one_uid_are_capped_and_others_are_served(daemon: Daemon):
    proc = hostile(daemon, "idle", "200")
    try:
        held = line_of(proc)
        assert held == "accepted 20 refused 180"
        other = subprocess.run(
            as_uid(4243, str(BIN / "amber"), "status"),
            capture_output=True,
            env=dict(daemon.env, HOME="/tmp"),
            timeout=60,
        )
        assert other.returncode == 0, other.stderr
        assert daemon.amber("status").returncode == 0
        refused = subprocess.run(
            as_uid(4242, str(BIN / "amber"), "status"),
            capture_output=True,
            env=dict(daemon.env, HOME="/tmp"),
            timeout=60,
        )
        assert refused.returncode != 0
        assert b"max-connections-per-uid" in refused.stderr, refused.stderr
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    # The slots come back when the connections close.
    again = subprocess.run(
        as_uid(4242, str(BIN / "amber"), "status"), env=dict(daemon.env, HOME="/tmp"),
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("mode", ["fds", "fds-stall"])
def test_descriptors_sent_with_a_partial_frame_are_closed(daemon: Daemon, mode: str):
    before = open_fds(daemon)
    proc = hostile(daemon, mode)
    try:
        assert line_of(proc) == "sent"
        assert line_of(proc) == "closed"  # amberd hung up: mid-frame fds, or the stall
        assert open_fds(daemon) <= before + 2
    finally:
        proc.kill()
        proc.wait()


def test_descriptors_passed_to_an_operation_that_takes_none_are_refused(daemon: Daemon):
    """Closed at once, not held for as long as the request (a build: hours) runs."""
    before = open_fds(daemon)
    proc = hostile(daemon, "fds-unasked")
    try:
        assert line_of(proc) == "replied bad-args"
        assert open_fds(daemon) <= before + 1  # the connection, still open
    finally:
        proc.kill()
        proc.wait()


def test_a_connection_that_sends_no_hello_is_closed(daemon: Daemon):
    proc = hostile(daemon, "silent")
    try:
        assert line_of(proc) == "closed timeout"
    finally:
        proc.kill()
        proc.wait()
    assert daemon.amber("status").returncode == 0


FAILING = """
[build]
name = "stuck-stderr"
base = "host"

[[step]]
name = "fail"
run = "exit 3"
"""


def holders(link: str) -> set[int]:
    """The processes with a descriptor on ``link`` (``pipe:[INODE]``)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                        found.add(int(pid))
                        break
    return found


def full_pipe() -> tuple[int, int]:
    """A pipe filled to capacity: one more byte written to it blocks."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 65536)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x")
    os.set_blocking(w, True)
    return r, w


def test_a_shell_whose_stderr_is_a_full_pipe_does_not_stop_amberd(daemon: Daemon):
    """issue 12 #9: the banner went to fd 2 with a blocking write on amberd's loop."""
    (daemon.root / "spec.toml").write_text(FAILING)
    code, report = daemon.build_json(daemon.root / "spec.toml")
    assert code == 1 and report["frozen"], report
    r, w = full_pipe()
    shell = subprocess.Popen(
        [str(BIN / "amber"), "shell", report["build"]],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w, env=daemon.env,
    )  # fmt: skip
    os.close(w)
    try:
        # Until the shell's own command holds the pipe, amberd is between
        # taking the pipe and running it: the banner. Others are answered.
        pipe = f"pipe:[{os.fstat(r).st_ino}]"
        answered = 0
        while not holders(pipe) - {os.getpid(), daemon.process.pid, shell.pid}:
            assert shell.poll() is None, "amber shell ended"
            other = daemon.amber("status", timeout=60)
            assert other.returncode == 0, other.stderr
            answered += daemon.process.pid in holders(pipe)
        assert answered > 0  # some answers came while amberd held the stuck pipe
    finally:
        drained = threading.Thread(target=lambda: list(iter(lambda: os.read(r, 65536), b"")))
        drained.start()
        shell.kill()
        shell.wait()
        drained.join(timeout=60)
        os.close(r)
