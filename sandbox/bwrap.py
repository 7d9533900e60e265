"""A running bwrap: started as the sandbox user's host uid, given its id map,
and torn down so that nothing of it is left.

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

import dataclasses
import json
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress

import trio

from .pasta import Pasta, check_pasta, has_default_route, open_netns, start_pasta
from .sandboxerror import SandboxError
from .sandboxspec import SandboxSpec, host_ids, launch_argv
from .seccomp import filter_fd
from .userns import IdMap, write_id_maps

__all__ = ["READ_SIZE", "Sandbox", "check_host", "open_sandbox"]

log = logging.getLogger(__name__)

# bwrap needs milliseconds to start and to die; these only bound a kernel
# or filesystem gone wrong (a process stuck in uninterruptible sleep).
SETUP_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 30.0

READ_SIZE = 65536
_ERRORS_KEPT = 65536


# What a step's files get on a workstation (0644, 0755), not amberd's 0077.
STEP_UMASK = 0o022


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


class Sandbox:
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
        self._pasta: Pasta | None = None

    async def handshake(
        self,
        info_fd: int,
        block_fd: int,
        id_map: IdMap,
        on_start: Callable[[list[int]], None] | None = None,
        network_ids: tuple[int, int] | None = None,
    ) -> None:
        """Give bwrap's new user namespace its id map (and, for a
        network = true step, pasta, for bwrap's host ``network_ids``) and let bwrap go on.

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
            if network_ids is not None:
                netns = open_netns(self._popen.pid, *network_ids)
                self._pasta = await start_pasta(netns)
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
        if self._pasta is not None:
            with trio.move_on_after(CLEANUP_TIMEOUT):
                await self._pasta.stop()  # after the step: nothing of it is left to use the network
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
async def open_sandbox(
    spec: SandboxSpec,
    *,
    id_map: IdMap,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> AsyncIterator[Sandbox]:
    """Start a sandbox; nothing of it outlives the block.

    With ``stderr`` None bwrap's messages are captured for `SandboxError`
    (the command must then redirect its own stderr, as the step wrapper does).
    """
    check_host(spec)
    if spec.network and not has_default_route():
        log.info("the host has no default route: a network = true step gets a loopback only")
        spec = dataclasses.replace(spec, network=False)
    sandbox = await _start(
        spec, id_map=id_map, env=env, stdin=stdin, stdout=stdout, stderr=stderr, on_start=on_start
    )
    try:
        yield sandbox
    finally:
        await sandbox.destroy()


def check_host(spec: SandboxSpec) -> None:
    """Fail early, and clearly, where bwrap's message would be obscure."""
    if os.geteuid() != 0:
        raise SandboxError("not-root", "the sandbox maps a range of ids, which needs root")
    if not spec.root.is_dir():
        raise SandboxError("root-missing", f"sandbox root {spec.root} is not a directory")
    if spec.network:
        check_pasta()


async def _start(
    spec: SandboxSpec,
    *,
    id_map: IdMap,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int | None,
    on_start: Callable[[list[int]], None] | None = None,
) -> Sandbox:
    """Spawn bwrap and take it through the id-map handshake.

    The handshake is shielded: it takes milliseconds, and a sandbox left
    half-started could not be killed reliably.
    """
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    status_r, status_w = os.pipe()
    errors_r, errors_w = os.pipe() if stderr is None else (None, None)
    seccomp = filter_fd()
    try:
        argv = launch_argv(spec, id_map, info_fd=info_w, block_fd=block_r, status_fd=status_w,
                           seccomp_fd=seccomp)  # fmt: skip
        popen = _spawn(
            argv,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=errors_w if stderr is None else stderr,
            pass_fds=(info_w, block_r, status_w, *([seccomp] if seccomp is not None else [])),
            new_session=not spec.controlling_tty,
        )
    except BaseException:
        _close(info_r, block_w, status_r, errors_r)
        raise
    finally:
        _close(info_w, block_r, status_w, errors_w, seccomp)
    try:
        sandbox = Sandbox(popen, status_r, errors_r)
    except OSError as exc:  # no pidfd: out of fds, say
        popen.kill()
        popen.wait()
        _close(info_r, block_w, status_r, errors_r)
        raise SandboxError("setup-failed", f"cannot watch bwrap: {exc}") from exc
    with trio.CancelScope(shield=True):
        try:
            with trio.fail_after(SETUP_TIMEOUT):
                ids = host_ids(spec, id_map) if spec.network else None
                await sandbox.handshake(info_r, block_w, id_map, on_start, ids)
        except BaseException as exc:
            await sandbox.destroy()
            if isinstance(exc, trio.TooSlowError):
                raise SandboxError("setup-failed", "bwrap did not start in time") from exc
            raise
    return sandbox


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


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
        while chunk := await stream.receive_some(READ_SIZE):
            chunks.append(chunk)
    return b"".join(chunks)


def _read_available(fd: int) -> bytes:
    """Read what a pipe holds, without blocking on a writer that lingers."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
