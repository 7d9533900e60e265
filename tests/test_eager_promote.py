"""Files a build met on the FUSE lower are stubs on the eager tmpfs for the next build
on that lower (sandbox/fsprocess._promote): the same files, in the kernel's hands."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from amberd_process import Daemon
from rootfs import make_busybox_root

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
from fusetrace import FuseTrace, fuse_connections, parse_fuse_trace

MTIME = 1_000_000_000
#: What the step sees of each file: mode, size, mtime, content, inode sharing.
CHECK = (
    "test \\\"$(stat -c '%a %s %Y' /data/a.txt)\\\" = '604 6 1000000000' && "
    'test \\"$(cat /data/a.txt /data/sub/b.h)\\" = \\"$(printf \'alpha\\\\nbeta\')\\" && '
    "test $(stat -c %i /data/l1) = $(stat -c %i /data/l2) && cat /data/l1 | grep -qx linked"
)


def image(d: Daemon) -> None:
    root = make_busybox_root(d.root / "bb")
    (root / "data/sub").mkdir(parents=True)
    (root / "data/a.txt").write_text("alpha\n")
    (root / "data/sub/b.h").write_text("beta\n")
    (root / "data/l1").write_text("linked\n")
    os.link(root / "data/l1", root / "data/l2")
    os.chmod(root / "data/a.txt", 0o604)
    for path in (root / "data/a.txt", root / "data/sub/b.h"):
        os.utime(path, (MTIME, MTIME))
    for path in (root / "data", root / "data/sub", *(root / "data").rglob("*")):
        os.lchown(path, os.stat(root).st_uid, os.stat(root).st_gid)
    assert d.amber("image", "import", "files", f"dir:{root}").returncode == 0


def build(d: Daemon, trace: FuseTrace) -> dict:
    spec = d.root / "spec.toml"
    spec.write_text(
        f'[build]\nname = "promote"\nbase = "files"\nkey_salt = "{uuid.uuid4()}"\n'
        f'[[step]]\nname = "read"\nrun = "{CHECK}"\n'
    )
    trace.take()
    code, report = d.build_json(spec)
    assert code == 0, (report, d.amber("log", report["build"]).stdout.decode())
    assert d.process is not None
    return parse_fuse_trace(trace.take(), fuse_connections(d.process.pid, d.state))


def getxattrs(costs: dict) -> int:
    return costs["GETXATTR"].requests if "GETXATTR" in costs else 0


@pytest.mark.parametrize("promote", [True, False])
def test_the_next_build_asks_the_lower_for_no_xattr_of_a_file_met_before(daemon_root, promote):
    env = {} if promote else {"AMBER_EAGER_PROMOTE": "0"}
    d = Daemon(daemon_root, extra_env=env).start()
    image(d)
    with FuseTrace(f"amber-test-{uuid.uuid4().hex[:8]}") as trace:
        if not trace.available:
            pytest.skip("no tracefs for the kernel's fuse tracepoints")
        first = build(d, trace)
        second = build(d, trace)  # the same lower (sharedlower.py), a new overlay
        third = build(d, trace)
    assert getxattrs(first) >= 2, first  # metacopy and redirect of a.txt, b.h (l1: a link)
    if promote:
        # a.txt and b.h are on the eager tmpfs now; the linked pair stays on FUSE.
        assert getxattrs(second) < getxattrs(first) and getxattrs(third) == getxattrs(second)
    else:
        assert getxattrs(second) == getxattrs(first)
    assert d.stop() == 0
