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
_libc.unshare.argtypes = [ctypes.c_int]

MNT_DETACH = 2
MS_NOSUID = 2
MS_NODEV = 4
#: What every mount amber makes carries: a build root holds files a step or an
#: imported layer chose, setuid bits and device nodes included; nothing there
#: may grant privileges or reach a device (a sandbox's /dev comes from bwrap).
SAFE_FLAGS = MS_NOSUID | MS_NODEV


class MountError(OSError):
    pass


def _raise(what: str, path: str | bytes) -> None:
    err = ctypes.get_errno()
    raise MountError(err, f"{what} {os.fsdecode(path)}: {os.strerror(err)}")


def mount(
    source: str, target: str | Path, fstype: str, options: str, flags: int = SAFE_FLAGS
) -> None:
    """mount(2); ``nosuid,nodev`` unless the caller passes other ``flags``."""
    if (
        _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, options.encode())
        != 0
    ):
        _raise(f"mount -t {fstype} -o {options}", os.fsencode(target))


_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19


def enter_private_namespace() -> None:
    """Move this process into its own mount namespace, the host's mounts seen one way.

    Build roots mounted afterwards exist only here and in the children
    (filesystem processes, sandboxes): no other local user can reach them at
    their path under the state directory, whatever started the daemon (a
    systemd unit, an auto-start, a root shell). Slave propagation: mounts
    the host makes later still appear here, none of ours leave. The mounts
    die with the last process of the namespace, so a crash leaves none behind.
    Call it before any thread starts (unshare(2) applies to the calling thread).
    """
    if _libc.unshare(_CLONE_NEWNS) != 0:  # os.unshare is Python 3.12's
        _raise("unshare(CLONE_NEWNS) for", "/")
    mount("none", "/", "none", "", _MS_REC | _MS_SLAVE)


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


def mounts_under(prefix: str | Path, pid: int | str = "self") -> list[str]:
    """Mount points at or below ``prefix``, deepest first (unmount order).

    As process ``pid`` sees them: amberd's build roots are in its own mount
    namespace (`enter_private_namespace`).
    """
    prefix = os.path.realpath(prefix)
    found = []
    with open(f"/proc/{pid}/mountinfo") as f:
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
