"""Looking a command up in a sandbox's tree as execvp will (sandbox/command.py)."""

from __future__ import annotations

import os
from pathlib import Path

from amber.sandbox.command import Found, Identity, Missing, NotExecutable, Unknown, find_command

BUILD = Identity(uid=101000, gid=101000, mapped=None)
ROOT = Identity(uid=100000, gid=100000, mapped=range(100000, 165536))


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in ("bin", "opt/a", "opt/b", "build"):
        (root / d).mkdir(parents=True)
    for path, mode in (("opt/a/tool", 0o644), ("opt/b/tool", 0o755), ("build/mine", 0o700)):
        (root / path).write_text("#!/bin/sh\n")
        os.chmod(root / path, mode)
    os.chown(root / "build/mine", BUILD.uid, BUILD.gid)
    os.chown(root / "opt/a/tool", ROOT.uid, ROOT.gid)
    (root / "bin/abs").symlink_to("/opt/b/tool")
    (root / "bin/up").symlink_to("../../../../../opt/b/tool")  # .. stops at the root
    return root


def find(root: Path, name: str, who: Identity = BUILD, **kw):
    options = dict(binds=[], hidden=["/proc"], cwd="/build", search_path="/opt/a:/opt/b")
    options.update(kw)
    return find_command(root, name, who=who, **options)


def test_path_search_skips_what_it_cannot_execute(tmp_path: Path):
    root = tree(tmp_path)
    assert find(root, "tool") == Found("/opt/b/tool")
    assert find(root, "tool", search_path="/opt/a") == NotExecutable(
        "permission denied (not executable)"
    )
    assert find(root, "nothing") == Missing()
    assert find(root, "./mine") == Found("/build/mine")  # the owner's x bit


def test_links_resolve_against_the_sandbox_root(tmp_path: Path):
    root = tree(tmp_path)
    assert find(root, "/bin/abs") == Found("/opt/b/tool")
    assert find(root, "/bin/up") == Found("/opt/b/tool")


def test_sandbox_root_needs_some_x_bit_and_only_on_files_it_maps(tmp_path: Path):
    root = tree(tmp_path)
    assert find(root, "/opt/a/tool", ROOT) == NotExecutable("permission denied (not executable)")
    os.chmod(root / "opt/a/tool", 0o744)
    assert find(root, "/opt/a/tool", ROOT) == Found("/opt/a/tool")
    assert find(root, "/opt/a/tool") == NotExecutable("permission denied (not executable)")
    # the build user's file with only its group's x bit: root's capability runs it
    os.chmod(root / "build/mine", 0o610)
    assert find(root, "/build/mine", ROOT) == Found("/build/mine")
    assert find(root, "/build/mine") == NotExecutable("permission denied (not executable)")


def test_binds_and_hidden_mounts(tmp_path: Path):
    root = tree(tmp_path)
    elsewhere = tmp_path / "host-usr"
    (elsewhere / "bin").mkdir(parents=True)
    (elsewhere / "bin/hosted").write_text("")
    os.chmod(elsewhere / "bin/hosted", 0o755)
    binds = [(elsewhere, "/usr")]
    assert find(root, "hosted", binds=binds, search_path="/usr/bin") == Found("/usr/bin/hosted")
    assert find(root, "hosted", search_path="/usr/bin") == Missing()
    assert find(root, "/proc/self/exe") == Unknown()
