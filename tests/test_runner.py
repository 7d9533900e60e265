"""Real sandboxes on a busybox root: what a step can and cannot do."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import sys
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from rootfs import make_busybox_root, sandbox_tmpdir

from amber.sandbox.runner import StepOutcome, run_interactive, run_step
from amber.sandbox.sandboxerror import SandboxError
from amber.sandbox.sandboxspec import Bind
from amber.sandbox.userns import DEFAULT_ID_BASE, IdMap


class Output:
    """Collects a step's output chunks with their arrival times."""

    def __init__(self, on_text: tuple[str, Callable[[], None]] | None = None) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.on_text = on_text  # (text, action): act once the output so far starts with text

    async def __call__(self, chunk: bytes) -> None:
        self.chunks.append((time.monotonic(), chunk))
        if self.on_text is not None and self.text.startswith(self.on_text[0]):
            self.on_text[1]()
            self.on_text = None

    @property
    def text(self) -> str:
        return b"".join(chunk for _, chunk in self.chunks).decode()


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    with sandbox_tmpdir() as path:
        yield path


@pytest.fixture
def root(base_dir: Path) -> Path:
    """A fresh busybox root, with a sibling directory to catch escapes."""
    case = base_dir / uuid.uuid4().hex[:12]
    (case / "outside").mkdir(parents=True)
    (case / "outside" / "canary").write_text("untouched\n")
    return make_busybox_root(case / "root")


@pytest.fixture
def marker() -> Iterator[str]:
    """A string to tag sandboxed processes with; any still running at the
    end of the test fails it, and is killed by pid."""
    tag = f"amber-marker-{uuid.uuid4().hex}"
    yield tag
    left = processes_with(tag)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived their sandbox: {left}"


def command_lines() -> dict[int, bytes]:
    """Every host process but this one, with its NUL-separated arguments."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read()
        except OSError:
            continue
    return found


def processes_with(text: str) -> list[int]:
    """Host pids whose command line contains ``text`` (bwrap and the step's
    shells carry the script, so this finds every process of a step)."""
    return [pid for pid, cmdline in command_lines().items() if text.encode() in cmdline]


def looping(marker: str) -> str:
    """Script text starting a background process that carries ``marker``
    (a loop, so the shell cannot exec its way out of it)."""
    return f"sh -c '{LOOP}' {marker} &"


LOOP = "while :; do sleep 1; done"


def loops_with(marker: str) -> list[int]:
    """Host pids of the background processes started by `looping`."""
    wanted = f"sh\0-c\0{LOOP}\0{marker}\0".encode()
    return [pid for pid, cmdline in command_lines().items() if cmdline == wanted]


async def step(
    root: Path,
    script: str,
    *,
    user: str = "build",
    cwd: str = "/build",
    env: dict[str, str] | None = None,
    network: bool = False,
    timeout: float = 20,
    **kwargs,
) -> tuple[StepOutcome, str]:
    output = Output()
    outcome = await run_step(
        root,
        script=script,
        cwd=cwd,
        env=env or {},
        network=network,
        user=user,
        timeout=timeout,
        output=output,
        **kwargs,
    )
    return outcome, output.text


# --- exit status -----------------------------------------------------------


async def test_success_and_exit_codes(root: Path) -> None:
    started = time.monotonic()
    outcome, text = await step(root, "echo hello")
    took = time.monotonic() - started
    assert (outcome.exit_code, outcome.signal, outcome.timed_out) == (0, None, False)
    assert text == "hello\n"
    assert 0 < outcome.seconds <= took  # the step's own time, within the call's

    outcome, _ = await step(root, "exit 3")
    assert outcome.exit_code == 3

    outcome, text = await step(root, "echo before; false; echo after")
    assert outcome.exit_code == 1  # sh -e stops at the first failure
    assert text == "before\n"


async def test_signal_raised_by_the_build(root: Path) -> None:
    outcome, _ = await step(root, "kill -TERM $$")
    assert outcome.exit_code == 128 + signal.SIGTERM
    assert outcome.signal == signal.SIGTERM
    assert not outcome.timed_out


# --- output ----------------------------------------------------------------


async def test_output_is_merged_and_streamed_live(root: Path) -> None:
    # The step waits until the test has seen its first output: were output
    # passed on only at the end, it would wait until its timeout.
    go = root / f"go-{uuid.uuid4().hex[:8]}"
    output = Output(on_text=("out\n", lambda: go.touch()))
    try:
        outcome = await run_step(
            root,
            script=f"echo out; echo err >&2; while [ ! -e /{go.name} ]; do sleep 0.01; done; "
            "echo late",
            cwd="/",
            env={},
            network=False,
            user="build",
            timeout=20,
            output=output,
        )
    finally:
        go.unlink(missing_ok=True)
    assert not outcome.timed_out, "the first output did not arrive while the step ran"
    assert outcome.exit_code == 0
    assert output.text == "out\nerr\nlate\n"


async def test_output_to_a_file_descriptor(root: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as f:
        outcome = await run_step(
            root,
            script="echo to-fd; echo also-stderr >&2",
            cwd="/",
            env={},
            network=False,
            user="build",
            timeout=20,
            output=f.fileno(),
        )
    assert outcome.exit_code == 0
    assert log.read_text() == "to-fd\nalso-stderr\n"


async def test_huge_output_is_not_lost(root: Path) -> None:
    outcome, text = await step(root, "seq 1 200000")
    assert outcome.exit_code == 0
    assert text == "".join(f"{i}\n" for i in range(1, 200001))


# --- environment, cwd, identity ---------------------------------------------


async def test_environment_is_cleared(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBER_HOST_SECRET", "leaked")
    outcome, text = await step(root, "env", env={"CFLAGS": "-O2", "A": "b c"})
    assert outcome.exit_code == 0
    env = dict(line.split("=", 1) for line in text.splitlines())
    assert "AMBER_HOST_SECRET" not in env
    assert env["CFLAGS"] == "-O2" and env["A"] == "b c"
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    # Only what the shell adds on its own besides ours.
    assert set(env) - {"CFLAGS", "A", "HOME", "TMPDIR", "PATH"} <= {"PWD", "SHLVL"}

    _, text = await step(root, "echo $HOME", user="root", cwd="/")
    assert text == "/root\n"
    _, text = await step(root, "echo $PATH", env={"PATH": "/bin"})
    assert text == "/bin\n"


async def test_cwd(root: Path) -> None:
    (root / "build" / "sub").mkdir()
    _, text = await step(root, "pwd", cwd="/build/sub")
    assert text == "/build/sub\n"


async def test_identity_inside(root: Path) -> None:
    _, text = await step(root, "id -u; id -g; hostname")
    assert text.split() == ["1000", "1000", "amber"]
    _, text = await step(root, "id -u; id -g", user="root", cwd="/")
    assert text.split() == ["0", "0"]
    assert not (root / "etc" / "passwd").exists()


async def test_files_appear_on_the_host_with_shifted_ids(root: Path) -> None:
    outcome, _ = await step(
        root, "touch /by-root && touch /chowned && chown 1000:1000 /chowned", user="root", cwd="/"
    )
    assert outcome.exit_code == 0
    outcome, _ = await step(root, "touch /build/by-build")
    assert outcome.exit_code == 0
    owners = {
        name: (os.stat(path).st_uid, os.stat(path).st_gid)
        for name, path in [
            ("root", root / "by-root"),
            ("chowned", root / "chowned"),
            ("build", root / "build" / "by-build"),
        ]
    }
    base = DEFAULT_ID_BASE  # sandbox ids 0.. are host ids from here
    assert owners == {
        "root": (base, base),
        "chowned": (base + 1000, base + 1000),
        "build": (base + 1000, base + 1000),
    }


async def test_other_id_map(base_dir: Path) -> None:
    id_map = IdMap(host_base=200000, count=65536)
    root = make_busybox_root(base_dir / uuid.uuid4().hex[:12], id_map=id_map)
    outcome, text = await step(root, "id -u; touch f", id_map=id_map)
    assert outcome.exit_code == 0 and text == "1000\n"
    assert os.stat(root / "build" / "f").st_uid == 201000


async def test_privileges(root: Path) -> None:
    _, text = await step(root, "grep -E '^(NoNewPrivs|CapEff|CapBnd)' /proc/self/status")
    fields = dict(line.split(":\t") for line in text.splitlines())
    assert fields == {"NoNewPrivs": "1", "CapEff": "0000000000000000", "CapBnd": "0000000000000000"}

    _, text = await step(
        root, "grep -E '^(NoNewPrivs|CapEff)' /proc/self/status", user="root", cwd="/"
    )
    fields = dict(line.split(":\t") for line in text.splitlines())
    assert fields["NoNewPrivs"] == "1"
    cap_sys_admin = 1 << 21
    cap_chown = 1 << 0
    caps = int(fields["CapEff"], 16)
    assert caps & cap_chown and not caps & cap_sys_admin


async def test_build_user_cannot_write_roots_files(root: Path) -> None:
    _, text = await step(root, "touch /bin/owned 2>&1 || echo refused")
    assert "refused" in text
    assert not (root / "bin" / "owned").exists()


# --- isolation ---------------------------------------------------------------


async def test_cannot_see_host_processes(root: Path) -> None:
    outcome, text = await step(root, "ps -o pid,comm; echo ---; ls /proc")
    assert outcome.exit_code == 0
    ps, proc = text.split("---\n")
    # bwrap's init (pid 1), the step's shell and ps: nothing of the host.
    assert {line.split()[1] for line in ps.splitlines()[1:]} <= {"bwrap", "sh", "ps"}
    pids = [int(entry) for entry in proc.split() if entry.isdigit()]
    assert 1 in pids and max(pids) < 10


async def serve_http(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A one-line HTTP server on the host's loopback."""

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        body = b"hello from the host\n"
        head = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        await stream.send_all(head + body)
        await stream.aclose()

    await trio.serve_tcp(handle, 0, host="127.0.0.1", task_status=task_status)


async def test_network_is_off_unless_asked(root: Path) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http)
        port = listeners[0].socket.getsockname()[1]
        url = f"http://127.0.0.1:{port}/"
        outcome, text = await step(root, f"wget -q -O - {url}")
        assert outcome.exit_code != 0, text
        assert "hello from the host" not in text

        _, text = await step(root, "ip link 2>/dev/null || ifconfig -a")
        assert "eth" not in text

        # With network = true the step has a namespace of its own (pasta's):
        # its 127.0.0.1 is its own, the host's loopback is at the gateway.
        outcome, text = await step(root, f"wget -q -O - {url}", network=True)
        assert outcome.exit_code != 0 and "hello" not in text, text
        host_url = f"http://{gateway()}:{port}/"
        outcome, text = await step(root, f"wget -q -O - {host_url}", network=True)
        assert outcome.exit_code == 0, text
        assert text == "hello from the host\n"
        nursery.cancel_scope.cancel()


def gateway() -> str:
    """The host's default gateway, where pasta maps the host's loopback."""
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    pytest.fail("the host has no default route")


async def test_cannot_write_outside_its_root(root: Path) -> None:
    script = (
        "echo inside > /written-at-slash; "
        "cd /..; echo up > /../escaped 2>/dev/null || true; "
        "echo x > ../../outside/canary 2>/dev/null || true; "
        "ls /..; ls -a / > /listing"
    )
    outcome, text = await step(root, script, user="root", cwd="/")
    assert outcome.exit_code == 0, text
    assert (root / "written-at-slash").read_text() == "inside\n"
    assert (root / "escaped").read_text() == "up\n"  # /.. is / inside
    assert (root.parent / "outside" / "canary").read_text() == "untouched\n"
    assert sorted(os.listdir(root.parent)) == ["outside", "root"]
    assert "outside" not in (root / "listing").read_text()


async def test_private_tmp_stays_out_of_the_root(root: Path) -> None:
    outcome, _ = await step(root, "echo x > /tmp/scratch; test -w /dev/shm")
    assert outcome.exit_code == 0
    assert not (root / "tmp" / "scratch").exists()
    outcome, _ = await step(root, "echo x > /tmp/kept", user="root", cwd="/", private_tmp=False)
    assert outcome.exit_code == 0
    assert (root / "tmp" / "kept").exists()


async def test_extra_binds(root: Path, base_dir: Path) -> None:
    source = base_dir / f"src-{uuid.uuid4().hex[:8]}"
    source.mkdir()
    (source / "input").write_text("data\n")
    (root / "src").mkdir()
    outcome, text = await step(
        root,
        "cat /src/input; echo no > /src/input",
        extra_binds=[Bind(source, "/src")],
    )
    assert outcome.exit_code != 0
    assert text.startswith("data\n")
    assert (source / "input").read_text() == "data\n"


# --- lifetime ----------------------------------------------------------------


async def test_no_background_process_survives(root: Path, marker: str) -> None:
    seen_running: list[int] = []

    async def look_while_running() -> None:
        await trio.sleep(0.5)
        seen_running.extend(loops_with(marker))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look_while_running)
        outcome, _ = await step(root, f"{looping(marker)} sleep 1; echo done")
    assert outcome.exit_code == 0
    assert seen_running, "no background loop seen: this test would prove nothing"
    # Checked at once: run_step waits until the pid namespace is empty.
    assert processes_with(marker) == []


async def test_timeout_kills_the_whole_sandbox(root: Path, marker: str) -> None:
    started = time.monotonic()
    outcome, text = await step(
        root, f"echo begun; {looping(marker)} sleep 1000; echo finished", timeout=0.5
    )
    took = time.monotonic() - started
    assert text == "begun\n"  # stopped at its timeout, not at its end
    assert processes_with(marker) == []  # its background loop went with it
    assert outcome.timed_out
    assert outcome.exit_code is None and outcome.signal == signal.SIGKILL
    assert 0.5 <= outcome.seconds <= took  # not killed before its timeout
    assert processes_with(marker) == []


async def test_cancellation_kills_the_whole_sandbox(root: Path, marker: str) -> None:
    output = Output()
    seen_running: list[int] = []
    with trio.move_on_after(0.5) as scope:
        async with trio.open_nursery() as nursery:

            async def look_while_running() -> None:
                await trio.sleep(0.3)
                seen_running.extend(loops_with(marker))

            nursery.start_soon(look_while_running)
            await run_step(
                root,
                script=f"echo begun; {looping(marker)} sleep 1000",
                cwd="/",
                env={},
                network=False,
                user="build",
                timeout=60,
                output=output,
            )
            pytest.fail("run_step returned although cancelled")
    assert scope.cancelled_caught
    assert seen_running
    assert processes_with(marker) == []
    assert output.text == "begun\n"


async def test_spawning_thread_retiring_does_not_kill_steps(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bwrap's --die-with-parent follows the thread that forked it; trio's
    worker threads retire when idle, so steps must not be forked from one."""
    import trio._core._thread_cache as thread_cache  # private: the knob this test needs

    monkeypatch.setattr(thread_cache, "IDLE_TIMEOUT", 0.05)
    async with trio.open_nursery() as nursery:

        async def churn_threads() -> None:
            for _ in range(10):
                await trio.to_thread.run_sync(lambda: None)
                await trio.sleep(0.1)

        nursery.start_soon(churn_threads)
        outcome, text = await step(root, "sleep 1.5; echo survived")
    assert outcome.exit_code == 0 and text == "survived\n"


async def test_concurrent_steps(root: Path) -> None:
    results: list[str] = []

    async def one(i: int) -> None:
        outcome, text = await step(root, f"sleep 0.2; echo {i}")
        assert outcome.exit_code == 0
        results.append(text.strip())

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert sorted(results, key=int) == [str(i) for i in range(8)]


# --- infrastructure errors -------------------------------------------------


async def test_missing_root_is_a_sandbox_error(base_dir: Path) -> None:
    with pytest.raises(SandboxError) as info:
        await step(base_dir / "no-such-root", "true")
    assert info.value.reason == "root-missing"


async def test_missing_cwd_is_a_sandbox_error(root: Path) -> None:
    with pytest.raises(SandboxError) as info:
        await step(root, "true", cwd="/no/such/dir")
    assert info.value.reason == "setup-failed"
    assert "/no/such/dir" in str(info.value)


async def test_root_without_shell_is_a_sandbox_error(base_dir: Path) -> None:
    empty = base_dir / f"empty-{uuid.uuid4().hex[:8]}"
    empty.mkdir()
    for name in ("proc", "dev", "tmp"):
        (empty / name).mkdir()
    with pytest.raises(SandboxError) as info:
        await step(empty, "true", cwd="/")
    assert info.value.reason == "setup-failed"
    assert "/bin/sh" in str(info.value)


async def test_missing_bwrap_is_a_sandbox_error(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxError) as info:
        await step(root, "true")
    assert info.value.reason == "tool-missing"


async def test_failing_step_is_not_a_sandbox_error(root: Path) -> None:
    outcome, text = await step(root, "echo oops >&2; exit 42")
    assert outcome.exit_code == 42 and text == "oops\n"


def test_bad_arguments_are_value_errors(root: Path) -> None:
    with pytest.raises(ValueError):
        trio.run(lambda: step(root, "true", cwd="relative"))
    with pytest.raises(ValueError):
        trio.run(lambda: step(root, "true", env={"A=B": "c"}))


# --- interactive -------------------------------------------------------------


async def test_interactive_with_pipes(root: Path) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.write(in_w, b"typed\n")
    os.close(in_w)
    try:
        status = await run_interactive(
            root,
            argv=["/bin/sh", "-c", "read x; echo got:$x; echo err >&2; id -u; exit 5"],
            cwd="/build",
            env={},
            user="build",
            stdin=in_r,
            stdout=out_w,
            stderr=err_w,
        )
        os.close(out_w)
        os.close(err_w)
        out_w = err_w = -1
        assert status == 5
        assert os.read(out_r, 4096) == b"got:typed\n1000\n"
        assert os.read(err_r, 4096) == b"err\n"
    finally:
        for fd in (in_r, out_r, err_r, out_w, err_w):
            if fd >= 0:
                os.close(fd)


async def test_interactive_on_a_terminal(root: Path) -> None:
    """The command gets a controlling terminal of its own, the caller's
    terminal is raw meanwhile and restored after, and its size is passed on."""
    user_master, user_slave = os.openpty()
    fcntl.ioctl(user_slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    before = termios.tcgetattr(user_slave)
    output = bytearray()
    try:

        async def read_screen() -> None:
            while True:
                await trio.lowlevel.wait_readable(user_master)
                try:
                    chunk = os.read(user_master, 4096)
                except OSError:
                    return
                output.extend(chunk)

        async def type_when_prompted() -> None:
            while b"ready" not in output:
                await trio.sleep(0.02)
            os.write(user_master, b"hello\r")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_screen)
            nursery.start_soon(type_when_prompted)
            script = "stty size; echo ready; read x < /dev/tty; echo got:$x; exit 7"
            status = await run_interactive(
                root,
                argv=["/bin/sh", "-c", script],
                cwd="/build",
                env={"TERM": "dumb"},
                user="build",
                stdin=user_slave,
                stdout=user_slave,
                stderr=user_slave,
            )
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        screen = output.decode(errors="replace")
        assert status == 7, screen
        assert "40 100" in screen
        assert "got:hello" in screen
        assert termios.tcgetattr(user_slave) == before
        assert os.get_blocking(user_slave)
    finally:
        os.close(user_master)
        os.close(user_slave)


CRASHING_DAEMON = """
import os, signal, sys, trio
from pathlib import Path
from amber.sandbox.runner import run_step

async def main():
    async def out(chunk):
        os.kill(os.getpid(), signal.SIGKILL)  # crash once the step runs
    await run_step(Path(sys.argv[1]), script=sys.argv[2], cwd="/", env={}, network=False,
                   user="build", timeout=60, output=out)

trio.run(main)
"""


async def test_daemon_crash_leaves_no_sandbox_behind(root: Path, marker: str) -> None:
    script = f"{looping(marker)} sleep 0.3; echo running; sleep 1000"
    result = await trio.run_process(
        [sys.executable, "-c", CRASHING_DAEMON, str(root), script], check=False
    )
    assert result.returncode == -signal.SIGKILL
    # The kernel's parent-death signals travel down bwrap's chain on their own.
    with trio.fail_after(5):
        while processes_with(marker):
            await trio.sleep(0.05)
