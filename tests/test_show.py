"""amber show: a build's record, its timeline, and a Chrome trace that validates."""

from __future__ import annotations

import itertools
import json
import os
import pty
import subprocess
from datetime import datetime
from pathlib import Path

import jsonschema
from amberd_process import BIN, Daemon
from test_frozen import read_until

SPEC = """
[build]
name = "shown"
base = "host"

[[step]]
name = "prepare"
run = "echo prepared-output && sleep 0.4 && echo one > one"

[[step]]
name = "work"
run = "sleep 0.2 && cat one > two"

[[step]]
name = "breaks"
run = "echo about to fail >&2 && exit 3"
"""

#: The Trace Event Format (Google's "Trace Event Format" document), as much of it
#: as amber writes: the JSON object form, with a traceEvents array; every event
#: has name, ph, ts, pid and tid; complete events (X) a duration >= 0; metadata
#: events (M) an args object; instant events (i) a scope of g, p or t.
TRACE_SCHEMA = {
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "traceEvents": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "ph", "ts", "pid", "tid"],
                "properties": {
                    "name": {"type": "string"},
                    "cat": {"type": "string"},
                    "ph": {"type": "string", "enum": ["B", "E", "X", "i", "I", "M", "C"]},
                    "ts": {"type": "number", "minimum": 0},
                    "dur": {"type": "number", "minimum": 0},
                    "pid": {"type": "integer"},
                    "tid": {"type": "integer"},
                    "args": {"type": "object"},
                    "s": {"enum": ["g", "p", "t"]},
                },
                "allOf": [
                    {
                        "if": {"properties": {"ph": {"const": "X"}}},
                        "then": {"required": ["dur"]},
                    },
                    {
                        "if": {"properties": {"ph": {"const": "M"}}},
                        "then": {
                            "required": ["args"],
                            "properties": {
                                "name": {
                                    "enum": [
                                        "process_name",
                                        "process_labels",
                                        "process_sort_index",
                                        "thread_name",
                                        "thread_sort_index",
                                    ]
                                }
                            },
                        },
                    },
                ],
            },
        },
    },
}


def two_builds(amberd: Daemon) -> tuple[str, str]:
    """A build that runs two steps and fails the third, then its fully cached rebuild."""
    spec_dir = amberd.root / "shown"
    spec_dir.mkdir(exist_ok=True)
    (spec_dir / "spec.toml").write_text(SPEC)
    code, first = amberd.build_json(spec_dir / "spec.toml")
    assert code == 1 and [s["status"] for s in first["steps"]] == ["ran", "ran", "failed"]
    code, again = amberd.build_json(spec_dir / "spec.toml")
    assert code == 1
    assert [s["status"] for s in again["steps"]] == ["cached", "cached", "cached-failure"]
    return first["build"], again["build"]


def show_json(amberd: Daemon, build: str) -> dict:
    proc = amberd.amber("show", build, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_show_json_names_owner_base_and_each_step(amberd: Daemon):
    first, again = two_builds(amberd)
    shown = show_json(amberd, first)
    assert shown["build"] == first and shown["name"] == "shown"
    assert (shown["uid"], shown["user"]) == (0, "root")
    assert shown["base"] == "host" and shown["host"] == os.uname().nodename
    assert shown["status"] == "failed" and shown["frozen"] and shown["failed_step"] == "breaks"
    for key in ("created", "finished"):
        assert datetime.fromisoformat(shown[key]).tzinfo is not None
    steps = {s["name"]: s for s in shown["steps"]}
    assert [s["status"] for s in shown["steps"]] == ["ran", "ran", "failed"]
    assert [s["exit_code"] for s in shown["steps"]] == [0, 0, 3]
    assert steps["prepare"]["seconds"] >= 0.4  # it slept that long
    assert steps["prepare"]["after_tree"] == steps["work"]["before_tree"]
    assert steps["prepare"]["before_tree"] != steps["prepare"]["after_tree"]
    assert len({s["key"] for s in shown["steps"]}) == 3
    log = amberd.amber("log", first, "--step", "prepare")
    assert steps["prepare"]["log_bytes"] == len(log.stdout) == len(b"prepared-output\n")
    assert steps["breaks"]["log_bytes"] == len(b"about to fail\n")

    cached = show_json(amberd, again)
    assert [s["status"] for s in cached["steps"]] == ["cached", "cached", "cached-failure"]
    assert [s["seconds"] for s in cached["steps"]] == [0.0, 0.0, 0.0]  # no time spent here
    assert all(s["cached_from"] == first for s in cached["steps"])
    assert [s["key"] for s in cached["steps"]] == [s["key"] for s in shown["steps"]]
    assert cached["steps"][0]["original_seconds"] == steps["prepare"]["seconds"]


def test_trace_loads_as_trace_event_format(amberd: Daemon):
    first, again = two_builds(amberd)
    trace_file = amberd.root / "first.json"
    proc = amberd.amber("show", first, "--trace", str(trace_file))
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(trace_file.read_text())
    jsonschema.validate(trace, TRACE_SCHEMA)
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert f"amber build {first} (shown)" in names
    build = next(e for e in events if e["ph"] == "X" and e["cat"] == "build")
    steps = [e for e in events if e["ph"] == "X" and e["cat"] != "build"]
    assert [(e["name"], e["cat"]) for e in steps] == [
        ("prepare", "ran"),
        ("work", "ran"),
        ("breaks", "failed"),
    ]
    assert steps[0]["dur"] >= 400_000  # microseconds: prepare slept 0.4 s
    assert steps[1]["dur"] >= 200_000
    # The steps follow each other inside the build, so a viewer stacks them under it.
    for a, b in itertools.pairwise(steps):
        assert a["ts"] + a["dur"] <= b["ts"]
    assert build["ts"] <= steps[0]["ts"] and steps[-1]["ts"] + steps[-1]["dur"] <= build["dur"]
    assert steps[2]["args"]["exit_code"] == 3

    to_stdout = amberd.amber("show", again, "--trace", "-")
    cached = json.loads(to_stdout.stdout)
    jsonschema.validate(cached, TRACE_SCHEMA)
    marks = [e for e in cached["traceEvents"] if e["ph"] == "i"]
    assert [(e["name"], e["cat"]) for e in marks] == [
        ("prepare", "cached"),
        ("work", "cached"),
        ("breaks", "cached-failure"),
    ]
    assert all(e["args"]["cached_from"] == first for e in marks)


def timeline_rows(text: str) -> list[str]:
    """The timeline's step lines: after its heading, before its legend."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("timeline ("))
    return lines[top + 1 : -1]


def test_timeline_in_plain_ascii_off_a_terminal(amberd: Daemon):
    first, again = two_builds(amberd)
    text = amberd.amber("show", first).stdout.decode()
    assert text.isascii()
    assert f"build {first} (shown): failed at step breaks, frozen" in text
    assert "owner  root (uid 0)" in text and "base   host" in text
    prepare, work, breaks = timeline_rows(text)
    seconds = {s["name"]: s["seconds"] for s in show_json(amberd, first)["steps"]}
    assert prepare.split()[-1] == f"{seconds['prepare']:.1f}s"
    assert work.split()[-1] == f"{seconds['work']:.1f}s"
    column = float(text.split("one column = ")[1].split("ms)")[0]) / 1000
    for row, name in ((prepare, "prepare"), (work, "work")):  # as long as the step took
        assert abs(row.count("#") - seconds[name] / column) <= 1.5, (row, seconds, column)
    assert work.index("#") > prepare.rindex("#")  # and it starts after the first ends
    bar = breaks.removeprefix("breaks")
    assert "X" in bar and bar.index("X") + 6 > work.rindex("#") and breaks.endswith("failed")
    assert text.splitlines()[-1].startswith("# ran  X failed")

    cached = timeline_rows(amberd.amber("show", again).stdout.decode())
    assert [row.split() for row in cached] == [
        ["prepare", "o", "cached"],
        ["work", "o", "cached"],
        ["breaks", "x", "cached", "failure"],
    ]


def test_timeline_uses_blocks_on_a_utf8_terminal(amberd: Daemon):
    first, _again = two_builds(amberd)
    master, slave = pty.openpty()
    env = dict(amberd.env, TERM="xterm", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    proc = subprocess.Popen([str(BIN / "amber"), "show", first], stdin=slave, stdout=slave,
                            stderr=slave, env=env)  # fmt: skip
    os.close(slave)
    try:
        seen = read_until(master, "▓".encode())  # the failed step's bar
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = seen.decode()
    assert "█" in text and "#" not in text.split("timeline")[1]


def test_another_user_may_not_show_roots_build(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text("socket-mode = 0o666\n")
    d = Daemon(daemon_root).start("--config", str(config))
    try:
        spec_dir = d.root / "mine"
        spec_dir.mkdir()
        (spec_dir / "spec.toml").write_text(
            '[build]\nname = "mine"\nbase = "host"\n[[step]]\nname = "s"\nrun = "true"\n'
        )
        code, built = d.build_json(spec_dir / "spec.toml")
        assert code == 0
        other = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", str(BIN / "amber")]
        env = dict(d.env, HOME="/tmp")
        for args in (["show", built["build"]], ["show", built["build"], "--json"]):
            proc = subprocess.run(other + args, capture_output=True, env=env)
            assert proc.returncode == 1, proc
            assert b"belongs to uid 0" in proc.stderr and not proc.stdout
        assert d.amber("show", built["build"]).returncode == 0  # root, its owner, may
    finally:
        assert d.stop() == 0
