"""amber as a second user meets it: the system socket found, errors that say what to do, and
``amber shell``'s exit codes. The real amberd and the real ``amber`` run as uid 4242.

The system socket is relocated with AMBER_SYSTEM_SOCKET (the packagers' and tests' knob), so
the discovery under test is the one a user gets: no AMBER_SOCKET, no --socket. The group that
may use the socket is ``users`` (the machine has no ``amber`` group; the hints name whichever
group owns the socket).
"""

from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon
from test_frozen import failed_build

GROUP = "users"
SPEC = """
[build]
name = "mine"
base = "host"

[[step]]
name = "hello"
run = "echo hello from $(id -u)"
"""


def as_user(
    system_socket: Path, *args: str, groups: str | None = None
) -> subprocess.CompletedProcess:
    """The real `amber ARGS` as uid 4242, finding the daemon the way a user's amber does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMBER_", "XDG_"))}
    env.update(HOME="/tmp", AMBER_SYSTEM_SOCKET=str(system_socket))
    ids = ["--groups", groups] if groups else ["--clear-groups"]
    cmd = ["setpriv", "--reuid=4242", "--regid=4242", *ids, str(BIN / "amber"), *args]
    return subprocess.run(cmd, capture_output=True, env=env, timeout=600)


@pytest.fixture
def system_daemon(daemon_root: Path):
    """amberd as the systemd units set it up: the socket 0660, owned by the users' group."""
    if GROUP not in {g.gr_name for g in grp.getgrall()}:
        pytest.fail(f"this test needs a group named {GROUP}")
    config = daemon_root / "amberd.toml"
    config.write_text(f'socket-mode = 0o660\nsocket-group = "{GROUP}"\n')
    d = Daemon(daemon_root).start("--config", str(config))
    yield d
    assert d.stop() == 0


def test_a_group_member_finds_the_system_daemon_and_builds(system_daemon: Daemon):
    status = as_user(system_daemon.socket, "status", groups=GROUP)
    assert status.returncode == 0, status.stderr
    assert f"at {system_daemon.socket}" in status.stdout.decode()
    spec = system_daemon.root / "mine.toml"
    spec.write_text(SPEC)
    spec.chmod(0o644)
    build = as_user(system_daemon.socket, "build", str(spec), groups=GROUP)
    assert build.returncode == 0, build.stderr
    builds = as_user(system_daemon.socket, "builds", "--json", groups=GROUP)
    assert b'"uid": 4242' in builds.stdout and b'"status": "success"' in builds.stdout


def test_a_user_outside_the_group_is_told_to_join_it(system_daemon: Daemon):
    proc = as_user(system_daemon.socket, "status")
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert f"cannot reach amberd at {system_daemon.socket}: Permission denied" in err
    assert f"you are not in group {GROUP}" in err
    assert f"`usermod -aG {GROUP} " in err and "log in again" in err
    assert "Traceback" not in err


def test_with_no_system_daemon_the_user_is_told_what_to_ask_for(daemon_root: Path):
    missing = daemon_root / "run" / "amberd.sock"  # the socket unit is not started
    proc = as_user(missing, "status")
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert f"cannot reach amberd at {missing}: No such file or directory" in err
    assert "`systemctl start amberd.socket`" in err
    assert "group amber" in err and "usermod -aG amber" in err
    assert "AMBER_SOCKET=PATH" in err
    assert "/tmp/amber-4242" not in err and "start one with `amberd`" not in err  # root's advice


def test_shell_exits_with_cmd_status_and_125_for_ambers_own_failures(system_daemon: Daemon):
    d = system_daemon
    build = failed_build(d)
    assert d.amber("shell", build, "--", "sh", "-c", "exit 7").returncode == 7
    assert d.amber("shell", build, "--", "sh", "-c", "exit 125").returncode == 125  # CMD's own
    nosuch = d.amber("shell", "nosuch", "--", "true")
    assert nosuch.returncode == 125 and b"no build 'nosuch'" in nosuch.stderr
    unreachable = d.amber("--socket", str(d.root / "none.sock"), "shell", build, "--", "true")
    assert unreachable.returncode == 125 and b"cannot reach amberd" in unreachable.stderr
    other = as_user(d.socket, "shell", build, "--", "true", groups=GROUP)
    assert other.returncode == 125, other.stderr
    assert b"belongs to uid 0" in other.stderr
    denied = as_user(d.socket, "shell", build, "--", "true")  # not even in the group
    assert denied.returncode == 125 and b"Permission denied" in denied.stderr
