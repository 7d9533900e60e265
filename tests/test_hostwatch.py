"""The host fingerprint's inotify shortcut (hostwatch.py) never stands for a stale digest:
after each kind of change under a watched tree, the fingerprint is what a new walk gives."""

from __future__ import annotations

import os
from pathlib import Path

from amber.daemon.build import hostprint
from amber.daemon.build.hostwatch import DirWatch


def fresh_walk(top: Path) -> str:
    walked = hostprint._walk((str(top),))
    walked.watch.close()
    return walked.digest


def test_every_change_under_a_watched_tree_gives_a_new_walks_digest(tmp_path: Path):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    tops = [str(tmp_path)]
    seen = [hostprint.tree_fingerprint(tops)]
    assert hostprint.tree_fingerprint(tops) == seen[0]  # nothing changed: the same digest

    changes = [
        lambda: (deep / "new.h").write_text("x"),  # an entry added four levels down
        lambda: (deep / "d").mkdir(),  # a directory no watch covered yet
        lambda: (deep / "d" / "e").mkdir(),  # ... and one below it
        lambda: os.rename(deep / "d", tmp_path / "a" / "moved"),
        lambda: (deep / "new.h").unlink(),
        lambda: os.chmod(tmp_path / "a" / "b", 0o700),
    ]
    for change in changes:
        change()
        digest = hostprint.tree_fingerprint(tops)
        assert digest == fresh_walk(tmp_path)
        assert digest not in seen  # a change the shortcut let through would repeat one
        seen.append(digest)
        assert hostprint.tree_fingerprint(tops) == digest  # and then quiet again


def test_a_watch_is_quiet_until_something_under_it_changes(tmp_path: Path):
    watch = DirWatch()
    try:
        watch.add(str(tmp_path))
        assert watch.quiet()
        (tmp_path / "f").write_text("in place")
        assert not watch.quiet()
        assert not watch.quiet()  # drained, but not re-armed: still "maybe changed"
        watch.rearm()
        assert watch.quiet()
        (tmp_path / "f").write_text("rewritten in place")  # its directory does not change
        assert not watch.quiet()
    finally:
        watch.close()
