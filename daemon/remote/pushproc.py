"""amberd's side of the push process (``pusher.py``): start it, feed it, restart it.

One job at a time over a SOCK_SEQPACKET socketpair only amberd holds the
other end of. The child is forked from the loop's thread, which lives as
long as amberd (``PR_SET_PDEATHSIG`` follows the thread that forked).
A child that dies mid-job loses nothing: the job is still in the
database's queue, the caller sees ``PusherLost`` (an ``OSError``: a
failed attempt, retried), and the next job starts a new child, after a
pause that doubles with each death in a row.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from typing import Any

import trio

from amber.daemon.remote.pusher import ERRORS, MAX_ERROR_TEXT, MAX_MESSAGE, Setup

log = logging.getLogger("amber.remote")
MAX_PAUSE = 60.0


class PusherLost(OSError):
    """The push process ended (or was killed) before it answered."""


class PusherProcess:
    """The child, started when first needed; ``await run(job)`` is its answer."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.proc: subprocess.Popen | None = None
        self._sock: trio.socket.SocketType | None = None
        self._lock = trio.Lock()
        self._pause = 0.0  # before the next start: grows while children die

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        """Start the child unless it runs (after the pause its predecessors' deaths earned)."""
        if self.proc is not None:
            return
        await trio.sleep(self._pause)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, "-I", "-m", "amber.daemon.remote.pusher",
                   str(theirs.fileno()), str(os.getpid())]  # fmt: skip
        try:
            self.proc = subprocess.Popen(command, pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL, cwd="/")  # fmt: skip
            ours.send(json.dumps(self.setup.__dict__).encode())
        except BaseException:
            ours.close()
            self._died()
            raise
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        log.info("push process started (pid %d)", self.proc.pid)

    async def run(self, job: dict[str, Any]) -> Any:
        """The child's answer to ``job``; its error raised again as the class it was."""
        async with self._lock:
            await self.start()
            assert self._sock is not None
            try:
                await self._sock.send(json.dumps(job).encode())
                data = await self._sock.recv(MAX_MESSAGE + 1)  # more: cut off, not an answer
            except OSError:
                data = b""
            except BaseException:  # cancelled mid-job: its answer would answer the next one
                self._died()
                raise
            answer = _answer(data)
            if answer is None:
                self._died()
                raise PusherLost("the push process ended before it answered; it will be restarted")
            self._pause = 0.0
        if "error" in answer:
            cls = dict(ERRORS).get(answer["error"], OSError)
            raise cls(str(answer.get("message", ""))[:MAX_ERROR_TEXT])
        return answer.get("ok")

    def _died(self) -> None:
        """The child ended or must: kill and reap it; the next start waits longer."""
        pid, code = self.pid, self.close()
        if pid is not None:
            log.warning("push process (pid %d) ended with %s", pid, code)
        self._pause = min(max(self._pause * 2, 1.0), MAX_PAUSE)

    def close(self) -> int | None:
        """Kill and reap the child (it may be gone already; amberd may be stopping: it has
        nothing to finish that the queue lacks); its exit status."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        proc.kill()
        return proc.wait()


def _answer(data: bytes) -> dict[str, Any] | None:
    """The child's answer, or None when it is none (it ended, or sent what is not one)."""
    if not data or len(data) > MAX_MESSAGE:
        return None
    try:
        answer = json.loads(data)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None
