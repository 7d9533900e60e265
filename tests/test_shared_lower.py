"""A build's FUSE lower outlives it, for the next build on the same tree (sandbox/sharedlower.py).

Checked from outside, as an administrator would: the FUSE mounts in amberd's
mount namespace (its /proc/PID/mountinfo) and the processes serving them, and
what each build's steps could see.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from amberd_process import Daemon
from rootfs import make_busybox_root


def fuse_mounts(d: Daemon) -> list[tuple[int, str]]:
    """(mount id, mount point) of every FUSE mount below the daemon's state directory."""
    assert d.process is not None
    prefix = os.path.realpath(d.state) + "/"
    found = []
    with open(f"/proc/{d.process.pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype.startswith("fuse") and fields[4].startswith(prefix):
                found.append((int(fields[0]), fields[4]))
    return sorted(found)


def fuse_servers(d: Daemon) -> set[int]:
    """Pids of amberd's children holding /dev/fuse open (a mounted lower's server)."""
    assert d.process is not None
    pids = set()
    for task in Path(f"/proc/{d.process.pid}/task").iterdir():
        pids |= {int(p) for p in (task / "children").read_text().split()}
    serving = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except FileNotFoundError:
            continue
        if any(_link(fd) == "/dev/fuse" for fd in fds):
            serving.add(pid)
    return serving


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def busybox_image(d: Daemon) -> str:
    root = d.root / "bb"
    make_busybox_root(root)
    assert d.amber("image", "import", "busybox", f"dir:{root}").returncode == 0
    return "busybox"


def spec(d: Daemon, *steps: str) -> Path:
    """A one-base spec with a fresh key salt: nothing of it is cached."""
    path = d.root / f"spec-{uuid.uuid4().hex[:8]}.toml"
    body = "".join(f'[[step]]\nname = "s{i}"\nrun = "{run}"\n' for i, run in enumerate(steps))
    path.write_text(
        f'[build]\nname = "shared"\nbase = "busybox"\nkey_salt = "{uuid.uuid4()}"\n{body}'
    )
    return path


def mount_phases(d: Daemon, build: str) -> dict[str, float]:
    shown = json.loads(d.amber("show", "--json", build).stdout)
    return {k: v for k, v in shown["steps"][0]["phases"].items() if k.startswith("mount")}


def test_the_next_build_on_the_tree_reuses_the_lower_and_sees_only_its_own_upper(daemon_root):
    d = Daemon(daemon_root).start()
    busybox_image(d)
    code, first = d.build_json(spec(d, "echo one > /build/mine-1"))
    assert code == 0, first
    kept = fuse_mounts(d)
    assert len(kept) == 1, kept  # idle after the build, waiting for the next
    servers = fuse_servers(d)
    assert len(servers) == 1
    code, second = d.build_json(spec(d, "test ! -e /build/mine-1 && echo two > /build/mine-2"))
    assert code == 0, second  # the first build's files are in its upper, gone with it
    assert fuse_mounts(d) == kept  # the very same FUSE mount served the second build
    assert fuse_servers(d) == servers
    assert "mount.eager" in mount_phases(d, first["build"])
    reused = mount_phases(d, second["build"])
    assert "mount.attach" in reused and "mount.eager" not in reused, reused
    code, third = d.build_json(spec(d, "test ! -e /build/mine-2 && test ! -e /build/mine-1"))
    assert code == 0, third
    assert d.stop() == 0
    # Stopping amberd stops the idle lower's process: nothing is left mounted or serving.
    assert not any(alive(pid) for pid in servers)


def test_builds_running_at_once_get_their_own_lower_and_upper(daemon_root):
    d = Daemon(daemon_root).start()
    busybox_image(d)
    specs = [
        spec(d, f"echo {me} > /build/{me} && sleep 3 && test ! -e /build/{other}")
        for me, other in (("a", "b"), ("b", "a"))
    ]
    results: list[tuple[int, dict]] = []
    threads = [threading.Thread(target=lambda s=s: results.append(d.build_json(s))) for s in specs]
    for t in threads:
        t.start()
    seen = 0
    deadline = time.monotonic() + 20
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        seen = max(seen, len(fuse_mounts(d)))
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert [code for code, _ in results] == [0, 0], results
    assert seen == 2  # two id ranges, two lowers: running builds never share one
    assert d.stop() == 0


def test_the_lower_goes_when_its_linger_is_over(daemon_root):
    d = Daemon(daemon_root, extra_env={"AMBER_LOWER_LINGER": "1"}).start()
    busybox_image(d)
    code, report = d.build_json(spec(d, "true"))
    assert code == 0, report
    servers = fuse_servers(d)
    assert len(fuse_mounts(d)) == 1 and len(servers) == 1
    mnt = d.state / "mnt"

    def gone() -> bool:
        return not fuse_mounts(d) and not any(map(alive, servers)) and not any(mnt.iterdir())

    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fuse_mounts(d) == []
    assert not any(alive(pid) for pid in servers)
    assert [p.name for p in mnt.iterdir()] == []  # its directory and the build's upper too
    assert d.stop() == 0


def test_with_no_linger_the_lower_is_unmounted_when_the_build_ends(daemon_root):
    d = Daemon(daemon_root, extra_env={"AMBER_LOWER_LINGER": "0"}).start()
    busybox_image(d)
    for _ in range(2):
        code, report = d.build_json(spec(d, "true"))
        assert code == 0, report
        assert fuse_mounts(d) == [] and fuse_servers(d) == set()
        assert "mount.eager" in mount_phases(d, report["build"])  # every mount is fresh
    # The builds' work directories (their uppers) are deleted after the builds
    # reported, not before: gone soon, and none left by the stop.
    mnt = d.state / "mnt"
    deadline = time.monotonic() + 10
    while any(mnt.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(mnt.iterdir()) == []
    assert d.stop() == 0


def test_a_crashed_amberd_leaves_no_idle_lower_behind(daemon_root):
    import signal

    d = Daemon(daemon_root).start()
    busybox_image(d)
    code, report = d.build_json(spec(d, "true"))
    assert code == 0, report
    servers = fuse_servers(d)
    assert len(servers) == 1 and len(fuse_mounts(d)) == 1
    d.stop(signal.SIGKILL)
    # Its control channel closed with amberd: the idle process unmounts and exits.
    deadline = time.monotonic() + 10
    while any(map(alive, servers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in servers)
    d.start()  # the next amberd removes what the last one left in its mount directory
    assert fuse_mounts(d) == [] and list((d.state / "mnt").iterdir()) == []
    code, report = d.build_json(spec(d, "true"))
    assert code == 0, report
    assert d.stop() == 0


def test_a_kept_lower_serves_again_after_gc_took_its_tree_and_sources(daemon_root):
    d = Daemon(daemon_root).start()
    busybox_image(d)
    (d.root / "input.txt").write_text("the source, by content\n")

    def with_source(run: str) -> Path:
        path = spec(d, run)
        text = path.read_text().replace(
            "\n[[step]]", '\n[[source]]\npath = "input.txt"\n[[step]]', 1
        )
        path.write_text(text)
        return path

    code, report = d.build_json(with_source("grep -q 'by content' input.txt"))
    assert code == 0, report
    kept = fuse_mounts(d)
    gc = d.amber("gc", "--json")
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["trees"] >= 1  # the build's trees went
    # The same sources again: the same tree, laid out (and stored) anew, on the kept lower.
    code, report = d.build_json(with_source("grep -q 'by content' input.txt && cat input.txt"))
    assert code == 0, report
    assert fuse_mounts(d) == kept
    assert "mount.attach" in mount_phases(d, report["build"])
    log = d.amber("log", report["build"], "--step", "s0")
    assert b"the source, by content" in log.stdout
    assert d.stop() == 0
