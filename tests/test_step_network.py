"""What a step reaches: its network namespace (pasta for network = true), no
host abstract sockets, no nested user namespaces. Real sandboxes on a root
that binds the host's /usr and /etc, like the ``host`` base."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from rootfs import sandbox_tmpdir
from second_user import mal_daemon
from test_runner import Output, gateway, serve_http

from amber.sandbox import pasta
from amber.sandbox.runner import StepOutcome, run_step
from amber.sandbox.sandboxerror import SandboxError
from amber.sandbox.sandboxspec import Bind
from amber.sandbox.userns import DEFAULT_ID_BASE

HOST_BINDS = (Bind(Path("/usr"), "/usr"), Bind(Path("/etc"), "/etc"))


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    """Mount points for the host's /usr and /etc, and the merged-/usr links."""
    with sandbox_tmpdir() as parent:
        top = parent / "root"
        for name in ("usr", "etc", "proc", "dev", "tmp", "build"):
            (top / name).mkdir(parents=True)
        for name in ("bin", "sbin", "lib", "lib64"):
            (top / name).symlink_to(f"usr/{name}")
        (top / "tmp").chmod(0o1777)
        for path in (top, *top.iterdir()):
            os.lchown(path, DEFAULT_ID_BASE, DEFAULT_ID_BASE)
        os.chown(top / "build", DEFAULT_ID_BASE + 1000, DEFAULT_ID_BASE + 1000)
        yield top


async def step(
    root: Path, script: str, *, network: bool, user: str = "build"
) -> tuple[StepOutcome, str]:
    output = Output()
    outcome = await run_step(root, script=script, cwd="/build", env={}, network=network,
                             user=user, timeout=30, output=output, extra_binds=HOST_BINDS)  # fmt: skip
    return outcome, output.text


def pasta_pids() -> set[int]:
    """Host pids of running pasta processes (any: the test compares before and after)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(("pasta", "passt")):
                found.add(int(entry))
    return found


CONNECT_ABSTRACT = """python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1].replace("@", "\\0", 1))
print("reached:", s.recv(100).decode())
' {name}"""


@pytest.mark.parametrize("network", [True, False])
async def test_a_step_cannot_reach_the_hosts_abstract_sockets(root: Path, network: bool) -> None:
    name = f"@amber-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(name.replace("@", "\0", 1))
    listener.listen()
    listener.setblocking(False)

    async def answer() -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            conn, _ = listener.accept()
            conn.sendall(b"the host's secret socket")
            conn.close()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            outcome, text = await step(root, CONNECT_ABSTRACT.format(name=name), network=network)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
    assert "secret" not in text
    assert outcome.exit_code == 1 and "ConnectionRefusedError" in text, text


async def test_network_steps_reach_the_host_and_resolve_names(root: Path) -> None:
    """TCP out (the host's loopback, at the gateway address) and DNS as the host resolves."""
    before = pasta_pids()
    expected = subprocess.run(["getent", "hosts", "localhost"], capture_output=True, text=True)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http)
        port = listeners[0].socket.getsockname()[1]
        url = f"http://{gateway()}:{port}/"
        script = f"python3 -c 'import urllib.request; print(urllib.request.urlopen(\"{url}\").read().decode())'"
        outcome, text = await step(root, script, network=True)
        assert outcome.exit_code == 0, text
        assert "hello from the host" in text
        outcome, text = await step(root, f"python3 -c '{script[11:-1]}'", network=False)
        assert outcome.exit_code != 0 and "hello" not in text
        nursery.cancel_scope.cancel()
    host = subprocess.run(["getent", "ahostsv4", "deb.debian.org"], capture_output=True, text=True)
    assert host.returncode == 0, "the host itself cannot resolve deb.debian.org"
    outcome, text = await step(root, "getent ahostsv4 deb.debian.org", network=True)
    assert outcome.exit_code == 0 and text.split()[0] == host.stdout.split()[0], text
    assert expected.returncode == 0
    # pasta ended with the step, and the root user's steps are connected too.
    outcome, text = await step(root, "cat /proc/net/route", network=True, user="root")
    assert outcome.exit_code == 0 and "00000000" in text, text
    assert pasta_pids() <= before


async def test_the_network_namespace_ends_with_the_step(root: Path) -> None:
    """No pasta and no namespace left: the step's namespace is no longer anyone's."""
    before = pasta_pids()
    outcome, text = await step(root, "readlink /proc/self/ns/net", network=True)
    assert outcome.exit_code == 0, text
    netns = text.strip()
    assert netns != os.readlink("/proc/self/ns/net")  # not the host's
    assert pasta_pids() <= before
    assert _holders(netns) == []


CRASHING_DAEMON = """
import os, signal, sys, trio
from pathlib import Path
from amber.sandbox.runner import run_step
from amber.sandbox.sandboxspec import Bind

async def main():
    async def out(chunk):
        print(chunk.decode().strip(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # crash once the step runs
    await run_step(Path(sys.argv[1]), script="readlink /proc/self/ns/net; sleep 1000", cwd="/",
                   env={}, network=True, user="build", timeout=60, output=out,
                   extra_binds=[Bind(Path("/usr"), "/usr"), Bind(Path("/etc"), "/etc")])

trio.run(main)
"""


async def test_a_daemon_crash_leaves_no_pasta_and_no_namespace(root: Path) -> None:
    before = pasta_pids()
    result = await trio.run_process(
        [sys.executable, "-c", CRASHING_DAEMON, str(root)], check=False, capture_stdout=True
    )
    assert result.returncode == -signal.SIGKILL
    netns = result.stdout.decode().strip()
    assert netns.startswith("net:[")
    # Parent-death signals take pasta's keeper, its pid namespace and the sandbox down.
    with trio.fail_after(10):
        while pasta_pids() - before or _holders(netns):
            await trio.sleep(0.05)


def _holders(netns: str) -> list[str]:
    return [entry for entry in os.listdir("/proc") if entry.isdigit() and _netns_of(entry) == netns]


def _netns_of(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


OFFLINE_SCRIPT = """python3 -c '
import socket
s = socket.create_server(("127.0.0.1", 0)); c = socket.create_connection(s.getsockname())
print("loopback works")
'; grep -c . /proc/net/route"""

OFFLINE_DAEMON = """
import sys, trio
from pathlib import Path
from amber.sandbox.runner import run_step
from amber.sandbox.sandboxspec import Bind

async def main():
    async def out(chunk):
        sys.stdout.buffer.write(chunk)
    outcome = await run_step(Path(sys.argv[1]), script=sys.argv[2], cwd="/", env={}, network=True,
                             user="build", timeout=60, output=out,
                             extra_binds=[Bind(Path("/usr"), "/usr"), Bind(Path("/etc"), "/etc")])
    print("exit", outcome.exit_code)

trio.run(main)
"""


async def test_on_an_offline_host_a_network_step_gets_a_loopback(root: Path) -> None:
    """A host with no default route (here: amber in an empty network namespace)."""
    result = await trio.run_process(
        ["unshare", "--net", "--", sys.executable, "-c", OFFLINE_DAEMON, str(root), OFFLINE_SCRIPT],
        check=False, capture_stdout=True, capture_stderr=True,
    )  # fmt: skip
    assert result.stdout.decode().split("\n") == ["loopback works", "1", "exit 0", ""], result


async def test_without_pasta_a_network_step_is_a_clear_error(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    which = pasta.shutil.which
    monkeypatch.setattr(
        pasta.shutil, "which", lambda name: None if name == "pasta" else which(name)
    )
    with pytest.raises(SandboxError) as raised:
        await step(root, "true", network=True)
    assert raised.value.reason == "tool-missing" and "passt" in str(raised.value)
    outcome, _ = await step(root, "true", network=False)  # the others still run
    assert outcome.exit_code == 0


NESTED = {
    "unshare": "unshare -U true",  # unshare(2)
    "clone": "bwrap --unshare-user --ro-bind / / true",  # clone(2) with CLONE_NEWUSER
}


@pytest.mark.parametrize("user", ["build", "root"])
@pytest.mark.parametrize("how", sorted(NESTED))
async def test_a_step_cannot_create_user_namespaces(root: Path, user: str, how: str) -> None:
    outcome, text = await step(root, f"{NESTED[how]} && echo created", network=False, user=user)
    assert "created" not in text
    assert outcome.exit_code != 0, text


THREADS_AND_KEYS = """python3 -c '
import ctypes, os, platform, threading
t = threading.Thread(target=print, args=("thread ran",)); t.start(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
print("child exited", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
libc = ctypes.CDLL(None, use_errno=True)
keyctl = {"x86_64": 250, "aarch64": 219}[platform.machine()]
print("keyctl", libc.syscall(keyctl, 0, -3, 0), os.strerror(ctypes.get_errno()))
'"""


async def test_threads_and_forks_work_but_keyrings_do_not(root: Path) -> None:
    """clone3 fails with ENOSYS and libc falls back to clone; keyctl is refused."""
    outcome, text = await step(root, THREADS_AND_KEYS, network=False)
    assert outcome.exit_code == 0, text
    assert text.splitlines() == [
        "thread ran",
        "child exited 7",
        "keyctl -1 Operation not permitted",
    ], text


MAL_SPEC = """
[build]
name = "reach"
base = "host"

[[step]]
name = "reach"
network = true
run = '''
if python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect("\\0{name}"); print(s.recv(99))'
then echo abstract reached; else echo abstract refused; fi
if unshare -U true; then echo userns made; else echo userns refused; fi
'''
"""


def test_a_second_users_network_step_reaches_no_host_socket_and_makes_no_namespace(
    daemon_root: Path,
) -> None:
    """uid 4242's build, through the real amberd, against a host socket of root's."""
    name = f"amber-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("\0" + name)
    listener.listen()
    listener.settimeout(0.2)
    done = threading.Event()

    def answer() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.sendall(b"the host's secret socket")
            conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with mal_daemon(daemon_root) as mal:
            spec = mal.write("reach/spec.toml", MAL_SPEC.format(name=name))
            built = mal.amber("build", "--json", spec)
            report = json.loads(built.stdout)
            assert report["status"] == "success", (report, built.stderr)
            log = mal.amber("log", report["build"], "--step", "reach").stdout.decode()
    finally:
        done.set()
        thread.join()
        listener.close()
    assert "secret" not in log
    lines = log.splitlines()
    assert "abstract refused" in lines and "userns refused" in lines, log
    assert "ConnectionRefusedError: [Errno 111] Connection refused" in lines, log
