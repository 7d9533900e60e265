"""Step and build statuses agree between what a follower sees and what is recorded."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from amberd_process import Daemon

THREE = """
[build]
name = "{name}"
base = "host"

[[step]]
name = "first"
run = "{first}"
timeout = "{timeout}"

[[step]]
name = "second"
run = "true"

[[step]]
name = "third"
run = "true"
"""


def spec_file(directory: Path, name: str, first: str, timeout: str = "10m") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(THREE.format(name=name, first=first, timeout=timeout))
    return path


def shown_steps(amberd: Daemon, build_id: str) -> dict[str, str]:
    proc = amberd.amber("show", build_id, "--json")
    assert proc.returncode == 0, proc.stderr
    return {s["name"]: s["status"] for s in json.loads(proc.stdout)["steps"]}


def test_an_errored_build_tells_its_follower_which_steps_were_skipped(amberd: Daemon):
    spec = spec_file(amberd.root / "errored", "errored", "sleep 30", timeout="1s")
    with amberd.connect() as conn:
        events = list(conn.stream("build", spec_text=spec.read_text(), spec_path=str(spec)))
    reported: dict[str, str] = {}
    for event in events:
        if event["event"] == "step":
            reported[event["data"]["name"]] = event["data"]["status"]
    build_id = events[0]["data"]["build"]
    recorded = shown_steps(amberd, build_id)
    assert recorded == {"first": "errored", "second": "skipped", "third": "skipped"}
    # what the follower was told is what amber show says, step for step
    assert reported == recorded


def test_a_build_cancelled_in_the_queue_has_no_step_left_pending(daemon_root: Path):
    amberd = Daemon(daemon_root, jobs=1).start()
    try:
        busy = spec_file(daemon_root / "busy", "busy", "sleep 60")
        holder: dict = {}
        thread = threading.Thread(target=lambda: holder.setdefault("r", amberd.build_json(busy)))
        thread.start()
        with amberd.connect() as conn:
            while not any(b["status"] == "running" for b in conn.call("ps")["builds"]):
                time.sleep(0.05)
        waiting = spec_file(daemon_root / "waiting", "waiting", "true")
        proc = amberd.amber("build", "--detach", "--json", str(waiting))
        assert proc.returncode == 0, proc.stderr
        queued = json.loads(proc.stdout)
        assert queued["status"] == "queued"
        assert amberd.amber("cancel", queued["build"]).returncode == 0
        running = [b for b in json.loads(amberd.amber("ps", "--json").stdout)["builds"]]
        amberd.amber("cancel", next(b["id"] for b in running if b["name"] == "busy"))
        thread.join(60)

        steps = shown_steps(amberd, queued["build"])
        assert steps == {"first": "skipped", "second": "skipped", "third": "skipped"}
        listed = json.loads(amberd.amber("builds", "--json").stdout)["builds"]
        assert {b["id"]: b["status"] for b in listed}[queued["build"]] == "errored"
    finally:
        assert amberd.stop() == 0
