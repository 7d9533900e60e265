"""The ``host`` base's cache key follows the host: a change deep under a
directory the sandbox binds reruns the steps built on it."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from amberd_process import Daemon
from test_builds import statuses, write_spec

SPEC = """
[build]
name = "deep"
base = "host"

[[step]]
name = "look"
run = "ls {deep}; echo looked"
"""


def test_a_change_four_levels_deep_reruns_the_step(amberd: Daemon):
    """/usr/local/lib/amber-test-X/a/b/c gets a new file: only its own directory changes."""
    top = Path("/usr/local/lib") / f"amber-test-{uuid.uuid4().hex[:12]}"
    deep = top / "a" / "b" / "c"
    deep.mkdir(parents=True)
    try:
        spec = write_spec(amberd.root / "deep", SPEC.format(deep=deep))
        code, first = amberd.build_json(spec)
        assert code == 0 and statuses(first) == ["ran"], first
        code, again = amberd.build_json(spec)
        assert code == 0 and statuses(again) == ["cached"], again

        (deep / "new.h").write_text("#define NEW 1\n")
        code, changed = amberd.build_json(spec)
        assert code == 0 and statuses(changed) == ["ran"], changed
        log = amberd.amber("log", changed["build"], "--step", "look")
        assert log.stdout == b"new.h\nlooked\n", log
        code, again = amberd.build_json(spec)
        assert code == 0 and statuses(again) == ["cached"], again
    finally:
        shutil.rmtree(top)
