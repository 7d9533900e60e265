"""Real tools inside a real mount, compared with the same work in a plain directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio
from fstree import describe, differences
from sources import source_tarball

from amber.sandbox import tree as treefmt
from amber.sandbox.checkout import checkout
from amber.sandbox.fscontrol import open_overlay
from amber.sandbox.store import Store

SCRIPT = r"""
set -e
tar xf "$TARBALL"
cd zlib-*/ && ./configure >/dev/null && make -j2 >/dev/null && cd ..
mkdir repo && cp -a zlib-*/*.c zlib-*/Makefile repo/ && cd repo
git init -q && git add -A
GIT_AUTHOR_DATE=@1600000000 GIT_COMMITTER_DATE=@1600000000 \
  git -c user.name=amber -c user.email=amber@example.invalid commit -qm import
cd ..
mkdir -p py/pkg && printf 'X = 1\n' > py/pkg/__init__.py && printf 'import pkg\n' > py/main.py
touch -d @1600000000 py/pkg/__init__.py py/main.py
python3 -m compileall -q py
mkdir -p links/sub && echo data > links/a && ln links/a links/sub/hard && ln -s ../a links/sub/sym
ln -s sub links/dirlink
cp -a links links-copy
"""

# Files whose bytes record when or where they were made, so two honest runs differ.
RUN_DEPENDENT = {
    "repo/.git/index",  # stat data (ctime, inode) of the work tree
}


async def run_script(cwd: Path, tarball: Path) -> None:
    env = dict(os.environ, TARBALL=str(tarball), HOME=str(cwd))
    await trio.run_process(["sh", "-c", SCRIPT], cwd=cwd, env=env)


def strip(state: dict, started_ns: int, *, content: bool) -> dict:
    """Drop what differs between honest runs: new mtimes, run-dependent bytes."""
    out = {}
    for path, (kind, mode, uid, gid, size, data, mtime, xattrs, group) in state.items():
        if mtime is not None and mtime >= started_ns:
            mtime = None  # made by this run: only the archive's and cp -a's times are fixed
        if not content and (path in RUN_DEPENDENT or path.endswith("configure.log")):
            data = size = None
        out[path] = (kind, mode, uid, gid, size, data, mtime, xattrs, group)
    return out


async def test_real_build_tools_in_a_mount_match_a_plain_directory(store: Store, tmp_path: Path):
    tarball = source_tarball("zlib")
    started = time.time_ns() - 1_000_000_000

    plain = tmp_path / "plain"
    plain.mkdir()
    await run_script(plain, tarball)

    async with open_overlay(store.state_dir, treefmt.EMPTY_TREE, tmp_path / "mnt") as mnt:
        await run_script(mnt.root, tarball)
        snap = await mnt.snapshot()
        live = describe(mnt.root)
        out = tmp_path / "snapshot"
        checkout(store, snap.tree, out)
    snapshot = describe(out)

    assert differences(live, snapshot) == []  # the snapshot is exactly what the build saw
    plain_state = strip(describe(plain), started, content=False)
    snap_state = strip(snapshot, started, content=False)
    assert differences(plain_state, snap_state) == []
    # the real products are there and work
    assert any(p.endswith("libz.a") for p in snapshot)
    assert (out / "links-copy/sub/hard").stat().st_ino == (out / "links-copy/a").stat().st_ino
    assert os.readlink(out / "links-copy/sub/sym") == "../a"
    assert any(p.startswith("py/__pycache__/main.") for p in snapshot)
    log = await trio.run_process(
        ["git", "-C", str(out / "repo"), "log", "--format=%s"], capture_stdout=True
    )
    assert log.stdout.strip() == b"import"
    assert store.fsck().clean
