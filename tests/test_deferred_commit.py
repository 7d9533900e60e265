"""A step's snapshot is committed while the next step runs (sandbox/deferredcommit.py,
daemon/build/beside.py): what is cached, and when, must not change for it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import blake3
import trio
from amberd_process import Daemon

from amber.sandbox.deferredcommit import DeferredCommits
from amber.sandbox.store import Store


def spec(d: Daemon, second: str) -> Path:
    path = d.root / "spec.toml"
    path.write_text(
        '[build]\nname = "deferred"\nbase = "host"\n'
        '[[step]]\nname = "make"\nrun = "seq 1 300 | while read n; do echo $n > f$n; done"\n'
        f'[[step]]\nname = "next"\nrun = "{second}"\n'
    )
    return path


def statuses(report: dict) -> list[str]:
    return [s["status"] for s in report["steps"]]


def wait_running(d: Daemon, build: str, index: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        proc = d.amber("show", "--json", build)
        if proc.returncode == 0 and json.loads(proc.stdout)["steps"][index]["status"] == "running":
            return True
        time.sleep(0.1)
    return False


def test_the_step_before_is_cached_while_the_next_still_runs_and_survives_a_crash(daemon_root):
    d = Daemon(daemon_root).start()
    client = subprocess.Popen([str(d.bin / "amber"), "build", str(spec(d, "sleep 60"))], env=d.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_running(d, "deferred-1", 1, time.monotonic() + 60), d.log.read_text()[-2000:]
        time.sleep(5)  # the first step's commit overlaps the second: long done by now
        d.stop(signal.SIGKILL)  # amberd dies during the second step, its record unwritten
    finally:
        client.kill()
        client.wait()
    d = Daemon(daemon_root).start()
    code, report = d.build_json(spec(d, "test -s f300 && cat f7"))
    assert code == 0, report
    assert statuses(report) == ["cached", "ran"], report  # nothing the first step made was lost
    assert d.stop() == 0


def test_a_deferred_commit_is_reported_by_the_steps_phases(amberd: Daemon):
    code, report = amberd.build_json(spec(amberd, "cat f300"))
    assert code == 0 and statuses(report) == ["ran", "ran"], report
    proc = amberd.amber("show", "--json", report["build"])
    first, second = (s["phases"] for s in json.loads(proc.stdout)["steps"])
    # The first step's commit ran beside the second step (the last step's
    # commits before the build reports: nothing runs after it).
    assert "settle.commit" not in first and second["settle.commit"] > 0, (first, second)
    code, again = amberd.build_json(spec(amberd, "cat f300"))
    assert code == 0 and statuses(again) == ["cached", "cached"], again


def test_settle_reports_a_commit_that_failed_and_what_committed(store: Store):
    async def main() -> None:
        commits = DeferredCommits()
        assert await commits.settle() == {"ok": True, "seconds": 0.0}  # none pending
        batch = store.batch()
        digest = store.put_blob_bytes(b"kept", batch)
        commits.start(batch)
        reply = await commits.settle()
        assert reply["ok"] and reply["seconds"] >= 0 and store.has_blob(digest), reply
        broken = store.batch()
        lost = store.put_blob_bytes(b"lost", broken)
        for temp, _ in broken._pending:  # the disk lost a temporary file before the commit
            Path(temp).unlink()
        commits.start(broken)
        reply = await commits.settle()
        assert not reply["ok"] and "snapshot commit failed" in reply["error"], reply
        assert not store.has_blob(lost)
        assert await commits.settle() == {"ok": True, "seconds": 0.0}  # reported once

    trio.run(main)


def test_a_step_whose_background_commit_failed_is_errored_not_ran(amberd: Daemon):
    """The first step's "ran" is told before its commit ends; when the commit then fails,
    the build errors and that step says why, with no state to enter or cache."""
    content = b"amber deferred commit probe\n"
    shard = amberd.state / "cas" / "blobs" / blake3.blake3(content).hexdigest()[:2]
    shard.mkdir(exist_ok=True)
    path = amberd.root / "spec.toml"
    path.write_text(
        '[build]\nname = "unstored"\nbase = "host"\n'
        '[[step]]\nname = "make"\nrun = "echo amber deferred commit probe > probe"\n'
        '[[step]]\nname = "next"\nrun = "sleep 2"\n'
    )
    subprocess.run(["chattr", "+i", str(shard)], check=True)  # the probe's rename gets EPERM
    try:
        code, report = amberd.build_json(path)
    finally:
        subprocess.run(["chattr", "-i", str(shard)], check=True)
    assert code != 0 and report["status"] == "errored", report
    shown = json.loads(amberd.amber("show", "--json", report["build"]).stdout)
    first = shown["steps"][0]
    assert first["status"] == "errored", first
    assert "snapshot could not be stored" in (first["note"] or ""), first
    shell = amberd.amber("shell", report["build"], "--", "true")  # no state it never stored
    assert shell.returncode != 0 and b"no step that finished" in shell.stderr, shell.stderr
    code, again = amberd.build_json(path)  # nothing of it was cached: the step runs again
    assert code == 0 and statuses(again) == ["ran", "ran"], again
