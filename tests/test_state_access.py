"""The store, the database and running builds are root's; trees are reached through amberd.

A second uid (4242, ``setpriv``) tries what any local user could: read the
store, the database and a running build's upper directly, and name root's
tree by digest to build on it or pin it. Builds of both users still work.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon
from second_user import MAL, Mal, mal_daemon

from amber.daemon.storage.db import Database

SECRET = "root-only-secret-5e1d"


@pytest.fixture
def mal(daemon_root: Path) -> Iterator[Mal]:
    with mal_daemon(daemon_root) as mal:
        yield mal


def spec(directory: Path, text: str, owner: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spec.toml"
    path.write_text(text)
    for p in (directory, path):
        os.chown(p, owner, owner)
    return path


def tree_of(daemon: Daemon, build_id: str) -> str:
    db = Database(daemon.state / "amber.db")
    try:
        record = db.get_build(build_id)
        assert record is not None and record.final_tree
        return record.final_tree
    finally:
        db.close()


WAITING = f"""
[build]
name = "secret"
base = "host"

[[source]]
path = "secret.txt"
dest = "/src/secret.txt"

[[step]]
name = "writes"
run = "echo {SECRET} > /build/written && while [ ! -e /build/go ]; do sleep 0.05; done"
env = {{ TOKEN = "{SECRET}" }}
"""


def test_store_database_and_a_running_upper_are_unreadable_to_others(mal: Mal):
    daemon = mal.daemon
    where = daemon.root / "root-build"
    spec_path = spec(where, WAITING)
    (where / "secret.txt").write_text(SECRET + "\n")
    build = subprocess.Popen([str(BIN / "amber"), "build", "--json", str(spec_path)],
                             env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        uppers: list[Path] = []
        while not uppers:  # the step has written its file: the build is running
            assert build.poll() is None, build.communicate()
            uppers = list((daemon.state / "mnt").glob("*/**/upper/build/written"))
            time.sleep(0.05)
        upper = uppers[0].parents[1]
        work = next(p for p in upper.parents if p.parent == daemon.state / "mnt")
        assert SECRET in uppers[0].read_text()  # root sees it: the probe below is real

        found = mal.run("grep", "-r", SECRET, daemon.state / "cas")
        assert SECRET.encode() not in found.stdout and found.returncode != 0
        assert b"Permission denied" in found.stderr
        found = mal.run("grep", "-r", SECRET, daemon.state)
        assert SECRET.encode() not in found.stdout
        for path in (daemon.state / "amber.db", uppers[0]):
            shown = mal.run("cat", path)
            assert shown.returncode != 0 and SECRET.encode() not in shown.stdout, path
        listed = mal.run("ls", daemon.state / "mnt")
        assert listed.returncode != 0  # traversable for the sandbox, not listable

        # Through the mount, which lives in amberd's own mount namespace: the step ends.
        go = work / "root" / "build" / "go"
        subprocess.run(
            ["nsenter", "-t", str(daemon.process.pid), "-m", "touch", str(go)], check=True
        )
        out, err = build.communicate(timeout=600)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 0, err
    assert json.loads(out)["status"] == "success"
    # ... and the other user's builds work as before.
    mine = spec(mal.home / "mine", SIMPLE, owner=MAL)
    built = mal.amber("build", mine)
    assert built.returncode == 0, built.stderr


SIMPLE = """
[build]
name = "simple"
base = "host"

[[step]]
name = "one"
run = "echo made by WHO > /build/out"
"""


def test_another_users_tree_cannot_be_named_by_digest(mal: Mal):
    daemon = mal.daemon
    code, result = daemon.build_json(
        spec(daemon.root / "root-simple", SIMPLE.replace("WHO", "root"))
    )
    assert code == 0, result
    roots_tree = tree_of(daemon, result["build"])

    # Mal's own tree works both ways: the refusals below are about whose tree it is.
    mine = spec(mal.home / "mine", SIMPLE, owner=MAL)
    built = mal.amber("build", "--json", mine)
    assert built.returncode == 0, built.stderr
    own_tree = tree_of(daemon, json.loads(built.stdout)["build"])
    assert own_tree != roots_tree
    assert mal.amber("pin", "add", "own", f"tree:{own_tree}").returncode == 0
    # (a base resolves it as an image import does; a host-based tree has no /bin/sh to build with)
    assert mal.amber("image", "import", "mine", f"tree:{own_tree}").returncode == 0

    pinned = mal.amber("pin", "add", "stolen", f"tree:{roots_tree}")
    assert pinned.returncode != 0 and b"no tree" in pinned.stderr
    pinned = mal.amber("pin", "add", "stolen", roots_tree)
    assert pinned.returncode != 0
    on_roots = spec(
        mal.home / "on-roots", SIMPLE.replace('"host"', f'"tree:{roots_tree}"'), owner=MAL
    )
    stolen = mal.amber("build", on_roots)
    assert stolen.returncode != 0 and b"not in the store" in stolen.stdout + stolen.stderr
    assert mal.amber("image", "import", "stolen", f"tree:{roots_tree}").returncode != 0
    assert [p["name"] for p in json.loads(daemon.amber("pin", "ls", "--json").stdout)["pins"]] == [
        "own"
    ]
    # root may: it sees every tree.
    assert daemon.amber("pin", "add", "roots", f"tree:{own_tree}").returncode == 0


def step_key(daemon: Daemon, build_id: str) -> str:
    db = Database(daemon.state / "amber.db")
    try:
        (step,) = db.get_steps(build_id)
        return step.key
    finally:
        db.close()


def test_another_users_result_cannot_be_pinned_by_key(mal: Mal):
    daemon = mal.daemon
    code, result = daemon.build_json(
        spec(daemon.root / "root-result", SIMPLE.replace("WHO", "root"))
    )
    assert code == 0, result
    roots_key = step_key(daemon, result["build"])

    # Mal's own result may be pinned both ways: the refusal below is about whose result it is.
    built = mal.amber("build", "--json", spec(mal.home / "mine", SIMPLE, owner=MAL))
    assert built.returncode == 0, built.stderr
    own_key = step_key(daemon, json.loads(built.stdout)["build"])
    assert own_key != roots_key
    assert mal.amber("pin", "add", "own", f"result:{own_key}").returncode == 0
    assert mal.amber("pin", "add", "own-bare", own_key).returncode == 0

    for target in (f"result:{roots_key}", roots_key):
        pinned = mal.amber("pin", "add", "stolen", target)
        assert pinned.returncode != 0, target
        assert b"stolen" not in daemon.amber("pin", "ls").stdout
    assert daemon.amber("pin", "add", "roots", f"result:{roots_key}").returncode == 0
