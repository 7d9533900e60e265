"""Running only when nothing else wants the CPU or the disk.

The push queue's process (``pusher.py``) puts itself at ``SCHED_IDLE``,
nice 19 and the idle I/O class (``ioprio_set``, honoured by the BFQ
scheduler): a build on the same machine always goes first, so pushing
never slows it. Linux sets all three per thread; threads inherit them.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: ioprio_set's syscall number by machine (asm-generic numbers for the rest).
_IOPRIO_SET = {"x86_64": 251, "i686": 289, "i386": 289, "armv7l": 314}
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


def make_idle(tid: int) -> None:
    """Put thread ``tid`` last in line for the CPU and the disk (Linux: per thread)."""
    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, tid, 19)
    _syscall(_IOPRIO_SET, 30, IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT)


def name_thread(name: str) -> None:
    """The kernel's name for this thread (``/proc/PID/task/TID/comm``), for ps and tests."""
    try:
        with open("/proc/thread-self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass
