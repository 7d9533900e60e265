"""A worker thread that runs only when nothing else wants the CPU or the disk.

The push queue's work (reading the store, hashing, packing, uploading)
runs here, never on the trio loop nor on trio's shared worker threads
(their priority would leak into whatever the build asks of them next).
The thread puts itself at ``SCHED_IDLE``, nice 19 and the idle I/O class
(``ioprio_set``, honoured by the BFQ scheduler): a build on the same
machine always goes first, so pushing never slows it.

A residual risk, said here so no one forgets it: the thread holds the
GIL while it runs Python code; preempted then, the loop waits for it. Its
heavy parts (``read``, ``hashlib``, ``send``) release the GIL, so those
stretches are short.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger("amber.remote")
T = TypeVar("T")

#: ioprio_set's syscall number by machine (asm-generic numbers for the rest).
_IOPRIO_SET = {"x86_64": 251, "i686": 289, "i386": 289, "armv7l": 314}
_IOPRIO_GET = {"x86_64": 252, "i686": 290, "i386": 290, "armv7l": 315}
IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread
IOPRIO_CLASS_IDLE = 3
IOPRIO_CLASS_SHIFT = 13


def _syscall(table: dict[str, int], generic: int, *args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    number = table.get(platform.machine(), generic)
    answer = libc.syscall(number, *[ctypes.c_int(a) for a in args])
    if answer < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return int(answer)


def ioprio_class(tid: int) -> int:
    """The I/O scheduling class of thread ``tid`` (3: idle)."""
    return _syscall(_IOPRIO_GET, 31, IOPRIO_WHO_PROCESS, tid) >> IOPRIO_CLASS_SHIFT


def make_idle(tid: int) -> None:
    """Put thread ``tid`` last in line for the CPU and the disk (Linux: per thread)."""
    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, tid, 19)
    _syscall(_IOPRIO_SET, 30, IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT)


def _name_thread(name: str) -> None:
    """The kernel's name for this thread (``/proc/PID/task/TID/comm``), for ps and tests."""
    try:
        with open("/proc/thread-self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


class IdleWorker:
    """One thread at idle priority; ``await run(fn, ...)`` runs ``fn`` on it."""

    def __init__(self, name: str):
        self.name = name
        self.tid: int | None = None
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once); ``run`` does it too."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        self.tid = threading.get_native_id()
        try:
            make_idle(self.tid)
        except OSError as exc:  # a kernel or container without it: still a background thread
            log.warning("%s: cannot lower its priority: %s", self.name, exc)
        _name_thread(self.name)  # named once lowered: who finds it by name finds it idle
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, token, done, box = job
            box.append(outcome.capture(fn))
            with contextlib.suppress(trio.RunFinishedError):  # the daemon is gone
                token.run_sync_soon(done.set)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the idle thread; cancelled, the waiting stops (``fn`` goes on)."""
        self.start()
        done, box = trio.Event(), []
        self._jobs.put((lambda: fn(*args), trio.lowlevel.current_trio_token(), done, box))
        await done.wait()
        return box[0].unwrap()

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
