"""Run a function on a thread with a working directory of its own.

A snapshot lists, stats and lists the xattrs of every new file in an
upper directory. By absolute path the kernel walks every component of the
path each time (a dozen for a build's upper); relative to the working
directory only the name. ``os.lstat`` takes a ``dir_fd``, ``os.listxattr``
does not, so the walk changes directory instead. The working directory is
the process's, shared by all its threads (the daemon's, the filesystem
server's), unless a thread unshares it: ``unshare(CLONE_FS)`` gives the
calling thread its own cwd, root and umask, which nothing else sees and
which end with the thread. So the function runs on a fresh thread that did
so, never on a pooled one that would keep a changed directory.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_FS = 0x200
_libc = ctypes.CDLL(None, use_errno=True)


def run_with_own_cwd(fn: Callable[[bool], T]) -> T:
    """``fn(own)`` on a new thread and its result (or exception).

    ``own`` says whether the thread has a working directory of its own
    (``unshare`` can be refused, e.g. by a seccomp filter): only then may
    ``fn`` change directory.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        own = _libc.unshare(CLONE_FS) == 0
        try:
            result.append(fn(own))
        except BaseException as exc:  # raised again on the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="own-cwd", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
