"""Stamp rules: the pure logic over trees (daemon/build/stamps.py), no daemon needed.

The end-to-end reproduction of the Heads failure, with a real Makefile, a
real tarball and GNU patch, is in test_sources.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from amber.daemon.build.spec import StampRule, parse_spec
from amber.daemon.build.stamps import apply_rules, check_tree, remove_paths
from amber.sandbox import tree as treefmt
from amber.sandbox.store import Store
from amber.sandbox.tree import Entry
from amber.sandbox.treeedit import ensure_dir, put_entry

WORKDIR = "/build"
DIR = Entry(b"", treefmt.DIR, 0o755, 1000, 1000, 0, 0, treefmt.EMPTY_TREE)


def make_tree(store: Store, paths: dict[str, str | None]) -> bytes:
    """A root with /build holding ``paths`` (relative; None: an empty directory)."""
    with store.batch() as batch:
        root = ensure_dir(store, treefmt.EMPTY_TREE, WORKDIR, DIR, batch)
        for rel, content in paths.items():
            path = f"{WORKDIR}/{rel}"
            if content is None:
                root = ensure_dir(store, root, path, DIR, batch)
                continue
            data = content.encode()
            blob = store.put_blob_bytes(data, batch)
            entry = Entry(b"", treefmt.FILE, 0o644, 1000, 1000, 0, len(data), blob)
            root = put_entry(store, root, path, entry, batch, dir_template=DIR)
    return root


def listing(store: Store, root: bytes) -> set[str]:
    """Every path below /build, relative to it; directories end in '/'."""
    top = store.lookup_path(root, WORKDIR.strip("/").encode())
    assert top is not None
    return {
        path.decode() + ("/" if entry.kind == treefmt.DIR else "")
        for path, entry in store.walk(top.ref)
    }


def rules(text: str, tmp_path: Path) -> tuple[StampRule, ...]:
    spec = f'[build]\nname = "t"\n\n[[step]]\nname = "s"\nrun = "true"\n\n{textwrap.dedent(text)}'
    return parse_spec(spec, str(tmp_path / "spec.toml"), tmp_path).stamps


def apply(store: Store, root: bytes, stamp_rules, keep=()):
    with store.batch() as batch:
        return apply_rules(store, root, WORKDIR, stamp_rules, batch, keep=keep)


HEADS_RULES = """\
[[stamp]]
path = "packages/.{name}_verify"
covers = "packages/{name}.tar.*"

[[stamp]]
path = "build/*/.patched"

[[stamp]]
path = "build/*/.configured"
covers = "build/{1}/configure.log"

[[stamp]]
path = "build/*/.build"
covers = "build/{1}/libz.a"
"""

COMPLETE = {
    "Makefile": "all:",
    "packages/zlib-1.2.13.tar.bz2": "tarball",
    "packages/.zlib-1.2.13_verify": "ok",
    "build/zlib-1.2.13/zlib.h": "header",
    "build/zlib-1.2.13/.patched": "",
    "build/zlib-1.2.13/configure.log": "log",
    "build/zlib-1.2.13/.configured": "",
    "build/zlib-1.2.13/libz.a": "lib",
    "build/zlib-1.2.13/.build": "",
}


def test_a_consistent_tree_is_left_alone(store: Store, tmp_path: Path):
    root = make_tree(store, COMPLETE)
    new, findings = apply(store, root, rules(HEADS_RULES, tmp_path))
    assert findings == []
    assert new == root


def test_patched_tree_without_its_stamp_is_removed_whole(store: Store, tmp_path: Path):
    # What the Heads CI cache restored: build/ without its stamps, no packages/ stamp.
    paths = {k: v for k, v in COMPLETE.items() if not k.endswith((".patched", "_verify"))}
    root = make_tree(store, paths)
    new, findings = apply(store, root, rules(HEADS_RULES, tmp_path))
    assert [(f.kind, f.path) for f in findings] == [
        ("stale-product", "/build/build/zlib-1.2.13"),
        ("stale-product", "/build/packages/zlib-1.2.13.tar.bz2"),
    ]
    assert "without its stamp /build/build/zlib-1.2.13/.patched" in findings[0].reason
    assert findings[0].rule == "build/*/.patched"
    assert findings[0].note() == (
        "removed /build/build/zlib-1.2.13: product without its stamp "
        "/build/build/zlib-1.2.13/.patched (stamp rule build/*/.patched)"
    )
    assert listing(store, new) == {"Makefile", "build/", "packages/"}


def test_stamps_without_products_are_removed(store: Store, tmp_path: Path):
    # The reverse: stamps restored without what they vouch for.
    root = make_tree(
        store,
        {
            "packages/.zlib-1.2.13_verify": "ok",
            "build/zlib-1.2.13/.patched": "",
            "build/zlib-1.2.13/.configured": "",
            "build/zlib-1.2.13/.build": "",
        },
    )
    new, findings = apply(store, root, rules(HEADS_RULES, tmp_path))
    by_path = {f.path: f for f in findings}
    assert set(by_path) == {
        "/build/packages/.zlib-1.2.13_verify",
        "/build/build/zlib-1.2.13/.patched",
        "/build/build/zlib-1.2.13/.configured",
        "/build/build/zlib-1.2.13/.build",
    }
    assert {f.kind for f in findings} == {"orphan-stamp"}
    assert (
        "/build/packages/zlib-1.2.13.tar.* is missing"
        in by_path["/build/packages/.zlib-1.2.13_verify"].reason
    )
    assert (
        "/build/build/zlib-1.2.13 is empty apart from stamps"
        in by_path["/build/build/zlib-1.2.13/.patched"].reason
    )
    assert (
        "/build/build/zlib-1.2.13/configure.log is missing"
        in by_path["/build/build/zlib-1.2.13/.configured"].reason
    )
    # The emptied directory is no product (nothing but stamps was in it): it stays.
    assert listing(store, new) == {"build/", "build/zlib-1.2.13/", "packages/"}


def test_a_later_stage_without_its_stamp_removes_only_its_products(store: Store, tmp_path: Path):
    paths = {k: v for k, v in COMPLETE.items() if not k.endswith("/.build")}
    root = make_tree(store, paths)
    new, findings = apply(store, root, rules(HEADS_RULES, tmp_path))
    assert [(f.kind, f.path) for f in findings] == [
        ("stale-product", "/build/build/zlib-1.2.13/libz.a")
    ]
    assert "build/zlib-1.2.13/zlib.h" in listing(store, new)


def test_removals_cascade_until_nothing_changes(store: Store, tmp_path: Path):
    two = rules(
        """
        [[stamp]]
        path = "out/.done"
        covers = ["out/a", "out/b"]
        """,
        tmp_path,
    )
    root = make_tree(store, {"out/.done": "", "out/a": "a"})
    new, findings = apply(store, root, two)
    # Round 1: the stamp lacks out/b. Round 2: out/a is left without a stamp.
    assert [(f.kind, f.path) for f in findings] == [
        ("orphan-stamp", "/build/out/.done"),
        ("stale-product", "/build/out/a"),
    ]
    assert "/build/out/b is missing" in findings[0].reason
    assert listing(store, new) == {"out/"}


def test_default_covers_only_takes_directories(store: Store, tmp_path: Path):
    root = make_tree(
        store,
        {
            "build/README": "not a package",
            "build/.gitignore": "*",
            "build/zlib/.patched": "",
            "build/zlib/zlib.h": "h",
            "build/lua/lua.h": "h",
        },
    )
    new, findings = apply(store, root, rules('[[stamp]]\npath = "build/*/.patched"\n', tmp_path))
    assert [(f.kind, f.path) for f in findings] == [("stale-product", "/build/build/lua")]
    assert listing(store, new) == {
        "build/",
        "build/README",
        "build/.gitignore",
        "build/zlib/",
        "build/zlib/.patched",
        "build/zlib/zlib.h",
    }


def test_star_and_placeholders_match_hidden_names(store: Store, tmp_path: Path):
    root = make_tree(store, {"build/.cache/x": "x"})
    findings = check_tree(
        store, root, WORKDIR, rules('[[stamp]]\npath = "build/*/.patched"\n', tmp_path)
    )
    assert [f.path for f in findings] == ["/build/build/.cache"]


def test_glob_characters_in_names_are_literal(store: Store, tmp_path: Path):
    stamp_rules = rules('[[stamp]]\npath = "build/*/.build"\n', tmp_path)
    root = make_tree(
        store,
        {"build/odd[1]*/.build": "", "build/odd[1]*/x": "x", "build/odd1x/x": "x"},
    )
    findings = check_tree(store, root, WORKDIR, stamp_rules)
    # odd[1]* is vouched for by its own stamp; as a glob it would also match odd1x.
    assert [f.path for f in findings] == ["/build/build/odd1x"]


def test_repeated_placeholder_must_agree(store: Store, tmp_path: Path):
    stamp_rules = rules(
        '[[stamp]]\npath = "build/{pkg}/.{pkg}.done"\ncovers = "build/{pkg}/{pkg}.o"\n', tmp_path
    )
    root = make_tree(
        store,
        {
            "build/lua/.lua.done": "",
            "build/lua/lua.o": "o",
            "build/zlib/.lua.done": "",  # not a stamp of this rule: names disagree
            "build/zlib/zlib.o": "o",
        },
    )
    findings = check_tree(store, root, WORKDIR, stamp_rules)
    assert [(f.kind, f.path) for f in findings] == [("stale-product", "/build/build/zlib/zlib.o")]
    assert "without its stamp /build/build/zlib/.zlib.done" in findings[0].reason


def test_kept_paths_are_not_removed_but_reported(store: Store, tmp_path: Path):
    root = make_tree(store, {"packages/zlib.tar.gz": "t", "packages/lua.tar.gz": "t"})
    stamp_rules = rules(HEADS_RULES, tmp_path)
    new, findings = apply(store, root, stamp_rules, keep=["/build/packages/zlib.tar.gz"])
    assert [(f.kind, f.path) for f in findings] == [
        ("stale-product", "/build/packages/lua.tar.gz"),
        ("kept", "/build/packages/zlib.tar.gz"),
    ]
    assert findings[1].note() == (
        "kept /build/packages/zlib.tar.gz: product without its stamp "
        "/build/packages/.zlib_verify, but a source of the spec puts it there "
        "(stamp rule packages/.{name}_verify)"
    )
    assert listing(store, new) == {"packages/", "packages/zlib.tar.gz"}


def test_keeping_the_workdir_itself_protects_nothing_inside(store: Store, tmp_path: Path):
    # A checkout laid at the workdir is a source too: what it carries is still checked.
    root = make_tree(store, {"build/zlib/zlib.h": "h"})
    _, findings = apply(store, root, rules(HEADS_RULES, tmp_path), keep=["/build"])
    assert [(f.kind, f.path) for f in findings] == [("stale-product", "/build/build/zlib")]


def test_check_changes_nothing_and_agrees_with_apply(store: Store, tmp_path: Path):
    root = make_tree(store, {"build/zlib/zlib.h": "h", "build/lua/.patched": ""})
    stamp_rules = rules(HEADS_RULES, tmp_path)
    checked = check_tree(store, root, WORKDIR, stamp_rules)
    new, applied = apply(store, root, stamp_rules)
    assert checked == applied and len(checked) == 2
    assert listing(store, root) == {
        "build/",
        "build/lua/",
        "build/lua/.patched",
        "build/zlib/",
        "build/zlib/zlib.h",
    }
    assert listing(store, new) == {"build/", "build/lua/"}


def test_only_directories_on_the_way_are_rewritten(store: Store, tmp_path: Path):
    root = make_tree(store, {"big/a": "a", "big/b": "b", "build/zlib/zlib.h": "h"})
    new, _ = apply(store, root, rules(HEADS_RULES, tmp_path))
    old_big = store.lookup_path(root, b"build/big")
    new_big = store.lookup_path(new, b"build/big")
    assert old_big is not None and new_big is not None and old_big.ref == new_big.ref


def test_no_workdir_or_no_rules_means_no_findings(store: Store, tmp_path: Path):
    assert check_tree(store, treefmt.EMPTY_TREE, WORKDIR, rules(HEADS_RULES, tmp_path)) == []
    root = make_tree(store, {"build/zlib/zlib.h": "h"})
    assert check_tree(store, root, WORKDIR, ()) == []


@pytest.mark.parametrize(
    ("paths", "remove", "left"),
    [
        ({"a/b": "x", "a/c": "y"}, ["/build/a/b"], {"a/", "a/c"}),
        ({"a/b": "x"}, ["/build/a", "/build/a/b"], set()),
        ({"a/b": "x"}, ["/build/nothing/here", "/build/a/b/c"], {"a/", "a/b"}),
    ],
)
def test_remove_paths(store: Store, paths, remove, left):
    root = make_tree(store, paths)
    with store.batch() as batch:
        new = remove_paths(store, root, remove, batch)
    assert listing(store, new) == left
