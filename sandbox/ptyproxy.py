"""A sandbox on a pseudo-terminal of its own, proxied to the caller's terminal."""

from __future__ import annotations

import fcntl
import os
import termios
import tty
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import trio

from .bwrap import READ_SIZE, open_sandbox
from .sandboxspec import SandboxSpec
from .userns import IdMap

__all__ = ["run_on_pty"]

_WINSIZE_POLL = 0.25


async def run_on_pty(
    spec: SandboxSpec,
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
            async with open_sandbox(
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
            while chunk := await reader.receive_some(READ_SIZE):
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
