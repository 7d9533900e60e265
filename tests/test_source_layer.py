"""An edit-rebuild reuses the kept lower of the base, its sources a layer of their own
(sandbox/sourcelayer.py).

Checked as an operator and a user would: the FUSE mount and the process
serving it in amberd's mount namespace stay the same across builds whose
sources changed, the build's mount phases say it attached, and the step
sees what it would see on a lower of its whole tree (a daemon with
``AMBER_SOURCE_LAYER=0``): the edited content, sources that replace base
files and directories (and hide what those held), modes, owners, mtimes,
link counts and the snapshot's tree. (Not a directory's ``st_size``: it is
the topmost layer's, a tmpfs's count of what that layer holds, with a
lower of the whole tree too.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from amberd_process import Daemon
from rootfs import make_busybox_root
from test_shared_lower import fuse_mounts, fuse_servers, mount_phases

from amber.sandbox import sourcelayer
from amber.sandbox import tree as treefmt
from amber.sandbox.tree import Entry

RUN = r"""cat input.txt
for p in /build /build/input.txt /etc /etc/greeting /opt /opt/tool /opt/tool/a /srv /srv/thing /srv/plain /srv/plain/inner.txt /usr/bin/env; do stat -c '%n %F %a %u %g %Y %h' $p; done
for p in /build/input.txt /etc/greeting /opt/tool/a /srv/thing /srv/plain/inner.txt; do stat -c '%n %s' $p; done
ls -a /opt/tool /srv/plain
cat /etc/greeting /srv/thing /srv/plain/inner.txt /opt/tool/a
test ! -e /opt/tool/b
test ! -e /srv/thing/inside
echo made > /build/out && chmod 600 /etc/greeting && touch -t 202001010000 /build/out /build"""


def base_image(d: Daemon, top: Path) -> None:
    """busybox, with files and directories the sources replace (made once under ``top``)."""
    root = top / "bb"
    if not root.exists():
        _base_root(root)
    assert d.amber("image", "import", "layered", f"dir:{root}").returncode == 0


def _base_root(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/greeting").write_text("from the base\n")
    (root / "etc/greeting").chmod(0o600)
    for sub in ("opt/tool", "srv/thing"):
        (root / sub).mkdir(parents=True)
    (root / "opt/tool/a").write_text("base a\n")
    (root / "opt/tool/b").write_text("base b, hidden by the source directory\n")
    (root / "srv/thing/inside").write_text("a directory in the base\n")
    (root / "srv/plain").write_text("a file in the base\n")
    make_busybox_root(root)


def sources(top: Path, edit: str) -> Path:
    """The spec under ``top``, with ``input.txt`` holding ``edit`` (the rest the same)."""
    top = top / "src"
    (top / "tooldir").mkdir(parents=True, exist_ok=True)
    (top / "plaindir").mkdir(exist_ok=True)
    (top / "input.txt").write_text(f"{edit}\n")
    (top / "greeting.txt").write_text("from the sources\n")
    (top / "thing.txt").write_text("a file where the base has a directory\n")
    for path, text in ((top / "tooldir/a", "source a\n"),
                       (top / "plaindir/inner.txt", "a directory where the base has a file\n")):  # fmt: skip
        path.write_text(text)
        os.utime(path, ns=(1_600_000_000_000_000_000,) * 2)  # a checkout's files keep theirs
        os.utime(path.parent, ns=(1_600_000_000_000_000_000,) * 2)
    body = "".join(
        f'[[source]]\npath = "{p}"\n' + (f'dest = "{dest}"\n' if dest else "")
        for p, dest in (
            ("input.txt", None),
            ("greeting.txt", "/etc/greeting"),
            ("tooldir", "/opt/tool"),
            ("thing.txt", "/srv/thing"),
            ("plaindir", "/srv/plain"),
        )
    )
    spec = top / "spec.toml"
    spec.write_text(
        f'[build]\nname = "layered"\nbase = "layered"\n\n{body}'
        f"[[step]]\nname = \"look\"\nrun = '''\n{RUN}\n'''\n"
    )
    return spec


def built(d: Daemon, edit: str, top: Path | None = None) -> tuple[dict, str]:
    """One build of the spec with ``edit`` in ``input.txt``: its JSON and its step's log."""
    code, report = d.build_json(sources(top or d.root, edit))
    assert code == 0, report
    log = d.amber("log", report["build"], "--step", "look")
    assert log.returncode == 0, log.stderr
    return report, log.stdout.decode()


def after_tree(d: Daemon, build: str) -> str:
    shown = json.loads(d.amber("show", "--json", build).stdout)
    return shown["steps"][0]["after_tree"]


def test_an_edited_source_rebuilds_on_the_kept_lower_of_its_base(daemon_root):
    d = Daemon(daemon_root).start()
    base_image(d, daemon_root)
    first, log = built(d, "edit one")
    assert log.startswith("edit one\n"), log
    kept, servers = fuse_mounts(d), fuse_servers(d)
    assert len(kept) == 1 and len(servers) == 1
    phases = mount_phases(d, first["build"])  # a new lower of the base, its sources above
    assert "mount.eager" in phases and "mount.sources" in phases, phases
    second, log = built(d, "edit two")
    assert log.startswith("edit two\n"), log  # the step sees the edited source
    assert fuse_mounts(d) == kept  # the very same FUSE mount of the base served it
    assert fuse_servers(d) == servers
    phases = mount_phases(d, second["build"])
    assert "mount.attach" in phases and "mount.eager" not in phases, phases
    assert "mount.sources" in phases, phases
    assert d.stop() == 0


def test_a_step_sees_and_snapshots_what_a_lower_of_its_whole_tree_shows(daemon_root):
    seen = {}
    for name, env in (("layered", {}), ("whole", {"AMBER_SOURCE_LAYER": "0"})):
        (daemon_root / name).mkdir(mode=0o755)
        d = Daemon(daemon_root / name, extra_env=env).start()
        base_image(d, daemon_root)  # the same base and sources for both daemons
        built(d, "warm the lower", daemon_root)  # the second build attaches
        report, log = built(d, "edit", daemon_root)
        phases = mount_phases(d, report["build"])
        seen[name] = (log, after_tree(d, report["build"]), "mount.sources" in phases)
        assert d.stop() == 0
    log, tree, layered = seen["layered"]
    assert layered and not seen["whole"][2]  # one through a sources layer, one without
    assert "from the sources\n" in log and "source a\n" in log
    assert "/srv/thing regular file" in log and "/srv/plain directory" in log
    assert log == seen["whole"][0], (log, seen["whole"][0])
    assert tree == seen["whole"][1]


# -- the plan alone (pure logic over a store) ------------------------------------------------

T = 1_600_000_000_000_000_000


def _file(store, batch, name: bytes, text: bytes, **kw) -> Entry:
    blob = store.put_blob_bytes(text, batch)
    return Entry(name, treefmt.FILE, 0o644, 0, 0, T, len(text), blob)._replace(**kw)


def _dir(store, batch, name: bytes, entries: list[Entry]) -> Entry:
    ref = store.put_tree(sorted(entries, key=lambda e: e.name), batch)
    return Entry(name, treefmt.DIR, 0o755, 0, 0, T, 0, ref)


def test_the_plan_holds_only_the_difference_and_refuses_what_a_layer_cannot_show(store):
    with store.batch() as batch:
        same = _file(store, batch, b"same", b"unchanged")
        base = store.put_tree(
            [_dir(store, batch, b"etc", [same, _file(store, batch, b"gone", b"x")])], batch
        )
        new = _dir(store, batch, b"new", [_file(store, batch, b"f", b"y")])
        view = store.put_tree([_dir(store, batch, b"etc", [same]), new], batch)
        linked = _file(store, batch, b"l", b"z", link=b"group")
        with_link = store.put_tree([_dir(store, batch, b"etc", [same, linked])], batch)
    ops = sourcelayer.plan(store, base, view)
    assert ops is not None
    assert [(op.path, op.entry is None, op.alone) for op in ops] == [
        (b"etc", False, False),  # on the way to a difference: view's metadata
        (b"etc/gone", True, False),  # a whiteout
        (b"new", False, True),  # a directory the base lacks, shadowed to merge
        (b"new/f", False, False),
    ]  # and nothing of etc/same: the lower shows it
    assert sourcelayer.plan(store, base, view, limit=3) is None  # 4 entries
    assert sourcelayer.plan(store, base, with_link) is None  # a hard-link group
    assert sourcelayer.plan(store, base, base) == []
    # Hiding or replacing a base name of a hard-link group, or a directory holding one:
    # the group's names left in the lower would keep its old link count.
    with store.batch() as batch:
        other = _file(store, batch, b"other", b"z", link=b"group")
        linked_base = store.put_tree([_dir(store, batch, b"etc", [linked, other])], batch)
        replaced = store.put_tree([_dir(store, batch, b"etc", [_file(store, batch, b"l", b"new"),
                                                              other])], batch)  # fmt: skip
        hidden = store.put_tree([_dir(store, batch, b"etc", [other])], batch)
        in_dir = store.put_tree([_dir(store, batch, b"d", [linked]), other], batch)
        dir_gone = store.put_tree([other], batch)
    assert sourcelayer.plan(store, linked_base, replaced) is None
    assert sourcelayer.plan(store, linked_base, hidden) is None
    assert sourcelayer.plan(store, in_dir, dir_gone) is None
    # A tree the store does not have (a GC cycle set it aside): no layer, no error.
    assert sourcelayer.plan(store, base, bytes(32)) is None
