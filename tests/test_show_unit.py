"""The pure parts of amber show and of JSON output: timeline drawing, terminal
detection, RFC 3339 times, the USER column, and start-up not paying for any of it."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

from amber.client.render import render_builds, to_json
from amber.client.show import render_show, timeline, trace_events, unicode_ok

T0 = 1_796_220_000.0

SHOWN = {
    "build": "b-1", "name": "b", "uid": 0, "user": "root", "base": "host", "host": "vm",
    "status": "failed", "frozen": True, "failed_step": "three", "created": T0, "finished": T0 + 10,
    "steps": [
        {"name": "one", "status": "cached", "started": T0, "seconds": 0.0},
        {"name": "two", "status": "ran", "started": T0, "seconds": 6.0, "exit_code": 0},
        {"name": "three", "status": "failed", "started": T0 + 6, "seconds": 4.0, "exit_code": 2},
        {"name": "four", "status": "skipped", "started": None, "seconds": None},
    ],
}  # fmt: skip


class Tty:
    def isatty(self) -> bool:
        return True


def rows(lines: list[str]) -> dict[str, str]:
    return {line.split()[0]: line for line in lines[1:-1]}


def test_bars_are_as_long_as_the_steps_and_placed_where_they_ran():
    # 60 columns of bar for 10 s: 6 s is 36 columns, 4 s is 24, starting at column 36.
    lines = timeline(SHOWN, unicode=True, width=60 + 5 + 16)
    by = rows(lines)
    bar_two = by["two"][len("three") + 2 :]
    assert bar_two.startswith("█" * 36) and bar_two[36] == " "
    bar_three = by["three"][len("three") + 2 :]
    assert bar_three.index("▓") == 36 and bar_three.count("▓") == 24
    assert by["one"][len("three") + 2] == "○" and by["one"].endswith("cached")
    assert by["four"].split() == ["four", "skipped"]
    ascii_lines = timeline(SHOWN, unicode=False, width=60 + 5 + 16)
    assert "\n".join(ascii_lines).isascii()
    assert rows(ascii_lines)["two"].count("#") == 36


def test_a_fraction_of_a_column_is_drawn_in_eighths():
    # 16 columns of bar for 1 s: 1.5/16 s is one and a half columns.
    step = {"name": "a", "status": "ran", "started": T0, "seconds": 1.5 / 16}
    short = dict(SHOWN, steps=[step], finished=T0 + 1)
    (line,) = timeline(short, unicode=True, width=1 + 16 + 16)[1:-1]
    assert line.split()[:2] == ["a", "█▌"]


def test_unicode_only_on_a_utf8_terminal():
    assert unicode_ok(Tty(), {"TERM": "xterm", "LANG": "en_US.UTF-8"})
    assert unicode_ok(Tty(), {"TERM": "xterm", "LC_ALL": "C.utf8", "LANG": "C"})
    assert not unicode_ok(Tty(), {"TERM": "xterm", "LC_ALL": "C", "LANG": "en_US.UTF-8"})
    assert not unicode_ok(Tty(), {"TERM": "dumb", "LANG": "C.UTF-8"})
    assert not unicode_ok(Tty(), {"TERM": "xterm"})

    class Pipe:
        def isatty(self) -> bool:
            return False

    assert not unicode_ok(Pipe(), {"TERM": "xterm", "LANG": "C.UTF-8"})


def test_show_text_names_owner_and_steps():
    text = render_show(SHOWN, unicode=False)
    assert text.splitlines()[0] == "build b-1 (b): failed at step three, frozen"
    assert "owner  root (uid 0)" in text and "host   vm" in text


def test_trace_nests_steps_in_the_build_and_marks_cache_hits():
    events = trace_events(SHOWN)["traceEvents"]
    complete = [(e["name"], e["ts"], e["dur"]) for e in events if e["ph"] == "X"]
    assert complete == [("build b-1", 0.0, 10e6), ("two", 0.0, 6e6), ("three", 6e6, 4e6)]
    assert [(e["name"], e["s"]) for e in events if e["ph"] == "i"] == [("one", "t")]


def test_json_times_are_rfc3339_everywhere():
    text = to_json({"created": T0, "nested": [{"finished": T0 + 1.6}], "last_gc": str(T0),
                    "started": None, "seconds": 3.0})  # fmt: skip

    out = json.loads(text)
    assert out["created"] == "2026-12-02T14:00:00Z"
    assert datetime.fromisoformat(out["nested"][0]["finished"]) == datetime(
        2026, 12, 2, 14, 0, 1, tzinfo=UTC
    )
    assert datetime.fromisoformat(out["last_gc"]).timestamp() == T0
    assert out["started"] is None and out["seconds"] == 3.0


def test_user_column_only_when_asked():
    builds = {"builds": [{"id": "x-1", "name": "x", "uid": 0, "status": "success"}]}
    assert render_builds(builds).splitlines()[0].split()[:3] == ["BUILD", "NAME", "STATUS"]
    with_users = render_builds(builds, users=True).splitlines()
    assert with_users[0].split()[:3] == ["BUILD", "NAME", "USER"]
    assert with_users[1].split()[:3] == ["x-1", "x", "root"]


def test_amber_start_up_does_not_load_the_show_module():
    code = "import sys, amber.client.cli; print('amber.client.show' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _older_database(path, script: str):
    """The Database on ``path`` after an older amberd's tables, made by ``script``."""
    import sqlite3

    from amber.daemon.storage.db import Database

    old = sqlite3.connect(path)
    old.executescript(script)
    old.commit()
    old.close()
    return Database(path)


def test_an_older_database_gains_the_new_columns(tmp_path):
    """A state directory from before steps kept their start and images their owner opens."""
    from amber.daemon.storage.db import Database

    path = tmp_path / "amber.db"
    db = _older_database(
        path,
        "CREATE TABLE build_steps (build_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL,"
        " key TEXT, status TEXT NOT NULL, exit_code INTEGER, signal INTEGER, seconds REAL,"
        " before_tree TEXT, after_tree TEXT, log TEXT, definition TEXT NOT NULL, note TEXT,"
        " PRIMARY KEY (build_id, idx));"
        "CREATE TABLE images (name TEXT PRIMARY KEY, tree TEXT NOT NULL, source TEXT NOT NULL,"
        " created REAL NOT NULL);"
        "INSERT INTO images VALUES ('old', 'ab', 'dir:/x', 1.0);"
        "INSERT INTO build_steps VALUES ('b', 0, 's', NULL, 'ran', 0, NULL, 1.0, NULL, NULL,"
        " NULL, '{}', NULL);",
    )
    (step,) = db.get_steps("b")
    assert step.started is None and step.seconds == 1.0
    assert db.get_image("old", 0)["tree"] == "ab"  # root's (shared), then
    db.put_image("new", "cd", "dir:/y", uid=4242)
    assert db.get_image("new", 4242)["uid"] == 4242
    db.close()
    Database(path).close()  # a second opening adds nothing twice


def test_images_of_one_global_namespace_keep_their_owners_per_user(tmp_path):
    """Issue 12: a table keyed by name alone becomes (uid, name); rows keep their owner."""
    from amber.daemon.storage.db import Database

    path = tmp_path / "amber.db"
    db = _older_database(
        path,
        "CREATE TABLE images (name TEXT PRIMARY KEY, tree TEXT NOT NULL, source TEXT NOT NULL,"
        " created REAL NOT NULL, uid INTEGER);"
        "INSERT INTO images VALUES ('debian', 'ab', 'dir:/m', 1.0, 4242);"
        "INSERT INTO images VALUES ('alpine', 'cd', 'dir:/r', 1.0, NULL);",
    )
    assert db.get_image("debian", 4242)["tree"] == "ab"
    assert db.get_image("alpine", 0)["tree"] == "cd"
    db.put_image("debian", "ef", "dir:/b", uid=4243)  # bob's own, beside mal's
    assert db.find_image("debian", 4243)["tree"] == "ef"
    assert db.find_image("debian", 4242)["tree"] == "ab"
    assert db.find_image("debian", 4244) is None  # never another user's
    assert db.find_image("alpine", 4244)["tree"] == "cd"  # the shared one
    db.close()
    db = Database(path)  # a second opening migrates nothing twice
    assert len(db.list_images()) == 3
    db.close()
