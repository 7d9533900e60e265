"""Run one build step, or an interactive command, in a namespace sandbox.

The sandbox is bubblewrap (``bwrap``) with new user, mount, pid, ipc, uts,
cgroup and (unless asked otherwise) network namespaces, whose ``/`` is a
given directory.

How the sandbox starts and ends (the id-map handshake, the pid namespace
that takes every process of a step with it) is in bwrap.py; what it is and
the bwrap command line in sandboxspec.py; the pty of a shell in ptyproxy.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .bwrap import READ_SIZE, check_host, open_sandbox
from .command import Identity, Missing, NotExecutable, find_command
from .ptyproxy import run_on_pty
from .sandboxerror import CommandError
from .sandboxspec import (
    BUILD_GID,
    BUILD_UID,
    Bind,
    SandboxSpec,
    User,
    make_spec,
    sandbox_environment,
)
from .userns import IdMap

__all__ = [
    "DEFAULT_ID_MAP",
    "OutputCallback",
    "StepOutcome",
    "run_interactive",
    "run_step",
]

OutputCallback = Callable[[bytes], Awaitable[object]]

DEFAULT_ID_MAP = IdMap()

# The step's stderr joins its stdout here rather than at bwrap, so that
# bwrap's own error messages stay out of the step's log. SHLVL is unset so the
# script sees the same value as without the wrapper.
_STEP_WRAPPER = 'unset SHLVL; exec 2>&1; exec /bin/sh -ec "$1"'


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
    #: Of ``seconds``, the part before the command could run (bwrap's spawn
    #: and id-map handshake); and after it, tearing the sandbox down.
    start_seconds: float = 0.0
    end_seconds: float = 0.0

    @classmethod
    def finished(cls, status: int, seconds: float, **timings: float) -> StepOutcome:
        """The outcome of a step that ended by itself with ``status``."""
        signum = status - 128 if 128 < status <= 128 + signal.SIGRTMAX else None
        return cls(exit_code=status, signal=signum, timed_out=False, seconds=seconds, **timings)


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
    spec = make_spec(
        root,
        ("/bin/sh", "-c", _STEP_WRAPPER, "/bin/sh", script),
        cwd=cwd,
        user=user,
        network=network,
        new_session=True,
        private_tmp=private_tmp,
        binds=extra_binds,
    )
    step_env = sandbox_environment(user, env)
    return await _supervise(spec, id_map, step_env, output, timeout, on_start)


async def _supervise(
    spec: SandboxSpec,
    id_map: IdMap,
    env: Mapping[str, str],
    output: int | OutputCallback,
    timeout: float,
    on_start: Callable[[list[int]], None] | None,
) -> StepOutcome:
    """`run_step`'s sandbox: start it, pump its output, end it by ``timeout``."""
    started = time.monotonic()
    read_fd = write_fd = None
    try:
        if callable(output):
            read_fd, write_fd = os.pipe()
            stdout = write_fd
        else:
            stdout = output
        async with open_sandbox(
            spec, id_map=id_map, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
            on_start=on_start,
        ) as sandbox:  # fmt: skip
            start_seconds = time.monotonic() - started
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
                end_seconds = time.monotonic() - started - seconds
    finally:
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
    timings = {"start_seconds": start_seconds, "end_seconds": end_seconds}
    if deadline.cancelled_caught:
        return StepOutcome(exit_code=None, signal=signal.SIGKILL, timed_out=True, seconds=seconds,
                           **timings)  # fmt: skip
    return StepOutcome.finished(sandbox.result(), seconds, **timings)


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
    spec = make_spec(
        root,
        tuple(argv),
        cwd=cwd,
        user=user,
        network=network,
        new_session=not on_tty,
        private_tmp=private_tmp,
        binds=extra_binds,
    )
    sandbox_env = sandbox_environment(user, env)
    check_host(spec)  # before the lookup: a missing root is no missing command
    await trio.to_thread.run_sync(_check_command, spec, id_map, sandbox_env["PATH"])
    if on_tty:
        return await run_on_pty(spec, id_map, sandbox_env, terminal_in=stdin, terminal_out=stdout)
    async with open_sandbox(
        spec, id_map=id_map, env=sandbox_env, stdin=stdin, stdout=stdout, stderr=stderr
    ) as sandbox:
        await sandbox.wait()
        await sandbox.destroy()
    return sandbox.result()


def _check_command(spec: SandboxSpec, id_map: IdMap, search_path: str) -> None:
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


async def _pump(fd: int, output: OutputCallback) -> None:
    """Hand the step's output to ``output`` chunk by chunk, to its end."""
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(READ_SIZE):
            await output(chunk)
