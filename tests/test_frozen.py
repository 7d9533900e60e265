"""Frozen failures: shell (through a real pseudo-terminal), diff, ownership."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

from amberd_process import BIN, Daemon
from rootfs import make_busybox_root

FAILING = """
[build]
name = "frozen"
base = "host"

[[step]]
name = "prepare"
run = "mkdir -p src && echo kept > src/kept && echo doomed > src/doomed && printf 'payload\\\\000bytes' > src/data.bin"

[[step]]
name = "compile"
cwd = "src"
env = { STEP_FLAVOUR = "spicy" }
run = "rm doomed && echo new > added && echo 'cc: fatal error: no input files' >&2 && exit 4"
"""


def failed_build(amberd: Daemon) -> str:
    spec_dir = amberd.root / "frozen"
    spec_dir.mkdir(exist_ok=True)
    (spec_dir / "spec.toml").write_text(FAILING)
    code, report = amberd.build_json(spec_dir / "spec.toml")
    assert code == 1 and report["status"] == "failed" and report["frozen"]
    return report["build"]


def test_shell_command_sees_the_state_at_failure_and_before(amberd: Daemon):
    build = failed_build(amberd)
    out = amberd.amber(
        "shell", build, "--", "sh", "-c", "pwd; echo $STEP_FLAVOUR; ls; cat data.bin"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split(b"\n")
    assert lines[0] == b"/build/src"  # the failed step's cwd
    assert lines[1] == b"spicy"  # and its environment
    assert b"added" in out.stdout and b"doomed" not in out.stdout.split(b"payload")[0]
    assert out.stdout.endswith(b"payload\x00bytes")
    before = amberd.amber("shell", build, "--before", "--", "ls")
    assert before.stdout.split() == [b"data.bin", b"doomed", b"kept"]
    step = amberd.amber("shell", build, "--step", "prepare", "--", "cat", "/build/src/doomed")
    assert step.stdout == b"doomed\n"
    status = amberd.amber("shell", build, "--", "sh", "-c", "exit 5")
    assert status.returncode == 5


def test_shell_changes_never_touch_the_frozen_state(amberd: Daemon):
    build = failed_build(amberd)
    assert (
        amberd.amber(
            "shell", build, "--", "sh", "-c", "rm -rf /build/src && touch /build/scribble"
        ).returncode
        == 0
    )
    again = amberd.amber(
        "shell", build, "--", "sh", "-c", "ls /build/src && test ! -e /build/scribble"
    )
    assert again.returncode == 0 and b"added" in again.stdout


def test_diff_shows_what_the_failing_step_did(amberd: Daemon):
    build = failed_build(amberd)
    with amberd.connect() as conn:
        result = conn.call("diff", build=build)
    kinds = {(c["kind"], c["path"]) for c in result["changes"]}
    assert ("added", "/build/src/added") in kinds
    assert ("deleted", "/build/src/doomed") in kinds
    assert result["step"] == "compile"
    text = amberd.amber("diff", build)
    assert text.returncode == 0 and b"/build/src/added" in text.stdout


def read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"never saw {needle!r}; got:\n{seen.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_interactive_shell_through_a_pty(amberd: Daemon):
    build = failed_build(amberd)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "amber"), "shell", build],
        stdin=slave, stdout=slave, stderr=slave, env=dict(amberd.env, TERM="xterm"),
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    try:
        banner = read_until(master, b"/build/src")  # the prompt shows the failed step's cwd
        assert b"compile" in banner
        os.write(master, b"echo answer=$((6*7)); touch /build/src/from-shell\r")
        read_until(master, b"answer=42")
        os.write(master, b"exit\r")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    check = amberd.amber("shell", build, "--", "test", "!", "-e", "/build/src/from-shell")
    assert check.returncode == 0  # the frozen state is unchanged


def test_another_user_cannot_shell_export_or_delete(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text("socket-mode = 0o666\n")
    d = Daemon(daemon_root).start("--config", str(config))
    try:
        build = failed_build(d)
        other = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", str(BIN / "amber")]
        env = dict(d.env, HOME="/tmp")
        for args in (
            ["shell", build, "--", "true"],
            ["export", build, "-o", "/tmp/x.tar"],
            ["delete", build],
        ):
            proc = subprocess.run(other + args, capture_output=True, env=env)
            assert proc.returncode != 0, args
            assert b"belongs to uid 0" in proc.stderr, proc.stderr
        listing = subprocess.run([*other, "builds", "--json"], capture_output=True, env=env)
        assert build not in json.loads(listing.stdout)["builds"].__repr__()
        assert d.amber("delete", build).returncode == 0  # the owner may
    finally:
        assert d.stop() == 0


def test_shell_command_not_found_exits_127_and_one_not_executable_126(amberd: Daemon):
    build = failed_build(amberd)
    missing = amberd.amber("shell", build, "--", "nosuchcmd", "--flag")
    assert missing.returncode == 127, missing.stderr
    assert f"amber shell: nosuchcmd: command not found in build {build}".encode() in missing.stderr
    assert amberd.amber("shell", build, "--", "./nope").returncode == 127  # relative to the cwd
    for command, why in (
        ("/etc/passwd", b"permission denied"),  # there, but no x bit
        ("./added", b"permission denied"),  # made by the failed step, in its cwd
        ("/build", b"is a directory"),
    ):
        denied = amberd.amber("shell", build, "--", command)
        assert denied.returncode == 126, (command, denied.stderr)
        assert f"amber shell: {command}: cannot be executed".encode() in denied.stderr
        assert why in denied.stderr
    # what is there still runs, through PATH and the host base's /bin -> usr/bin link
    assert amberd.amber("shell", build, "--", "true").returncode == 0
    assert amberd.amber("shell", build, "--", "/bin/true").returncode == 0
    assert b"Traceback" not in amberd.log.read_bytes()  # a user's slip is no amberd bug


def test_a_link_in_the_frozen_tree_is_looked_up_inside_it_not_on_the_host(amberd: Daemon):
    """The lookup runs as root on the host: an absolute link must mean the sandbox's path."""
    outside = amberd.root / "host-only"
    outside.mkdir()
    (outside / "tool").write_text("#!/bin/sh\necho escaped\n")
    (outside / "tool").chmod(0o755)
    spec_dir = amberd.root / "links"
    spec_dir.mkdir()
    (spec_dir / "spec.toml").write_text(
        '[build]\nname = "links"\nbase = "host"\n'
        f'[[step]]\nname = "link"\nrun = "ln -s {outside}/tool escape && ln -s loop loop && exit 2"\n'
    )
    code, report = amberd.build_json(spec_dir / "spec.toml")
    assert code == 1 and report["frozen"], report
    build = report["build"]
    escape = amberd.amber("shell", build, "--", "./escape")
    assert escape.returncode == 127, escape.stderr  # dangling inside the sandbox
    assert b"./escape: command not found" in escape.stderr
    loop = amberd.amber("shell", build, "--", "./loop")
    assert loop.returncode == 126 and b"too many levels of symbolic links" in loop.stderr


def test_a_tree_without_bin_sh(amberd: Daemon):
    """A command runs without /bin/sh; a shell into such a tree says what is missing."""
    root = amberd.root / "bb"
    make_busybox_root(root)
    assert amberd.amber("image", "import", "busybox", f"dir:{root}").returncode == 0
    spec_dir = amberd.root / "nosh"
    spec_dir.mkdir()
    (spec_dir / "spec.toml").write_text(
        '[build]\nname = "nosh"\nbase = "busybox"\n'
        '[[step]]\nname = "break"\nuser = "root"\nrun = "rm /bin/sh && exit 3"\n'
    )
    code, report = amberd.build_json(spec_dir / "spec.toml")
    assert code == 1 and report["frozen"], report
    build = report["build"]
    echo = amberd.amber("shell", build, "--", "/bin/busybox", "echo", "no sh needed")
    assert echo.returncode == 0 and echo.stdout == b"no sh needed\n", echo.stderr
    assert amberd.amber("shell", build, "--", "ls", "/bin/ls").stdout == b"/bin/ls\n"
    sh = amberd.amber("shell", build, "--", "sh", "-c", "true")
    assert sh.returncode == 127 and b"amber shell: sh: command not found" in sh.stderr
    # no command: the interactive shell, which this tree lacks
    shell = amberd.amber("shell", build, input=b"")
    assert shell.returncode == 127, shell.stderr
    assert b"amber shell: /bin/sh: command not found" in shell.stderr
