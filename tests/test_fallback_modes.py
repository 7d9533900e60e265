"""The fallback modes end to end, always: what a CI host on Linux < 6.5 runs.

This kernel has data-only overlayfs layers, so amberd is forced into each
fallback (``hidden-data``, then ``fuse-data`` where even that is missing)
with ``AMBER_FS_MODE``. A few scenarios that cross every part of the
filesystem (a build and its cached rebuild, a frozen failure and a shell
into it, an export read by umoci); the whole of test_builds.py,
test_frozen.py, test_export.py and test_overlay.py runs in a mode with
``AMBER_FS_MODE=MODE`` in pytest's environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from amberd_process import Daemon
from rootfs import make_busybox_root
from tools import need, run

SPEC = """
[build]
name = "fallback"
base = "bb"

[[step]]
name = "root-line"
run = "grep ' / / ' /proc/self/mountinfo > /build/mountinfo"

[[step]]
name = "use-the-base"
run = "mkdir out && wc -c < /bin/busybox > out/size && ls /bin | wc -l > out/applets && cp /bin/busybox out/bb && echo {tail} >> out/bb"

[[step]]
name = "fail-or-pass"
run = "echo state > out/state && test {status} = pass"
"""


@pytest.fixture(params=["hidden-data", "fuse-data"])
def fallback(daemon_root: Path, request) -> Daemon:
    daemon = Daemon(daemon_root, extra_env={"AMBER_FS_MODE": request.param}).start()
    daemon.mode = request.param
    root = make_busybox_root(daemon_root / "bbroot")
    imported = daemon.amber("image", "import", "bb", f"dir:{root}")
    assert imported.returncode == 0, imported.stderr
    yield daemon
    assert daemon.stop() == 0, daemon.log.read_text()[-3000:]


def write_spec(daemon: Daemon, status: str, tail: str = "appended") -> Path:
    spec = daemon.root / f"spec-{status}-{tail}" / "spec.toml"
    spec.parent.mkdir(exist_ok=True)
    spec.write_text(SPEC.format(status=status, tail=tail))
    return spec


def test_status_names_the_mode_and_why(fallback: Daemon):
    out = fallback.amber("status")
    assert out.returncode == 0, out.stderr
    expected = f"fs mode: {fallback.mode} (set by AMBER_FS_MODE in the environment)"
    assert expected.encode() in out.stdout
    reply = json.loads(fallback.amber("status", "--json").stdout)
    assert reply["fs_mode"] == fallback.mode


def test_a_build_and_its_cached_rebuild(fallback: Daemon, tmp_path: Path):
    spec = write_spec(fallback, "pass")
    out = tmp_path / "out"
    code, first = fallback.build_json(spec, "--out-link", str(out))
    assert code == 0, first
    assert [s["status"] for s in first["steps"]] == ["ran"] * 3
    code, again = fallback.build_json(spec)
    assert code == 0 and [s["status"] for s in again["steps"]] == ["cached"] * 3
    changed = write_spec(fallback, "pass", tail="other")
    code, third = fallback.build_json(changed)
    assert [s["status"] for s in third["steps"]] == ["cached", "ran", "ran"]
    # The step's root was an overlay without a data-only layer ("A::B"),
    # with the blobs as its bottom layer in hidden-data, without in fuse-data.
    root_line = (out / "build/mountinfo").read_text()
    assert " - overlay " in root_line and "lowerdir=" in root_line and "::" not in root_line
    lowers = root_line.split("lowerdir=")[1].split(",")[0].split(":")
    assert lowers[-1].endswith("/blobs") == (fallback.mode == "hidden-data")
    busybox = (fallback.root / "bbroot/bin/busybox").read_bytes()
    assert (out / "build/out/size").read_text() == f"{len(busybox)}\n"
    assert int((out / "build/out/applets").read_text()) > 100
    assert (out / "build/out/bb").read_bytes() == busybox + b"appended\n"


def test_a_frozen_failure_and_a_shell_into_it(fallback: Daemon):
    code, report = fallback.build_json(write_spec(fallback, "fail"))
    assert code == 1 and report["status"] == "failed" and report["frozen"]
    build = report["build"]
    shell = fallback.amber("shell", build, "--", "cat", "/build/out/state", "/build/out/size")
    assert shell.returncode == 0, shell.stderr
    size = os.stat(fallback.root / "bbroot/bin/busybox").st_size
    assert shell.stdout == f"state\n{size}\n".encode()
    before = fallback.amber("shell", build, "--before", "--", "ls", "/build/out")
    assert before.stdout.split() == [b"applets", b"bb", b"size"]
    code, again = fallback.build_json(write_spec(fallback, "fail"))
    assert code == 1 and again["steps"][-1]["status"] == "cached-failure"


def test_an_export_reads_back_with_umoci(fallback: Daemon, tmp_path: Path):
    need("skopeo", "umoci")
    code, report = fallback.build_json(write_spec(fallback, "fail"))
    assert code == 1
    archive = tmp_path / "export.tar"
    done = fallback.amber("export", report["build"], "-o", str(archive))
    assert done.returncode == 0, done.stderr
    layout = tmp_path / "layout"
    run(["skopeo", "copy", f"oci-archive:{archive}", f"oci:{layout}:img"])
    bundle = tmp_path / "bundle"
    run(["umoci", "unpack", "--rootless", "--image", f"{layout}:img", str(bundle)])
    rootfs = bundle / "rootfs"
    busybox = (fallback.root / "bbroot/bin/busybox").read_bytes()
    assert (rootfs / "bin/busybox").read_bytes() == busybox
    assert (rootfs / "build/out/bb").read_bytes() == busybox + b"appended\n"
    assert (rootfs / "build/out/state").read_text() == "state\n"
