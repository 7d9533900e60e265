"""The push queue yields to builds: its work runs on one thread at idle CPU and I/O priority.

What an admin checks with ps/chrt/ionice: amberd's ``amber-push`` thread is
SCHED_IDLE, nice 19 and in the idle I/O class, and a push's hashing and
uploading is that thread's CPU time (schedstat), not the loop's.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from test_remote import host, wait_pushed, write_spec

BIG = """
[build]
name = "big"
base = "host"

[[step]]
name = "big"
run = "head -c 64000000 /dev/urandom > big"
"""


def push_thread(pid: int) -> int:
    """The tid of amberd's push thread, found by the name the kernel shows (it starts
    with the push queue, just after amberd's socket: a few moments' grace)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                if (task / "comm").read_text().strip() == "amber-push":
                    return int(task.name)
            except FileNotFoundError:
                continue  # a worker thread that just ended
        time.sleep(0.05)
    raise AssertionError("amberd has no amber-push thread")


def cpu_ns(pid: int, tid: int) -> int:
    """Nanoseconds thread ``tid`` has run (the first field of its schedstat)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


def test_the_push_thread_is_idle_priority_and_does_the_pushing(daemon_root, registry):
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    try:
        assert a.process is not None
        pid = a.process.pid
        tid = push_thread(pid)
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        sched = Path(f"/proc/{pid}/task/{tid}/sched").read_text().splitlines()
        assert [line.split()[-1] for line in sched if line.startswith("policy")] == ["5"]
        assert os.getpriority(os.PRIO_PROCESS, tid) == 19
        ionice = subprocess.run(["ionice", "-p", str(tid)], capture_output=True, text=True)
        assert ionice.returncode == 0 and ionice.stdout.strip() == "idle", ionice
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER  # the loop thread is not lowered

        before = cpu_ns(pid, tid)
        code, report = a.build_json(write_spec(daemon_root, BIG))
        assert code == 0, report
        wait_pushed(registry, 1)
        # Hashing (sha256) and sending 64 MB is tens of ms of CPU: on this thread.
        assert cpu_ns(pid, tid) - before > 20_000_000
        assert push_thread(pid) == tid  # the same thread, still there
    finally:
        a.stop()
