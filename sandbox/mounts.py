"""Mount and unmount with the raw syscalls, and find what is mounted.

Calling libc directly avoids a fork/exec of mount(8) per build step and
lets the caller run the call in a thread (mounting an overlay over a FUSE
lower blocks until the FUSE process answers, so it must not block the loop
that serves FUSE).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MNT_DETACH = 2


class MountError(OSError):
    pass


def _raise(what: str, path: str | bytes) -> None:
    err = ctypes.get_errno()
    raise MountError(err, f"{what} {os.fsdecode(path)}: {os.strerror(err)}")


def mount(source: str, target: str | Path, fstype: str, options: str, flags: int = 0) -> None:
    if (
        _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, options.encode())
        != 0
    ):
        _raise(f"mount -t {fstype} -o {options}", os.fsencode(target))


def umount(target: str | Path, *, lazy: bool = False) -> bool:
    """Unmount; False when nothing was mounted there."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    _raise("umount", os.fsencode(target))
    return False  # unreachable


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(prefix: str | Path) -> list[str]:
    """Mount points at or below ``prefix``, deepest first (unmount order)."""
    prefix = os.path.realpath(prefix)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split(" ", 5)[4])
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(point)
    found.sort(key=lambda p: p.count("/"), reverse=True)
    return found


def unmount_all_under(prefix: str | Path) -> list[str]:
    """Lazily unmount everything below ``prefix``; returns what was unmounted.

    Lazy (MNT_DETACH) because a dead FUSE process leaves its mount answering
    ENOTCONN, and processes may still hold files open inside it.
    """
    done = []
    for point in mounts_under(prefix):
        try:
            if umount(point, lazy=True):
                done.append(point)
        except MountError:
            continue
    return done
