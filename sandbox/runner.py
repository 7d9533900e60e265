"""Run one build step, or an interactive command, in a namespace sandbox.

The sandbox is bubblewrap (``bwrap``) with new user, mount, pid, ipc, uts,
cgroup and (unless asked otherwise) network namespaces, whose ``/`` is a
given directory.

How the user namespace gets a full id map
    bwrap maps a single id by itself. Started by root with ``--userns``, it
    keeps host root's identity for ``--uid 0`` and drops its capabilities
    before mounting for ``--uid 1000``; started as root inside ``unshare
    --map-users``, it can reach uid 1000 only through a nested single-id
    namespace. So bwrap is started (through ``setpriv``) as the host uid the
    sandbox user maps to, creates the user namespace itself and, told so by
    ``--userns-block-fd``, waits: the daemon reads the namespace's first
    process from ``--info-fd``, writes the whole ``0..count-1`` map (only a
    privileged process may map a range), and lets bwrap go on. bwrap never
    runs with host privileges. The price: bwrap resolves the root and bind
    sources as that host uid, so their parent directories must be searchable
    by it (a FUSE root needs ``allow_other``).

How every process of a step ends with it
    The step runs under bwrap's init in a fresh pid namespace (not
    ``--as-pid-1``: the script keeps ordinary signal handling, and orphans
    are reaped during long builds). The init's
    pidfd is opened while bwrap waits for its id map, so it cannot name a
    recycled pid. When the step ends, times out or is cancelled the init is
    killed and waited for, and the kernel empties a pid namespace before it
    reports its init dead: when ``run_step`` returns, nothing of the step
    runs any more. ``--die-with-parent`` covers a daemon crash. The kernel
    sends that signal when the *thread* that forked bwrap exits, so bwrap is
    spawned from the calling trio thread with ``subprocess.Popen`` (vfork,
    well under a millisecond), not with ``trio.lowlevel.open_process``, whose
    worker threads retire after 10 s idle and would kill every sandbox they
    had started.

bwrap's own complaints (a missing cwd, no ``/bin/sh`` in the root) go to a
separate pipe and become a `SandboxError`; ``--json-status-fd`` tells whether
the command was started at all, so a step that fails is never mistaken for a
sandbox that did not start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import termios
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from .command import Identity, Missing, NotExecutable, find_command
from .userns import IdMap, write_id_maps

__all__ = [
    "BUILD_GID",
    "BUILD_UID",
    "DEFAULT_ID_MAP",
    "DEFAULT_PATH",
    "Bind",
    "CommandError",
    "IdMap",
    "OutputCallback",
    "SandboxError",
    "StepOutcome",
    "User",
    "run_interactive",
    "run_step",
]

log = logging.getLogger(__name__)

User = Literal["build", "root"]
OutputCallback = Callable[[bytes], Awaitable[object]]

BUILD_UID = 1000
BUILD_GID = 1000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The build user's home is the private /tmp: dotfiles and caches written there
# stay out of the snapshot, and no /etc/passwd entry is needed.
HOMES: Mapping[str, str] = {"root": "/root", "build": "/tmp"}
HOSTNAME = "amber"
DEFAULT_ID_MAP = IdMap()
# Root inside a step gets Docker's default set, namespaced: enough to install
# packages and chown, without CAP_SYS_ADMIN's kernel surface (mounts, more
# namespaces). The build user gets none.
ROOT_CAPS = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)
# What a step's files get on a workstation (0644, 0755), not amberd's 0077.
STEP_UMASK = 0o022
# bwrap needs milliseconds to start and to die; these only bound a kernel
# or filesystem gone wrong (a process stuck in uninterruptible sleep).
SETUP_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 30.0

# The step's stderr joins its stdout here rather than at bwrap, so that
# bwrap's own error messages stay out of the step's log. SHLVL is unset so the
# script sees the same value as without the wrapper.
_STEP_WRAPPER = 'unset SHLVL; exec 2>&1; exec /bin/sh -ec "$1"'
_READ_SIZE = 65536
_ERRORS_KEPT = 65536
_WINSIZE_POLL = 0.25


class SandboxError(Exception):
    """The sandbox could not run the command: infrastructure trouble.

    Never raised for a command that ran and failed. ``reason`` is stable and
    machine-readable: ``tool-missing``, ``not-root``, ``root-missing``,
    ``setup-failed`` (bwrap refused: missing cwd, no ``/bin/sh``, a root its
    host uid cannot reach), ``id-map-failed``, ``stuck`` (processes that
    would not die).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CommandError(SandboxError):
    """The sandbox is fine but holds no command by that name it could run.

    ``status`` is what a shell exits with: 127 when nothing by that name is
    found, 126 when it is found but cannot be executed (``why`` says how).
    """

    def __init__(self, command: str, status: int, why: str) -> None:
        reason = "command-not-found" if status == 127 else "command-not-executable"
        super().__init__(reason, f"{command}: {why}")
        self.command = command
        self.status = status
        self.why = why


@dataclass(frozen=True)
class StepOutcome:
    """How a step ended.

    ``exit_code`` is the status of the step's shell, None when amber killed
    it. ``signal`` is set for a status of 128+N, the shell's encoding of
    death by signal N (an explicit ``exit 130`` reads the same), or to
    SIGKILL when amber killed the step. A non-zero status is the build's
    failure; ``timed_out`` (and cancellation, which raises instead) are not.
    """

    exit_code: int | None
    signal: int | None
    timed_out: bool
    seconds: float

    @classmethod
    def finished(cls, status: int, seconds: float) -> StepOutcome:
        """The outcome of a step that ended by itself with ``status``."""
        signum = status - 128 if 128 < status <= 128 + signal.SIGRTMAX else None
        return cls(exit_code=status, signal=signum, timed_out=False, seconds=seconds)


@dataclass(frozen=True)
class Bind:
    """A host path shown inside the sandbox (read-only unless ``writable``)."""

    source: Path
    dest: str
    writable: bool = False


@dataclass(frozen=True)
class _Spec:
    """Everything bwrap needs to know about one sandbox."""

    root: Path
    command: tuple[str, ...]
    cwd: str
    user: User
    network: bool
    new_session: bool
    controlling_tty: bool
    private_tmp: bool
    binds: tuple[Bind, ...]


async def run_step(
    root: Path,
    *,
    script: str,
    cwd: str,
    env: Mapping[str, str],
    network: bool,
    user: User,
    timeout: float,
    output: int | OutputCallback,
    id_map: IdMap = DEFAULT_ID_MAP,
    extra_binds: Sequence[Bind] = (),
    private_tmp: bool = True,
    on_start: Callable[[list[int]], None] | None = None,
) -> StepOutcome:
    """Run ``/bin/sh -ec script`` in a sandbox rooted at ``root``.

    The step's stdin is /dev/null; its stdout and stderr, merged, go to
    ``output``: a writable fd handed to the step as is, or an async callback
    awaited with each chunk as it arrives (a slow callback slows the step,
    never loses output). Its environment is exactly ``PATH``, ``HOME``,
    ``TMPDIR`` and ``env`` (which may override them), plus what the shell
    itself sets (``PWD``). ``cwd`` must exist in the root. With
    ``private_tmp`` /tmp is a fresh tmpfs, kept out of the root.
    ``on_start`` gets the sandbox's first pids while they are held before
    the command runs (e.g. to move them into a cgroup that every later
    process of the step inherits); what it raises ends the sandbox.

    Returns:
        How the step ended. It is over when this returns: no process of it
        is left, background ones included.

    Raises:
        SandboxError: the sandbox could not start or could not be torn down.
        ValueError: ``cwd`` or a bind destination is not absolute, or ``env``
            has a name that cannot be one.
        Exception: what the ``output`` callback raised (in an exception
            group), after the sandbox is gone.

    Cancellation kills the whole sandbox, waits until it is gone, and
    re-raises. A timeout does the same and returns ``timed_out=True``.
    """
    spec = _spec(
        root,
        ("/bin/sh", "-c", _STEP_WRAPPER, "/bin/sh", script),
        cwd=cwd,
        user=user,
        network=network,
        new_session=True,
        private_tmp=private_tmp,
        binds=extra_binds,
    )
    step_env = _sandbox_env(user, env)
    started = time.monotonic()
    read_fd = write_fd = None
    try:
        if callable(output):
            read_fd, write_fd = os.pipe()
            stdout = write_fd
        else:
            stdout = output
        async with _open_sandbox(
            spec, id_map=id_map, env=step_env, stdin=subprocess.DEVNULL, stdout=stdout,
            on_start=on_start,
        ) as sandbox:  # fmt: skip
            if write_fd is not None:
                os.close(write_fd)  # the sandbox holds the only write end now
                write_fd = None
            async with trio.open_nursery() as nursery:
                if read_fd is not None:
                    assert callable(output)
                    nursery.start_soon(_pump, read_fd, output)
                    read_fd = None  # _pump owns it now
                with trio.move_on_after(timeout) as deadline:
                    await sandbox.wait()
                seconds = time.monotonic() - started
                # The pump ends at EOF, once no process of the step is left.
                await sandbox.destroy()
    finally:
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
    if deadline.cancelled_caught:
        return StepOutcome(exit_code=None, signal=signal.SIGKILL, timed_out=True, seconds=seconds)
    return StepOutcome.finished(sandbox.result(), seconds)


async def run_interactive(
    root: Path,
    *,
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    user: User,
    stdin: int,
    stdout: int,
    stderr: int,
    id_map: IdMap = DEFAULT_ID_MAP,
    network: bool = False,
    extra_binds: Sequence[Bind] = (),
    private_tmp: bool = True,
) -> int:
    """Run ``argv`` in the same kind of sandbox as a step, on the given fds.

    When ``stdin`` is a terminal the command gets a pseudo-terminal of its
    own as controlling terminal (so a shell has job control), proxied to the
    given terminal, which is put in raw mode meanwhile and has its size
    followed. The command never holds the caller's terminal itself, so it
    cannot push input into it (TIOCSTI) or keep it after it ends. Pass the
    caller's ``TERM`` in ``env``. bwrap's own error messages go to
    ``stderr``.

    Returns:
        The command's exit status (128+N for death by signal N).

    Raises:
        CommandError: ``argv[0]`` is not found in the sandbox, or cannot be
            executed; nothing was started.
        SandboxError: the sandbox could not start (as for `run_step`).

    Cancellation kills the sandbox, waits until it is gone, and re-raises.
    """
    if not argv:
        raise ValueError("argv must name a command")
    on_tty = os.isatty(stdin)
    spec = _spec(
        root,
        tuple(argv),
        cwd=cwd,
        user=user,
        network=network,
        new_session=not on_tty,
        private_tmp=private_tmp,
        binds=extra_binds,
    )
    sandbox_env = _sandbox_env(user, env)
    _check_host(spec)  # before the lookup: a missing root is no missing command
    await trio.to_thread.run_sync(_check_command, spec, id_map, sandbox_env["PATH"])
    if on_tty:
        return await _run_on_pty(spec, id_map, sandbox_env, terminal_in=stdin, terminal_out=stdout)
    async with _open_sandbox(
        spec, id_map=id_map, env=sandbox_env, stdin=stdin, stdout=stdout, stderr=stderr
    ) as sandbox:
        await sandbox.wait()
        await sandbox.destroy()
    return sandbox.result()


def _check_command(spec: _Spec, id_map: IdMap, search_path: str) -> None:
    """Raise `CommandError` where bwrap's ``execvp`` would fail (see command.py)."""
    uid = 0 if spec.user == "root" else BUILD_UID
    who = Identity(
        uid=id_map.host_id(uid),
        gid=id_map.host_id(0 if uid == 0 else BUILD_GID),
        mapped=range(id_map.host_base, id_map.host_base + id_map.count) if uid == 0 else None,
    )
    hidden = ["/proc", "/dev", *(["/tmp"] if spec.private_tmp else [])]
    found = find_command(
        spec.root,
        spec.command[0],
        binds=[(b.source, b.dest) for b in spec.binds],
        hidden=hidden,
        cwd=spec.cwd,
        search_path=search_path,
        who=who,
    )
    if isinstance(found, Missing):
        raise CommandError(spec.command[0], 127, "command not found")
    if isinstance(found, NotExecutable):
        raise CommandError(spec.command[0], 126, f"cannot be executed: {found.why}")


def _spec(
    root: Path,
    command: tuple[str, ...],
    *,
    cwd: str,
    user: User,
    network: bool,
    new_session: bool,
    private_tmp: bool,
    binds: Sequence[Bind],
) -> _Spec:
    """Check the caller's arguments and bundle them."""
    if user not in HOMES:
        raise ValueError(f"user must be 'build' or 'root', not {user!r}")
    if not cwd.startswith("/"):
        raise ValueError(f"cwd must be absolute: {cwd!r}")
    for bind in binds:
        if not bind.dest.startswith("/"):
            raise ValueError(f"bind destination must be absolute: {bind.dest!r}")
    return _Spec(
        root=Path(root),
        command=command,
        cwd=cwd,
        user=user,
        network=network,
        new_session=new_session,
        controlling_tty=not new_session,
        private_tmp=private_tmp,
        binds=tuple(binds),
    )


def _sandbox_env(user: User, env: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a sandboxed command: nothing of the host's."""
    result = {"PATH": DEFAULT_PATH, "HOME": HOMES[user], "TMPDIR": "/tmp"}
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"not a valid environment variable: {name!r}")
        result[name] = value
    return result


def _tool(name: str) -> str:
    """The absolute path of a host program the sandbox needs."""
    path = shutil.which(name)
    if path is None:
        raise SandboxError("tool-missing", f"{name} is not installed (looked in PATH)")
    return path


def _launch_argv(
    spec: _Spec, id_map: IdMap, *, info_fd: int, block_fd: int, status_fd: int
) -> list[str]:
    """The command line that starts bwrap as the sandbox user's host uid."""
    uid, gid = (0, 0) if spec.user == "root" else (BUILD_UID, BUILD_GID)
    argv = [
        _tool("setpriv"),
        f"--reuid={id_map.host_id(uid)}",
        f"--regid={id_map.host_id(gid)}",
        "--clear-groups",
        "--",
    ]
    if spec.controlling_tty:
        # setsid(2), then TIOCSCTTY on stdin: the pty becomes the session's
        # controlling terminal, and bwrap runs without --new-session.
        argv += [_tool("setsid"), "--ctty", "--wait", "--"]
    argv.append(_tool("bwrap"))
    argv += _bwrap_options(spec, info_fd=info_fd, block_fd=block_fd, status_fd=status_fd)
    return [*argv, "--", *spec.command]


def _bwrap_options(spec: _Spec, *, info_fd: int, block_fd: int, status_fd: int) -> list[str]:
    """bwrap's options for ``spec``, with the fds of the start-up handshake."""
    options = ["--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-uts"]
    options += ["--unshare-cgroup-try"]
    if not spec.network:
        options.append("--unshare-net")
    options += ["--userns-block-fd", str(block_fd), "--info-fd", str(info_fd)]
    options += ["--json-status-fd", str(status_fd), "--die-with-parent"]
    if spec.new_session:
        options.append("--new-session")  # no controlling terminal, so no TIOCSTI
    options += ["--hostname", HOSTNAME, "--bind", str(spec.root), "/"]
    options += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
    if spec.private_tmp:
        options += ["--perms", "1777", "--tmpfs", "/tmp"]
    for bind in spec.binds:
        options += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.dest]
    options += ["--chdir", spec.cwd]
    if spec.user == "root":
        for cap in ROOT_CAPS:
            options += ["--cap-add", cap]
    else:
        options += ["--cap-drop", "ALL"]
    return options


class _PidFd:
    """A handle on a process that cannot name a recycled pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = os.pidfd_open(pid)

    def kill(self) -> None:
        """SIGKILL the process, if it still runs."""
        if self._fd is None:
            return
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._fd, signal.SIGKILL)

    async def wait(self) -> None:
        """Return once the process has exited (it may not be reaped yet)."""
        assert self._fd is not None
        await trio.lowlevel.wait_readable(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = None


class _Sandbox:
    """One running bwrap: its monitor process, the namespace's init, and the
    pipes on which bwrap reports."""

    def __init__(self, popen: subprocess.Popen[bytes], status_fd: int, errors_fd: int | None):
        self._popen = popen
        self._monitor = _PidFd(popen.pid)
        self._init: _PidFd | None = None
        self._status_fd: int | None = status_fd
        self._errors_fd = errors_fd
        self._errors_captured = errors_fd is not None
        self._errors = b""
        self._exit_code: int | None = None
        self._destroyed = False
        self._stuck = False

    async def handshake(
        self,
        info_fd: int,
        block_fd: int,
        id_map: IdMap,
        on_start: Callable[[list[int]], None] | None = None,
    ) -> None:
        """Give bwrap's new user namespace its id map and let bwrap go on.

        Takes ownership of both fds. Until the map is written the
        namespace's first process waits, so its pid is still its own.
        """
        try:
            info = await _read_all(info_fd)
            if not info:
                return  # bwrap gave up before creating the namespace
            pid = _child_pid(info)
            self._init = _PidFd(pid)
            try:
                write_id_maps(pid, id_map)
            except OSError as exc:
                raise SandboxError(
                    "id-map-failed", f"cannot map ids of the sandbox: {exc}"
                ) from exc
            if on_start is not None:
                on_start([self._popen.pid, pid])
            os.write(block_fd, b"\0")
        finally:
            os.close(block_fd)

    async def wait(self) -> None:
        """Return once the sandboxed command has ended (its background
        processes may still run until `destroy`)."""
        await self._monitor.wait()
        self._popen.wait()  # exited already: reaps without blocking

    async def destroy(self) -> None:
        """Kill whatever is left and wait until the pid namespace is empty.

        Idempotent; shielded from cancellation, since a half-killed sandbox
        is worse than a late one.
        """
        if self._destroyed:
            return
        self._destroyed = True
        with trio.CancelScope(shield=True):
            if self._init is not None:
                self._init.kill()
            self._monitor.kill()
            with trio.move_on_after(CLEANUP_TIMEOUT) as scope:
                await self.wait()
                if self._init is not None:
                    await self._init.wait()
            if scope.cancelled_caught:
                self._stuck = True
                log.error("sandbox processes did not exit; bwrap pid %d", self._popen.pid)
        self._read_reports()
        for pidfd in (self._monitor, self._init):
            if pidfd is not None:
                pidfd.close()

    def result(self) -> int:
        """The exit status of the sandboxed command, once destroyed.

        Raises:
            SandboxError: the command never started, or outlived its sandbox.
        """
        assert self._destroyed
        if self._stuck:
            raise SandboxError("stuck", "processes of the sandbox did not exit")
        if self._exit_code is None:
            if self._errors_captured:
                message = self._errors.decode(errors="replace").strip() or "bwrap said nothing"
            else:
                message = "bwrap's message went to the command's stderr"
            raise SandboxError("setup-failed", f"the sandbox did not start: {message}")
        return self._exit_code

    def _read_reports(self) -> None:
        """Collect what bwrap wrote on the status and error pipes."""
        if self._status_fd is not None:
            for line in _read_available(self._status_fd).splitlines():
                with suppress(ValueError):
                    report = json.loads(line)
                    if "exit-code" in report:  # written only once the command started
                        self._exit_code = int(report["exit-code"])
            os.close(self._status_fd)
            self._status_fd = None
        if self._errors_fd is not None:
            self._errors = _read_available(self._errors_fd)[-_ERRORS_KEPT:]
            os.close(self._errors_fd)
            self._errors_fd = None


@asynccontextmanager
async def _open_sandbox(
    spec: _Spec,
    *,
    id_map: IdMap,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> AsyncIterator[_Sandbox]:
    """Start a sandbox; nothing of it outlives the block.

    With ``stderr`` None bwrap's messages are captured for `SandboxError`
    (the command must then redirect its own stderr, as the step wrapper does).
    """
    _check_host(spec)
    sandbox = await _start(
        spec, id_map=id_map, env=env, stdin=stdin, stdout=stdout, stderr=stderr, on_start=on_start
    )
    try:
        yield sandbox
    finally:
        await sandbox.destroy()


def _check_host(spec: _Spec) -> None:
    """Fail early, and clearly, where bwrap's message would be obscure."""
    if os.geteuid() != 0:
        raise SandboxError("not-root", "the sandbox maps a range of ids, which needs root")
    if not spec.root.is_dir():
        raise SandboxError("root-missing", f"sandbox root {spec.root} is not a directory")


async def _start(
    spec: _Spec,
    *,
    id_map: IdMap,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int | None,
    on_start: Callable[[list[int]], None] | None = None,
) -> _Sandbox:
    """Spawn bwrap and take it through the id-map handshake.

    The handshake is shielded: it takes milliseconds, and a sandbox left
    half-started could not be killed reliably.
    """
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    status_r, status_w = os.pipe()
    errors_r, errors_w = os.pipe() if stderr is None else (None, None)
    try:
        argv = _launch_argv(spec, id_map, info_fd=info_w, block_fd=block_r, status_fd=status_w)
        popen = _spawn(
            argv,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=errors_w if stderr is None else stderr,
            pass_fds=(info_w, block_r, status_w),
            new_session=not spec.controlling_tty,
        )
    except BaseException:
        for fd in (info_r, block_w, status_r, errors_r):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (info_w, block_r, status_w, errors_w):
            if fd is not None:
                os.close(fd)
    try:
        sandbox = _Sandbox(popen, status_r, errors_r)
    except OSError as exc:  # no pidfd: out of fds, say
        popen.kill()
        popen.wait()
        for fd in (info_r, block_w, status_r, errors_r):
            if fd is not None:
                os.close(fd)
        raise SandboxError("setup-failed", f"cannot watch bwrap: {exc}") from exc
    with trio.CancelScope(shield=True):
        try:
            with trio.fail_after(SETUP_TIMEOUT):
                await sandbox.handshake(info_r, block_w, id_map, on_start)
        except BaseException as exc:
            await sandbox.destroy()
            if isinstance(exc, trio.TooSlowError):
                raise SandboxError("setup-failed", "bwrap did not start in time") from exc
            raise
    return sandbox


def _spawn(
    argv: list[str],
    *,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int,
    pass_fds: tuple[int, ...],
    new_session: bool,
) -> subprocess.Popen[bytes]:
    """Fork bwrap's launcher from this very thread (see the module notes).

    A new session keeps the daemon's terminal signals (^C) from reaching
    bwrap, whose end the daemon decides. The umask is a workstation's,
    whatever amberd's own (0077 under its unit): steps inherit it.
    """
    try:
        return subprocess.Popen(
            argv,
            umask=STEP_UMASK,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            env=dict(env),
            cwd="/",
            start_new_session=new_session,
        )
    except OSError as exc:
        raise SandboxError("tool-missing", f"cannot start {argv[0]}: {exc}") from exc


def _child_pid(info: bytes) -> int:
    """The host pid of the namespace's first process, from --info-fd."""
    try:
        return int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SandboxError("setup-failed", f"unreadable report from bwrap: {info!r}") from exc


async def _read_all(fd: int) -> bytes:
    """Read a pipe to its end; takes ownership of ``fd``."""
    chunks = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(_READ_SIZE):
            chunks.append(chunk)
    return b"".join(chunks)


def _read_available(fd: int) -> bytes:
    """Read what a pipe holds, without blocking on a writer that lingers."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def _pump(fd: int, output: OutputCallback) -> None:
    """Hand the step's output to ``output`` chunk by chunk, to its end."""
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(_READ_SIZE):
            await output(chunk)


async def _run_on_pty(
    spec: _Spec,
    id_map: IdMap,
    env: Mapping[str, str],
    *,
    terminal_in: int,
    terminal_out: int,
) -> int:
    """Run the sandbox on a pty of its own, proxied to the caller's terminal."""
    master, slave = os.openpty()
    try:
        _copy_terminal_settings(terminal_in, slave)
        with _raw_terminal(terminal_in), _kept_blocking_modes(terminal_in, terminal_out):
            async with _open_sandbox(
                spec, id_map=id_map, env=env, stdin=slave, stdout=slave, stderr=slave
            ) as sandbox:
                os.close(slave)
                slave = -1  # only the sandbox holds it: its end reads as EIO
                async with trio.open_nursery() as nursery:
                    drained = trio.Event()
                    nursery.start_soon(_copy_pty_output, master, terminal_out, drained)
                    nursery.start_soon(_copy_bytes, terminal_in, master)
                    nursery.start_soon(_follow_window_size, terminal_in, master)
                    await sandbox.wait()
                    await sandbox.destroy()
                    await drained.wait()
                    nursery.cancel_scope.cancel()
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
    return sandbox.result()


def _copy_terminal_settings(terminal: int, pty: int) -> None:
    """Start the pty with the caller's line settings and size."""
    termios.tcsetattr(pty, termios.TCSANOW, termios.tcgetattr(terminal))
    fcntl.ioctl(pty, termios.TIOCSWINSZ, _window_size(terminal))


def _window_size(terminal: int) -> bytes:
    return fcntl.ioctl(terminal, termios.TIOCGWINSZ, b"\0" * 8)


@contextmanager
def _raw_terminal(terminal: int) -> Iterator[None]:
    """Let keystrokes through untouched: the pty inside does the line editing
    and turns ^C into a signal for the sandbox, not for the caller."""
    saved = termios.tcgetattr(terminal)
    tty.setraw(terminal, termios.TCSANOW)
    try:
        yield
    finally:
        # TCSANOW: TCSADRAIN waits for the client's terminal to take its
        # output, which a stopped or unread terminal never does, on the loop.
        termios.tcsetattr(terminal, termios.TCSANOW, saved)


@contextmanager
def _kept_blocking_modes(*fds: int) -> Iterator[None]:
    """Restore O_NONBLOCK, which trio sets on the open file description the
    caller shares with us."""
    saved = [(fd, os.get_blocking(fd)) for fd in fds]
    try:
        yield
    finally:
        for fd, blocking in saved:
            os.set_blocking(fd, blocking)


async def _copy_bytes(source: int, dest: int) -> None:
    """Copy ``source`` to ``dest`` until either end goes away (on dups)."""
    async with (
        trio.lowlevel.FdStream(os.dup(source)) as reader,
        trio.lowlevel.FdStream(os.dup(dest)) as writer,
    ):
        try:
            while chunk := await reader.receive_some(_READ_SIZE):
                await writer.send_all(chunk)
        except trio.BrokenResourceError:
            pass


async def _copy_pty_output(master: int, terminal_out: int, drained: trio.Event) -> None:
    """Copy the sandbox's terminal output until its last holder is gone."""
    try:
        await _copy_bytes(master, terminal_out)
    finally:
        drained.set()


async def _follow_window_size(terminal: int, pty: int) -> None:
    """Pass size changes of the caller's terminal on to the pty (and so
    SIGWINCH to the sandbox). Polled: SIGWINCH goes to the caller's session,
    not to the daemon."""
    size = _window_size(terminal)
    while True:
        await trio.sleep(_WINSIZE_POLL)
        current = _window_size(terminal)
        if current != size:
            fcntl.ioctl(pty, termios.TIOCSWINSZ, current)
            size = current
