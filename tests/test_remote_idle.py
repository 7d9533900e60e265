"""The push queue yields to builds and never holds up amberd: its work runs in a child
process of amberd's at idle CPU and I/O priority.

What an admin checks with ps/chrt/ionice: amberd's ``amber-push`` child is
SCHED_IDLE, nice 19 and in the idle I/O class, with no capability but reading
files, and a push's hashing and
uploading is that process's CPU time, not amberd's. What a user checks: with
the pusher stopped mid-push (as the kernel leaves an idle-priority process on
a busy machine) ``amber status`` still answers; with it killed, the queue
still ends with the result on the registry.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from test_remote import host, notes, public, statuses, tags, wait_pushed, write_spec
from test_remote_pins import repo_tags

BIG = """
[build]
name = "big"
base = "host"

[[step]]
name = "big"
run = "head -c 64000000 /dev/urandom > big"
"""


def pusher(amberd: int, not_pid: int | None = None) -> int:
    """The pid of amberd's push process (its child named ``amber-push``; other than
    ``not_pid``): it starts with the push queue, just after amberd's socket."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                comm = (proc / "comm").read_text().strip()
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError, OSError):
                continue
            if comm == "amber-push" and ppid == amberd and int(proc.name) != not_pid:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError("amberd has no amber-push child")


def cpu_ns(pid: int) -> int:
    """Nanoseconds process ``pid``'s main thread has run (the first field of its schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def test_the_push_process_is_idle_priority_and_does_the_pushing(daemon_root, registry):
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    try:
        assert a.process is not None
        pid = a.process.pid
        child = pusher(pid)
        assert os.sched_getscheduler(child) == os.SCHED_IDLE
        sched = Path(f"/proc/{child}/sched").read_text().splitlines()
        assert [line.split()[-1] for line in sched if line.startswith("policy")] == ["5"]
        assert os.getpriority(os.PRIO_PROCESS, child) == 19
        ionice = subprocess.run(["ionice", "-p", str(child)], capture_output=True, text=True)
        assert ionice.returncode == 0 and ionice.stdout.strip() == "idle", ionice
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER  # amberd is not lowered
        status = Path(f"/proc/{child}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
        for kind in ("CapEff", "CapPrm", "CapBnd"):  # CAP_DAC_READ_SEARCH (bit 2) alone
            assert int(caps[kind], 16) == 1 << 2, caps
        assert int(caps["CapInh"], 16) == int(caps["CapAmb"], 16) == 0, caps
        ids = {k: v.split() for k, v in (line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
               if k in ("Uid", "Gid", "Groups")}  # fmt: skip
        assert ids == {"Uid": ["65534"] * 4, "Gid": ["65534"] * 4, "Groups": []}, ids

        before = cpu_ns(child)
        code, report = a.build_json(write_spec(daemon_root, BIG))
        assert code == 0, report
        wait_pushed(registry, 1)
        # Hashing (sha256) and sending 64 MB is tens of ms of CPU: in this process.
        assert cpu_ns(child) - before > 20_000_000
        assert pusher(pid) == child  # the same process, still there
    finally:
        a.stop()
    assert not Path(f"/proc/{child}").exists()  # gone with amberd


def test_a_stopped_or_killed_pusher_holds_up_no_one_and_loses_no_push(daemon_root, registry):
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    try:
        assert a.process is not None
        child = pusher(a.process.pid)
        idle = cpu_ns(child)
        code, report = a.build_json(write_spec(daemon_root, BIG))
        assert code == 0, report
        deadline = time.monotonic() + 60
        while cpu_ns(child) - idle < 2_000_000:  # the job has reached it: it is pushing
            assert time.monotonic() < deadline, "the pusher never started the push"
            time.sleep(0.005)
        os.kill(child, signal.SIGSTOP)
        assert tags(registry) == []  # mid-push: the manifest goes last
        status = a.amber("status", "--json", timeout=20)
        assert status.returncode == 0, status.stderr
        os.kill(child, signal.SIGKILL)
        again = pusher(a.process.pid, not_pid=child)  # amberd starts another
        assert len(wait_pushed(registry, 1)) == 1
        deadline = time.monotonic() + 60
        while not repo_tags(registry):  # listed, and its manifest readable (test_remote_pins)
            assert time.monotonic() < deadline, "the tag is listed, its manifest never readable"
            time.sleep(0.1)
        assert pusher(a.process.pid) == again
    finally:
        a.stop()
    # The result on the registry is whole: another host's build of the spec is a hit.
    b = host(daemon_root, "ci-b", registry, sign=False, trusted={"ci-a": public(a)})
    try:
        code, report = b.build_json(write_spec(daemon_root, BIG, "b.toml"))
        assert code == 0 and statuses(report) == ["cached"], notes(b, report["build"])
    finally:
        b.stop()


class _Wordy(BaseHTTPRequestHandler):
    """A registry that has nothing and refuses every upload with an error text of 100,000
    bytes: its own to write, and more than one message between amberd and its push
    process holds."""

    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, message: str) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"errors": [{"code": "DENIED", "message": message}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(404, "unknown")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._answer(503, "x" * 100_000)

    do_PUT = do_PATCH = do_POST

    def log_message(self, *args: object) -> None:
        pass


def test_a_registry_refusing_with_a_huge_error_text_does_not_stop_amberd(daemon_root):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Wordy)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        a = host(daemon_root, "ci-a", f"127.0.0.1:{server.server_address[1]}", sign=True,
                 trusted={})  # fmt: skip
        try:
            spec = write_spec(daemon_root, BIG.replace("64000000", "1000"))
            code, report = a.build_json(spec)
            assert code == 0, report  # the lookup's refusal is a note, the push is queued
            deadline = time.monotonic() + 30
            while b"push of" not in a.log.read_bytes() and a.process.poll() is None:
                assert time.monotonic() < deadline, a.log.read_text()[-3000:]
                time.sleep(0.1)
            assert a.process.poll() is None, a.log.read_text()[-3000:]
            assert a.amber("status").returncode == 0
            again = write_spec(daemon_root, BIG.replace("64000000", "2000"))
            code, report = a.build_json(again)
            assert code == 0 and statuses(report) == ["ran"], report
        finally:
            assert a.stop() == 0, a.log.read_text()[-3000:]
    finally:
        server.shutdown()


def test_the_push_process_still_dies_with_amberd_after_it_became_nobody():
    """A change of the effective uid clears the parent-death signal (prctl(2)): it must be
    set again after the push process becomes ``nobody``, or an amberd killed mid-push
    leaves it pushing on. Checked in a real child, as amberd starts it."""
    from amber.daemon.remote import pusher as push_process

    read, write = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            push_process._lower(parent)
            got = ctypes.c_int(-1)
            ctypes.CDLL(None).prctl(2, ctypes.byref(got), 0, 0, 0)  # PR_GET_PDEATHSIG
            os.write(write, f"{os.getuid()} {got.value}".encode())
        finally:
            os._exit(0)
    os.close(write)
    said = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(child, 0)
    assert said == f"65534 {int(signal.SIGKILL)}", said
