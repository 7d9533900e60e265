"""Issue 12, finding 6: image names are per user, with root's as the shared ones.

Real amberd, real ``amber``, real second uids (mal 4242, bob 4243). A name in a
spec is the user's own image, else root's, never another user's: mal cannot
squat a name bob builds on, and two users may each have an image ``debian``.
Each image is a busybox root with a file ``/whose`` saying whose it is; a step
prints it, so which tree a build ran on shows in what the build printed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from rootfs import make_busybox_root
from second_user import BOB, MAL, Mal, mal_daemon, user_of
from test_ownership import listed, new_group, write_spec

SPEC = """
[build]
name = "on-NAME"
base = "NAME"

[[step]]
name = "whose"
run = "cat /whose"
"""


def mark(who: str) -> str:
    return f"image-of-{who}-5d1e"


def image_dir(user: Mal, who: str) -> Path:
    """A busybox root in ``user``'s home whose /whose says ``who``."""
    path = make_busybox_root(user.home / f"rootfs-{who}")
    (path / "whose").write_text(mark(who) + "\n")
    os.chmod(path / "whose", 0o644)
    return path


def built_on(user: Mal, name: str) -> tuple[int, str]:
    """``amber build`` of a spec of ``user``'s on base ``name``: its status, and what it
    and its ``amber log`` printed (a cache hit prints its step's output there only)."""
    spec = SPEC.replace("on-NAME", "on-base").replace("NAME", name)
    code, said = user.said("build", write_spec(user, "on-base", spec))
    if code == 0:
        (build,) = set(re.findall(r"build (on-base-\d+)", said))
        said += user.said("log", build)[1]
        shown = json.loads(user.amber("show", "--json", build).stdout)
        said += f"\nbase_owner={shown['base_owner']}\n"  # whose image the record says it used
    return code, said


def names(user: Mal) -> set[tuple[str, int]]:
    return {(i["name"], i["uid"]) for i in json.loads(listed(user, "image", "ls"))["images"]}


@pytest.fixture
def users(daemon_root: Path) -> Iterator[tuple[Mal, Mal, Mal]]:
    """mal, bob and root (uid 0's ``amber``, home of its own) of one amberd."""
    with mal_daemon(daemon_root) as mal:
        yield mal, user_of(mal.daemon, BOB), user_of(mal.daemon, 0)


def test_another_users_image_name_is_not_yours(users):
    mal, bob, root = users
    imported = mal.amber("image", "import", "--json", "debian", image_dir(mal, "mal"))
    assert imported.returncode == 0, imported.stderr
    tree = json.loads(imported.stdout)["tree"]
    code, said = built_on(mal, "debian")
    assert code == 0 and mark("mal") in said, said

    # bob names "debian": not mal's (squatting), and nothing says mal has one.
    code, said = built_on(bob, "debian")
    assert code != 0 and "no such image" in said, said
    assert mark("mal") not in said
    assert names(bob) == set()
    code, said = built_on(bob, f"tree:{tree}")  # nor by the digest of mal's image
    assert code != 0 and "not in the store" in said and mark("mal") not in said, said

    # bob's own "debian" beside mal's, each building on their own.
    imported = bob.amber("image", "import", "debian", image_dir(bob, "bob"))
    assert imported.returncode == 0, imported.stderr
    code, said = built_on(bob, "debian")
    assert code == 0 and mark("bob") in said and mark("mal") not in said, said
    assert f"base_owner={BOB}" in said
    code, said = built_on(mal, "debian")
    assert code == 0 and mark("mal") in said and mark("bob") not in said, said
    assert f"base_owner={MAL}" in said
    assert names(bob) == {("debian", BOB)}
    assert names(mal) == {("debian", MAL)}
    assert names(root) == {("debian", BOB), ("debian", MAL)}  # root sees every user's

    # Each removes their own only.
    assert mal.amber("image", "rm", "debian").returncode == 0
    assert names(root) == {("debian", BOB)}
    code, said = built_on(bob, "debian")
    assert code == 0 and mark("bob") in said, said


def test_the_shared_image_is_everyones_until_they_have_their_own(users):
    mal, bob, root = users
    assert root.amber("image", "import", "alpine", image_dir(root, "root")).returncode == 0
    for user in (mal, bob):
        code, said = built_on(user, "alpine")
        assert code == 0 and mark("root") in said and "base_owner=0" in said, said
        assert names(user) == {("alpine", 0)}

    # mal's own "alpine" is mal's alone: bob still builds on the shared one.
    imported = mal.amber("image", "import", "alpine", image_dir(mal, "mal"))
    assert imported.returncode == 0, imported.stderr
    code, said = built_on(mal, "alpine")
    assert code == 0 and mark("mal") in said and mark("root") not in said, said
    code, said = built_on(bob, "alpine")
    assert code == 0 and mark("root") in said and mark("mal") not in said, said
    assert names(mal) == {("alpine", 0), ("alpine", MAL)}
    assert names(bob) == {("alpine", 0)}
    code, said = mal.said("image", "import", "--shared", "alpine", image_dir(mal, "mal"))
    assert code != 0 and "only root may import a shared image" in said, said

    # root's `image rm NAME` is the shared one; --user UID another user's.
    assert root.amber("image", "rm", "alpine").returncode == 0
    assert names(root) == {("alpine", MAL)}
    code, said = built_on(bob, "alpine")
    assert code != 0 and "no such image" in said and mark("mal") not in said, said
    assert root.amber("image", "rm", "--user", str(MAL), "alpine").returncode == 0
    assert names(root) == set()


def test_the_admin_group_writes_the_shared_names(daemon_root: Path):
    with new_group() as group:
        config = f'admin-group = "{group.gr_name}"\n'
        with mal_daemon(daemon_root, config) as mal:
            admin, bob = user_of(mal.daemon, MAL, (group.gr_gid,)), user_of(mal.daemon, BOB)
            code, said = bob.said("image", "import", "--shared", "ubuntu", image_dir(bob, "bob"))
            assert code != 0 and f"members of group {group.gr_name} may" in said, said
            shared = image_dir(admin, "admin")
            assert admin.amber("image", "import", "--shared", "ubuntu", shared).returncode == 0
            assert names(bob) == {("ubuntu", 0)}
            code, said = built_on(bob, "ubuntu")
            assert code == 0 and mark("admin") in said, said
            code, said = bob.said("image", "rm", "--shared", "ubuntu")
            assert code != 0 and f"members of group {group.gr_name} may" in said, said
            assert admin.amber("image", "rm", "--shared", "ubuntu").returncode == 0
            assert names(bob) == set()
