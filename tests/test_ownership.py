"""Another user's builds, pins, images and trees: refused, and left as they were.

uid 4243 ("bob", a real non-root user) makes a frozen failure, a build that
keeps running, a pin and an image. uid 4242 ("mal") then tries, through the
real ``amber`` against the real amberd, every operation that names one of
them, and each try must be refused with a message saying why, without
printing bob's secret, and leave bob's object as it was. One parametrized
test, so that removing any one operation's owner check makes one case fail.

Listings show a non-root user their own objects (and root's images) only;
``gc`` and ``store fsck --repair`` take root or the ``admin-group``.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from amberd_process import Daemon, cleanup_root, make_root
from second_user import BOB, MAL, Mal, user_of
from test_state_access import tree_of

SECRET = "bobs-secret-91c4"
# keep-failed-per-spec = 0: only the age keeps a frozen failure, so a `gc --keep-failed 0`
# that got through would take bob's.
CONFIG = "socket-mode = 0o666\nkeep-failed-per-spec = 0\n"

FAILING = f"""
[build]
name = "bobs-failure"
base = "host"

[[step]]
name = "prepare"
run = "echo {SECRET} > /build/{SECRET}.txt && echo {SECRET}"
env = {{ TOKEN = "{SECRET}" }}

[[step]]
name = "compile"
run = "echo {SECRET} >&2; exit 3"
"""

SUCCEEDING = """
[build]
name = "NAME"
base = "host"

[[step]]
name = "one"
run = "echo made by NAME > /build/out"
"""

RUNNING = """
[build]
name = "bobs-long-build"
base = "host"

[[step]]
name = "waits"
run = "sleep 3600"
"""


@dataclass
class World:
    """bob's objects, and the two users."""

    bob: Mal
    mal: Mal
    failed: str  # bob's frozen failure, unpinned
    succeeded: str  # bob's build that bob-pin holds
    tree: str  # the final tree of ``succeeded``
    mal_build: str  # a finished build of mal's own

    def running(self) -> str:
        """bob's build that keeps running (started if none is)."""
        builds = json.loads(listed(self.bob, "ps"))["builds"]
        if builds:
            return builds[0]["id"]
        started = self.bob.amber(
            "build", "--detach", "--json", write_spec(self.bob, "running", RUNNING)
        )
        assert started.returncode == 0, started.stderr
        return json.loads(started.stdout)["build"]

    def none_running(self) -> None:
        """End bob's running build, as bob."""
        for build in json.loads(listed(self.bob, "ps"))["builds"]:
            assert self.bob.amber("cancel", build["id"]).returncode == 0


def write_spec(user: Mal, name: str, text: str) -> Path:
    path = user.write(f"{name}/spec.toml", text)
    os.chown(path.parent, user.uid, user.uid)
    return path


def build(user: Mal, name: str, text: str, *extra: str) -> dict:
    proc = user.amber("build", "--json", *extra, write_spec(user, name, text))
    return json.loads(proc.stdout)


def listed(user: Mal, *command: str) -> str:
    proc = user.amber(*command, "--json")
    assert proc.returncode == 0, (command, proc.stderr)
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = make_root()
    (root / "amberd.toml").write_text(CONFIG)
    daemon = Daemon(root).start("--config", str(root / "amberd.toml"))
    try:
        world = _populate(daemon)
        yield world
        world.none_running()  # the owner still may cancel it
    finally:
        code = daemon.stop()
        left = cleanup_root(root)
        assert code == 0 and not left, (code, left)


def _populate(daemon: Daemon) -> World:
    bob, mal = user_of(daemon, BOB), user_of(daemon, MAL)
    failed = build(bob, "failing", FAILING)
    assert failed["status"] == "failed" and failed["frozen"], failed
    succeeded = build(bob, "ok", SUCCEEDING.replace("NAME", "bobs-success"), "--pin", "bob-pin")
    assert succeeded["status"] == "success", succeeded
    image = bob.home / "image"
    image.mkdir()
    (image / "made-by-bob").write_text("bob\n")
    os.chown(image, BOB, BOB)
    assert bob.amber("image", "import", "bob-image", image).returncode == 0
    mine = build(mal, "mine", SUCCEEDING.replace("NAME", "mals"))
    assert mine["status"] == "success", mine
    return World(bob, mal, failed["build"], succeeded["build"],
                 tree_of(daemon, succeeded["build"]), mine["build"])  # fmt: skip


# --- what bob checks afterwards --------------------------------------------------------


def build_intact(w: World, build_id: str) -> None:
    shown = w.bob.amber("show", build_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert SECRET in w.bob.amber("log", w.failed).stdout.decode()


def failure_intact(w: World) -> None:
    build_intact(w, w.failed)
    state = json.loads(w.bob.amber("show", w.failed, "--json").stdout)
    assert state["frozen"] and state["status"] == "failed", state
    shell = w.bob.amber("shell", w.failed, "--", "cat", f"/build/{SECRET}.txt")
    assert shell.stdout.decode().strip() == SECRET, shell.stderr  # its states are still there


def still_running(w: World) -> None:
    shown = json.loads(w.bob.amber("show", w.running(), "--json").stdout)
    assert shown["status"] in ("queued", "running"), shown


def pin_intact(w: World) -> None:
    pins = json.loads(listed(w.bob, "pin", "ls"))["pins"]
    assert [(p["name"], p["target"], p["uid"]) for p in pins if p["name"] == "bob-pin"] == [
        ("bob-pin", w.succeeded, BOB)
    ]
    every = w.bob.daemon.amber("pin", "ls", "--json")  # root's view: every user's pins
    assert not [p for p in json.loads(every.stdout)["pins"] if p["name"] == "mal-pin"]


def image_intact(w: World) -> None:
    images = json.loads(listed(w.bob, "image", "ls"))["images"]
    (mine,) = [i for i in images if i["name"] == "bob-image"]
    assert mine["uid"] == BOB and mine["source"].endswith("/home-4243/image"), mine


# --- the matrix --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    argv: Callable[[World], list[str | Path]]
    refusal: str  # in what mal is told
    intact: Callable[[World], None]


def gc_argv(w: World) -> list[str | Path]:
    w.none_running()  # a GC that got through would wait for it to pass a step boundary
    return ["gc", "--keep-failed", "0"]


OWNED = "belongs to uid 4243"
ADMIN = "only root may"
CASES: dict[str, Case] = {
    "log": Case(lambda w: ["log", w.failed], OWNED, failure_intact),
    "log --follow": Case(lambda w: ["log", "-f", w.failed], OWNED, failure_intact),
    "diff": Case(lambda w: ["diff", w.failed], OWNED, failure_intact),
    "show": Case(lambda w: ["show", w.failed], OWNED, failure_intact),
    "shell": Case(
        lambda w: ["shell", w.failed, "--", "cat", f"/build/{SECRET}.txt"], OWNED, failure_intact
    ),
    "export": Case(
        lambda w: ["export", w.failed, "-o", w.mal.home / "stolen.tar"], OWNED, failure_intact
    ),
    "cancel": Case(lambda w: ["cancel", w.running()], OWNED, still_running),
    "delete": Case(lambda w: ["delete", w.failed], OWNED, failure_intact),
    "verify": Case(lambda w: ["verify", w.failed], OWNED, failure_intact),
    "pin add BUILD": Case(lambda w: ["pin", "add", "mal-pin", w.failed], OWNED, pin_intact),
    "pin add BUILD:STEP": Case(
        lambda w: ["pin", "add", "mal-pin", f"{w.failed}:prepare"], OWNED, pin_intact
    ),
    "pin add tree:DIGEST": Case(
        lambda w: ["pin", "add", "mal-pin", f"tree:{w.tree}"], "no tree", pin_intact
    ),
    "pin add over bob's pin": Case(
        lambda w: ["pin", "add", "bob-pin", w.mal_build], "pin bob-pin " + OWNED, pin_intact
    ),
    "build --pin bob's pin": Case(
        lambda w: ["build", "--pin", "bob-pin", w.mal.home / "mine" / "spec.toml"],
        "pin bob-pin " + OWNED,
        pin_intact,
    ),
    "pin rm": Case(lambda w: ["pin", "rm", "bob-pin"], "pin bob-pin " + OWNED, pin_intact),
    # Names are per user: bob's image is not one mal can name (test_image_names.py).
    "image rm": Case(lambda w: ["image", "rm", "bob-image"], "no image 'bob-image'", image_intact),
    "image rm --user": Case(
        lambda w: ["image", "rm", "--user", str(BOB), "bob-image"],
        "only root may remove another user's image",
        image_intact,
    ),
    "gc": Case(gc_argv, ADMIN, failure_intact),
    "store fsck --repair": Case(lambda w: ["store", "fsck", "--repair"], ADMIN, failure_intact),
}


@pytest.mark.parametrize("name", CASES)
def test_another_users_object_is_refused_and_left_alone(world: World, name: str):
    case = CASES[name]
    code, said = world.mal.said(*case.argv(world))
    assert code != 0, (name, said)
    assert case.refusal in said, (name, said)
    assert SECRET not in said and "Traceback" not in said, (name, said)
    assert not (world.mal.home / "stolen.tar").exists()
    case.intact(world)


# --- listings ----------------------------------------------------------------------------


def test_listings_show_a_user_their_own_and_root_everything(world: World):
    """mal's own objects are listed (so an empty listing fails), bob's are not."""
    mal, daemon = world.mal, world.mal.daemon
    bobs_running = world.running()
    shared = mal.home / "shared-image"
    shared.mkdir()
    assert daemon.amber("image", "import", "roots-image", str(shared)).returncode == 0
    assert mal.amber("image", "import", "mals-image", shared).returncode == 0
    assert mal.amber("pin", "add", "mals-pin", world.mal_build).returncode == 0
    started = mal.amber("build", "--detach", "--json", write_spec(mal, "running", RUNNING))
    assert started.returncode == 0, started.stderr
    mine = json.loads(started.stdout)["build"]
    try:
        ps = json.loads(listed(mal, "ps"))["builds"]
        assert [(b["id"], b["uid"]) for b in ps] == [(mine, MAL)], ps
        for command in (["builds"], ["builds", "--all"]):
            builds = {b["id"]: b["uid"] for b in json.loads(listed(mal, *command))["builds"]}
            assert world.mal_build in builds and set(builds.values()) == {MAL}, (command, builds)
        pins = {p["name"]: p["uid"] for p in json.loads(listed(mal, "pin", "ls"))["pins"]}
        assert pins == {"mals-pin": MAL}
        images = {i["name"] for i in json.loads(listed(mal, "image", "ls"))["images"]}
        assert images == {"mals-image", "roots-image"}  # root's images are everyone's

        # root sees every user's
        every = json.loads(daemon.amber("ps", "--json").stdout)["builds"]
        assert {b["id"] for b in every} == {mine, bobs_running}
        every = json.loads(daemon.amber("builds", "--all", "--json").stdout)["builds"]
        assert {world.failed, world.mal_build} <= {b["id"] for b in every}
        every = json.loads(daemon.amber("pin", "ls", "--json").stdout)["pins"]
        assert {"mals-pin", "bob-pin"} <= {p["name"] for p in every}
        every = json.loads(daemon.amber("image", "ls", "--json").stdout)["images"]
        assert {"mals-image", "roots-image", "bob-image"} <= {i["name"] for i in every}
    finally:
        for b in json.loads(listed(mal, "ps"))["builds"]:
            mal.amber("cancel", b["id"])


# --- gc and fsck --repair: root and the admin group --------------------------------------


@contextlib.contextmanager
def new_group() -> Iterator[grp.struct_group]:
    """A real group of this host, removed afterwards."""
    name = f"amber-adm-{os.getpid()}"
    subprocess.run(["groupadd", name], check=True)
    try:
        yield grp.getgrnam(name)
    finally:
        subprocess.run(["groupdel", name], check=True)


def test_gc_and_repair_take_root_or_a_member_of_the_admin_group(daemon_root: Path):
    with new_group() as group:
        config = daemon_root / "amberd.toml"
        config.write_text(CONFIG + f'admin-group = "{group.gr_name}"\n')
        daemon = Daemon(daemon_root).start("--config", str(config))
        try:
            outsider, admin = user_of(daemon, MAL), user_of(daemon, MAL, (group.gr_gid,))
            for argv in (["gc"], ["store", "fsck", "--repair"]):
                code, said = outsider.said(*argv)
                assert code != 0 and f"members of group {group.gr_name} may" in said, said
                code, said = admin.said(*argv, "--json")
                assert code == 0, (argv, said)
            assert outsider.amber("gc", "--dry-run").returncode == 0  # looking is for everyone
            assert outsider.amber("store", "fsck").returncode == 0
        finally:
            assert daemon.stop() == 0
