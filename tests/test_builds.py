"""Builds through the real amberd and the real amber command."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
from amberd_process import BIN, Daemon
from rootfs import make_busybox_root
from sources import source_tarball

from amber.client.protocol import encode_frame

FIVE_STEPS = """
[build]
name = "five"
base = "host"

[[step]]
name = "s1"
run = "echo one > one"
{extra}
[[step]]
name = "s2"
run = "echo two > two"

[[step]]
name = "s3"
run = "{s3}"

[[step]]
name = "s4"
run = "cat one two > four"

[[step]]
name = "s5"
run = "test -f four && ls"
"""


def write_spec(directory: Path, text: str, name: str = "spec.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def statuses(report: dict) -> list[str]:
    return [s["status"] for s in report["steps"]]


def test_rebuild_runs_nothing_and_changing_step_3_reruns_3_to_5(amberd: Daemon):
    spec = write_spec(amberd.root / "five", FIVE_STEPS.format(s3="echo three > three", extra=""))
    code, first = amberd.build_json(spec)
    assert code == 0 and first["status"] == "success"
    assert statuses(first) == ["ran"] * 5

    code, again = amberd.build_json(spec)
    assert code == 0 and statuses(again) == ["cached"] * 5
    assert again["build"] != first["build"]

    write_spec(amberd.root / "five", FIVE_STEPS.format(s3="echo THREE > three", extra=""))
    code, changed = amberd.build_json(spec)
    assert code == 0
    assert statuses(changed) == ["cached", "cached", "ran", "ran", "ran"]


def test_json_reports_the_snapshot_apart_from_the_step(amberd: Daemon):
    """What a step cost in the sandbox and what snapshotting its files cost are two numbers."""
    spec = write_spec(
        amberd.root / "snap", FIVE_STEPS.format(s3="seq 1 300 | xargs touch", extra="")
    )
    code, first = amberd.build_json(spec)
    assert code == 0 and statuses(first) == ["ran"] * 5
    for step in first["steps"]:
        assert isinstance(step["seconds"], float) and isinstance(step["snapshot_seconds"], float)
        assert step["snapshot_seconds"] >= 0  # a step that changed nothing: under 0.5 ms, 0.0
    assert first["steps"][2]["snapshot_seconds"] > 0  # 300 new files to hash and store
    code, again = amberd.build_json(spec)
    assert code == 0 and statuses(again) == ["cached"] * 5
    assert [s["snapshot_seconds"] for s in again["steps"]] == [None] * 5  # nothing snapshotted


def test_real_c_project_on_the_host_base(amberd: Daemon):
    tarball = source_tarball("zlib")
    directory = amberd.root / "zlib"
    directory.mkdir()
    os.link(tarball, directory / "zlib.tar.bz2")
    spec = write_spec(
        directory,
        """
[build]
name = "zlib"
base = "host"
env = { CFLAGS = "-O2" }

[[source]]
path = "zlib.tar.bz2"

[[step]]
name = "extract"
run = "tar xf zlib.tar.bz2"

[[step]]
name = "configure"
run = "cd zlib-* && ./configure"

[[step]]
name = "make"
run = "cd zlib-* && make -j2"

[[step]]
name = "test"
run = "cd zlib-* && make test"
""",
    )
    code, report = amberd.build_json(spec)
    assert code == 0, report
    assert statuses(report) == ["ran"] * 4
    log = amberd.amber("log", report["build"], "--step", "test")
    assert b"*** zlib test OK ***" in log.stdout
    code, again = amberd.build_json(spec)
    assert statuses(again) == ["cached"] * 4


def test_cached_failure_fails_at_once_and_retry_failed_reruns_it(amberd: Daemon):
    spec = write_spec(
        amberd.root / "fail",
        """
[build]
name = "fail"

[[step]]
name = "ok"
run = "echo fine"

[[step]]
name = "broken"
run = "echo 'the compiler said no' >&2; exit 7"

[[step]]
name = "after"
run = "echo never"
""",
    )
    code, first = amberd.build_json(spec)
    assert code == 1 and first["status"] == "failed"
    assert statuses(first) == ["ran", "failed", "skipped"]
    assert first["steps"][1]["exit_code"] == 7

    original = cached_result(amberd, "broken")
    assert original[0] == first["build"]
    plain = amberd.amber("build", str(spec))
    assert plain.returncode == 1
    out = plain.stdout + plain.stderr
    assert b"the compiler said no" in out  # the original log
    assert first["build"].encode() in out  # naming the original build
    # Replayed, not rerun: a rerun would have recorded its own result.
    assert cached_result(amberd, "broken") == original

    code, cached = amberd.build_json(spec)
    assert statuses(cached) == ["cached", "cached-failure", "skipped"]
    assert cached_result(amberd, "broken") == original
    code, retried = amberd.build_json(spec, "--retry-failed")
    assert code == 1 and statuses(retried) == ["cached", "failed", "skipped"]
    assert cached_result(amberd, "broken")[0] == retried["build"]  # a rerun does record one


def cached_result(amberd: Daemon, step: str) -> tuple[str, float]:
    """The build that recorded the cached result of ``step``, and when it ran."""
    db = sqlite3.connect(f"file:{amberd.state / 'amber.db'}?mode=ro", uri=True)
    try:
        [row] = db.execute("SELECT build_id, started FROM results WHERE step = ?", (step,))
    finally:
        db.close()
    return row


def test_timed_out_and_cancelled_steps_are_not_cached(amberd: Daemon):
    spec = write_spec(
        amberd.root / "slow",
        """
[build]
name = "slow"

[[step]]
name = "sleepy"
run = "sleep 30"
timeout = "1s"
""",
    )
    code, first = amberd.build_json(spec)
    assert code == 1 and first["status"] == "errored"
    assert statuses(first) == ["errored"]
    code, second = amberd.build_json(spec)
    assert statuses(second) == ["errored"]  # ran again: not a cached failure

    cancel_spec = write_spec(
        amberd.root / "cancel",
        '[build]\nname = "cancel"\n[[step]]\nname = "long"\nrun = "sleep 60"\n',
    )
    proc_holder = {}

    def run_build():
        proc_holder["result"] = amberd.build_json(cancel_spec)

    thread = threading.Thread(target=run_build)
    thread.start()
    build_id = wait_for_running(amberd, "cancel")
    cancelled = amberd.amber("cancel", build_id)
    assert cancelled.returncode == 0, cancelled.stderr
    thread.join(30)
    code, report = proc_holder["result"]
    assert report["status"] == "errored" and statuses(report) == ["errored"]
    # not cached: the next build runs the step again (and we cancel it again)
    thread = threading.Thread(target=run_build)
    thread.start()
    build_id = wait_for_running(amberd, "cancel")
    amberd.amber("cancel", build_id)
    thread.join(30)
    assert statuses(proc_holder["result"][1]) == ["errored"]


def wait_for_running(amberd: Daemon, name: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    with amberd.connect() as conn:
        while time.monotonic() < deadline:
            for b in conn.call("ps")["builds"]:
                if b["name"] == name and b["status"] == "running" and b["step"]:
                    return b["id"]
            time.sleep(0.05)
    raise AssertionError(f"no running build of {name}")


def test_sigterm_during_a_build_marks_it_errored_and_a_restart_builds_again(daemon_root: Path):
    d = Daemon(daemon_root).start()
    spec = write_spec(
        daemon_root / "term", '[build]\nname = "term"\n[[step]]\nname = "long"\nrun = "sleep 60"\n'
    )
    holder = {}
    thread = threading.Thread(
        target=lambda: holder.setdefault("proc", d.amber("build", "--json", str(spec)))
    )
    thread.start()
    build_id = wait_for_running(d, "term")
    # a short grace: the running step cannot finish in time and is cancelled
    assert d.stop(signal.SIGTERM) == 0
    thread.join(30)
    # the client following the build got its outcome, not a dropped connection
    followed = json.loads(holder["proc"].stdout)
    assert followed["status"] == "errored" and "stopping" in followed["error"]
    from amber.sandbox.mounts import mounts_under

    assert mounts_under(daemon_root) == []
    d2 = Daemon(daemon_root)
    d2.start()
    try:
        listing = json.loads(d2.amber("builds", "--json").stdout)
        record = next(b for b in listing["builds"] if b["id"] == build_id)
        assert record["status"] == "errored"
        quick = write_spec(
            daemon_root / "term", '[build]\nname = "term"\n[[step]]\nname = "long"\nrun = "true"\n'
        )
        code, report = d2.build_json(quick)
        assert code == 0 and report["status"] == "success"
    finally:
        assert d2.stop() == 0


def test_twenty_clients_twenty_builds_at_once(amberd: Daemon):
    results: dict[int, tuple[int, dict]] = {}

    def one(i: int) -> None:
        spec = write_spec(
            amberd.root / f"many{i}",
            f'[build]\nname = "many{i}"\n[[step]]\nname = "work"\nrun = "echo {i} > out && sleep 0.2 && cat out"\n'
            f'[[step]]\nname = "check"\nrun = "test $(cat out) = {i}"\n',
        )
        results[i] = amberd.build_json(spec)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(20))
    for i, (code, report) in results.items():
        assert code == 0 and report["status"] == "success", (i, report)


def raw_client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(10)
    return s


def read_frame(s: socket.socket) -> dict | None:
    header = b""
    while len(header) < 4:
        chunk = s.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (size,) = struct.unpack(">I", header)
    body = b""
    while len(body) < size:
        chunk = s.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return msgpack.unpackb(body, raw=False)


def hello(s: socket.socket) -> None:
    s.sendall(encode_frame({"op": "hello", "id": 0, "versions": [1], "client": "test"}))
    assert read_frame(s)["ok"] is True


def test_hostile_clients_get_errors_while_another_build_completes(amberd: Daemon):
    spec = write_spec(
        amberd.root / "steady",
        '[build]\nname = "steady"\n[[step]]\nname = "work"\nrun = "sleep 2 && echo done"\n',
    )
    holder = {}
    thread = threading.Thread(target=lambda: holder.setdefault("r", amberd.build_json(spec)))
    thread.start()

    # unknown operation and wrong types: error replies, connection stays usable
    s = raw_client(amberd.socket)
    hello(s)
    s.sendall(encode_frame({"op": "no-such-op", "id": 1, "args": {}}))
    reply = read_frame(s)
    assert reply["ok"] is False and reply["error"]["code"] == "unknown-op"
    s.sendall(encode_frame({"op": "builds", "id": 2, "args": {"limit": "many"}}))
    reply = read_frame(s)
    assert reply["error"]["code"] == "bad-args" and "limit" in reply["error"]["message"]
    s.sendall(encode_frame({"op": "build", "id": 3, "args": {"spec_text": 5, "spec_path": "/x"}}))
    assert read_frame(s)["error"]["code"] == "bad-args"
    s.sendall(encode_frame({"op": "status", "id": 4, "args": {}}))
    assert read_frame(s)["ok"] is True
    s.close()

    # malformed frame: an error, then that connection (only) is closed
    s = raw_client(amberd.socket)
    hello(s)
    s.sendall(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    reply = read_frame(s)
    assert reply is not None and reply["error"]["code"] == "malformed-frame"
    assert read_frame(s) is None
    s.close()

    # oversized frame: refused from its header alone
    s = raw_client(amberd.socket)
    hello(s)
    s.sendall(struct.pack(">I", 1 << 30))
    reply = read_frame(s)
    assert reply["error"]["code"] == "frame-too-large"
    s.close()

    # no hello, garbage, a half frame then silence
    s = raw_client(amberd.socket)
    s.sendall(encode_frame({"op": "status", "id": 1}))
    assert read_frame(s)["ok"] is False
    s.close()
    s = raw_client(amberd.socket)
    s.sendall(b"\x00\x00\x00")
    s.close()

    thread.join(60)
    code, report = holder["r"]
    assert code == 0 and report["status"] == "success"


def test_steps_are_contained(amberd: Daemon):
    marker = amberd.root / "outside-marker"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    try:
        spec = write_spec(
            amberd.root / "contain",
            f"""
[build]
name = "contain"

[[step]]
name = "probe"
run = '''
echo "processes: $(ls /proc | grep -c '^[0-9]')"
if python3 -c "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"; then echo NETWORK-REACHED; fi
echo escaped > {marker} 2>/dev/null || echo "write refused"
(sleep 300.0417; echo survivor) &
echo started background
'''
""",
        )
        code, report = amberd.build_json(spec)
        assert code == 0, report
        log = amberd.amber("log", report["build"]).stdout.decode()
        assert "NETWORK-REACHED" not in log
        count = int(log.split("processes: ")[1].split()[0])
        assert count <= 5, log  # only the step's own processes, not the host's
        assert not marker.exists()
        time.sleep(0.5)
        ps = os.popen("ps -eo args").read()
        assert "sleep 300.0417" not in ps  # a duration no other process on the host sleeps
    finally:
        listener.close()


def test_spec_errors_exit_2_and_unreachable_daemon_exits_3(amberd: Daemon):
    bad = write_spec(amberd.root / "bad", '[build]\nname = "bad"\n[[step]]\nname = "x"\nrun = 5\n')
    proc = amberd.amber("build", str(bad))
    assert proc.returncode == 2
    assert b"run" in proc.stderr and b"spec.toml" in proc.stderr
    missing = amberd.amber("build", str(amberd.root / "nope.toml"))
    assert missing.returncode == 2
    env_dead = Daemon(amberd.root / "nowhere")
    proc = env_dead.amber("build", str(bad))
    assert proc.returncode == 3


@pytest.mark.parametrize("user,expected", [("build", "1000"), ("root", "0")])
def test_step_users(amberd: Daemon, user: str, expected: str):
    spec = write_spec(
        amberd.root / f"user-{user}",
        f'[build]\nname = "u{user}"\n[[step]]\nname = "who"\nuser = "{user}"\nrun = "id -u"\n',
    )
    code, report = amberd.build_json(spec)
    assert code == 0
    assert amberd.amber("log", report["build"]).stdout.decode().strip().endswith(expected)


def test_a_source_is_its_content_not_its_mtime(amberd: Daemon):
    directory = amberd.root / "touched"
    directory.mkdir()
    (directory / "input.txt").write_text("v1\n")
    spec = write_spec(
        directory,
        '[build]\nname = "touched"\n[[source]]\npath = "input.txt"\n[[step]]\nname = "use"\nrun = "cat input.txt"\n',
    )
    code, first = amberd.build_json(spec)
    assert code == 0 and statuses(first) == ["ran"]
    os.utime(directory / "input.txt", ns=(1, 1))  # copied or touched: same content
    code, again = amberd.build_json(spec)
    assert statuses(again) == ["cached"]
    (directory / "input.txt").write_text("v2\n")
    code, changed = amberd.build_json(spec)
    assert statuses(changed) == ["ran"]


USER_SPEC = """
[build]
name = "{name}"
base = "dir:{base}"

[[source]]
path = "{source}"

[[step]]
name = "use"
run = "cat /base-file input.txt > out && test -s out"
"""


def test_another_user_builds_with_their_own_files_and_no_one_elses(daemon_root: Path):
    """Local sources and dir: bases are read with the requesting user's rights:
    readable ones build (the store is still written as root), root-only ones
    are refused before any step."""
    config = daemon_root / "amberd.toml"
    config.write_text("socket-mode = 0o666\n")
    d = Daemon(daemon_root).start("--config", str(config))
    try:
        theirs = d.root / "user"
        make_busybox_root(theirs / "base")
        (theirs / "base/base-file").write_text("from the base\n")
        (theirs / "input.txt").write_text("from a source\n")
        secret = d.root / "secret"
        secret.mkdir(mode=0o700)
        (secret / "base-file").write_text("root only\n")
        for path in (theirs, theirs / "input.txt"):
            os.chown(path, 4242, 4242)
        user = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", str(BIN / "amber")]
        env = dict(d.env, HOME="/tmp")

        def build(name: str, base: Path) -> subprocess.CompletedProcess:
            spec = theirs / f"{name}.toml"
            spec.write_text(USER_SPEC.format(name=name, base=base, source=theirs / "input.txt"))
            os.chown(spec, 4242, 4242)
            return subprocess.run([*user, "build", str(spec)], capture_output=True, env=env)

        ok = build("mine", theirs / "base")
        assert ok.returncode == 0, ok.stderr
        refused = build("not-mine", secret)
        assert refused.returncode != 0
        said = refused.stdout + refused.stderr
        assert b"cannot read" in said and b"secret" in said, said
        assert b"root only" not in said
    finally:
        assert d.stop() == 0


def test_log_follow_shows_notes_made_while_following_in_order(amberd: Daemon, tmp_path: Path):
    """Notes amber makes during a build (here: a download's progress, a pin)
    reach `amber log -f` among the log lines, once each."""
    import hashlib

    from gated_http import GatedServer

    payload = b"served late\n"
    with GatedServer(payload, wait=60) as server:  # answers once the test follows the build
        url = server.url("data.txt")
        spec = write_spec(
            tmp_path / "notes",
            '[build]\nname = "notes"\nbase = "host"\n'
            f'[[source]]\nurl = "{url}"\nsha256 = "{hashlib.sha256(payload).hexdigest()}"\n'
            'dest = "data.txt"\n'
            '[[step]]\nname = "use"\nrun = "cat data.txt"\n',
        )
        started = amberd.amber("build", "--detach", "--json", "--pin", "notes-pin", str(spec))
        assert started.returncode == 0, started.stderr
        build = json.loads(started.stdout)["build"]
        follow = subprocess.Popen(
            [str(BIN / "amber"), "log", "-f", build], stdout=subprocess.PIPE, env=amberd.env
        )
        assert follow.stdout is not None
        first = follow.stdout.readline()  # noted before the follow began
        assert b"fetching" in first, first
        server.gate.set()
        rest = follow.stdout.read()
        assert follow.wait(60) == 0
    lines = (first + rest).decode().splitlines()
    fetched = next(i for i, line in enumerate(lines) if "fetched" in line and "verified" in line)
    header = lines.index("==> step use <==")
    assert fetched < header < lines.index("served late") < lines.index("amber: pinned as notes-pin")
    assert sum("fetching" in line for line in lines) == 1, lines  # replayed once, not twice
