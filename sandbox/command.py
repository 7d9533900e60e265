"""Find a command inside a sandbox the way ``execvp`` will, before starting it.

bwrap reports a command it cannot exec only as a message on the command's
own stderr and a status of 1, which cannot be told from bwrap failing to set
up (or from the command exiting 1). Looking the command up first lets the
caller answer like a shell: 127 for a command not found, 126 for one found
that cannot be executed.

The lookup sees what the sandbox will see: the root directory with the bind
mounts over it. Paths are resolved one component at a time, every symbolic
link expanded against the sandbox's own ``/`` (never the host's) and every
directory checked for search permission as the sandbox user, so a link in a
user's tree never leads the root daemon outside it. Where the sandbox sees a
filesystem the lookup cannot (``/proc``, ``/dev``, a private ``/tmp``), it
answers "unknown" and leaves the verdict to ``execvp``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Found", "Lookup", "Missing", "NotExecutable", "Unknown", "find_command"]

_MAX_LINKS = 40  # the kernel's limit (MAXSYMLINKS)
_CONTINUE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # execvp tries the next PATH entry


@dataclass(frozen=True)
class Found:
    path: str


@dataclass(frozen=True)
class Missing:
    """``execvp`` will fail with ENOENT: a shell's 127."""


@dataclass(frozen=True)
class NotExecutable:
    """``execvp`` will fail with EACCES (or the like): a shell's 126."""

    why: str


@dataclass(frozen=True)
class Unknown:
    """The command lies where only the sandbox can look."""


Lookup = Found | Missing | NotExecutable | Unknown


@dataclass(frozen=True)
class Identity:
    """Who runs the command, in host ids: what the kernel checks permissions with."""

    uid: int
    gid: int
    #: The host ids the sandbox's user namespace maps; sandbox root's
    #: capabilities count only on files whose owner and group are among them.
    mapped: range | None  # None: no capabilities (the build user)


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class _View:
    """The sandbox's file tree, seen from the host."""

    def __init__(
        self, root: Path, binds: Sequence[tuple[Path, str]], hidden: Sequence[str], who: Identity
    ) -> None:
        mounts = [(_parts(dest), Path(source)) for source, dest in binds]
        self._mounts = sorted(mounts, key=lambda m: len(m[0]), reverse=True)
        self._root = root
        self._hidden = [_parts(p) for p in hidden]
        self._who = who

    def host(self, parts: tuple[str, ...]) -> Path:
        for dest, source in self._mounts:
            if parts[: len(dest)] == dest:
                return source.joinpath(*parts[len(dest) :])
        return self._root.joinpath(*parts)

    def hidden(self, parts: tuple[str, ...]) -> bool:
        return any(parts[: len(h)] == h for h in self._hidden)

    def may(self, st: os.stat_result, bit: int) -> bool:
        """Whether the sandbox user has permission ``bit`` (1 = x, 4 = r) on ``st``."""
        who = self._who
        if who.mapped is not None and st.st_uid in who.mapped and st.st_gid in who.mapped:
            # CAP_DAC_OVERRIDE: anything, except exec of a file without any x bit.
            return bit != 1 or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        if st.st_uid == who.uid:
            shift = 6
        elif st.st_gid == who.gid:
            shift = 3
        else:
            shift = 0
        return bool((st.st_mode >> shift) & bit)

    def resolve(self, path: str, cwd: tuple[str, ...]) -> tuple[tuple[str, ...], os.stat_result]:
        """``path``'s target in the sandbox, links followed.

        Raises:
            _Fail: with the errno the kernel would give.
            _Hidden: the path enters a filesystem only the sandbox sees.
        """
        resolved: list[str] = [] if path.startswith("/") else list(cwd)
        pending = list(reversed(path.split("/")))
        links = 0
        st = self._lstat(tuple(resolved))
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise _Fail(errno.ENOTDIR)
            if not self.may(st, 1):
                raise _Fail(errno.EACCES)
            if name == "..":
                if resolved:
                    resolved.pop()
                st = self._lstat(tuple(resolved))
                continue
            here = (*resolved, name)
            if self.hidden(here):
                raise _Hidden
            child = self._lstat(here)
            if stat.S_ISLNK(child.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    raise _Fail(errno.ELOOP)
                target = os.readlink(self.host(here))
                if target.startswith("/"):
                    resolved = []
                    st = self._lstat(())
                pending.extend(reversed(target.split("/")))
                continue
            resolved.append(name)
            st = child
        return tuple(resolved), st

    def _lstat(self, parts: tuple[str, ...]) -> os.stat_result:
        try:
            return os.lstat(self.host(parts))
        except FileNotFoundError:
            raise _Fail(errno.ENOENT) from None
        except NotADirectoryError:
            raise _Fail(errno.ENOTDIR) from None
        except OSError as exc:
            raise _Fail(exc.errno or errno.EIO) from None


class _Hidden(Exception):
    """The path enters a filesystem the lookup cannot see."""


def find_command(
    root: Path,
    name: str,
    *,
    binds: Sequence[tuple[Path, str]],
    hidden: Sequence[str],
    cwd: str,
    search_path: str,
    who: Identity,
) -> Lookup:
    """What ``execvp(name)`` will find in the sandbox rooted at ``root``.

    ``binds`` are (host source, sandbox destination) pairs mounted over the
    root, ``hidden`` the sandbox paths of filesystems only the sandbox sees,
    ``search_path`` the PATH ``execvp`` searches.
    """
    view = _View(root, binds, hidden, who)
    try:
        here, _ = view.resolve(cwd, ())
    except (_Fail, _Hidden):
        here = tuple(_parts(cwd))  # bwrap will complain about the cwd itself
    if not name:
        return Missing()
    if "/" in name:
        candidates = [name]
    else:
        candidates = [f"{d}/{name}" if d else name for d in search_path.split(":")]
    denied: str | None = None
    for candidate in candidates:
        try:
            parts, st = view.resolve(candidate, here)
        except _Hidden:
            return Unknown()
        except _Fail as exc:
            if exc.code in _CONTINUE and "/" not in name:
                continue
            if exc.code in (errno.ENOENT, errno.ENOTDIR):
                return Missing()
            why = os.strerror(exc.code).lower()
            if "/" in name:
                return NotExecutable(why)
            denied = denied or why
            continue
        if stat.S_ISREG(st.st_mode) and view.may(st, 1):
            return Found("/" + "/".join(parts))
        why = "is a directory" if stat.S_ISDIR(st.st_mode) else "permission denied (not executable)"
        if "/" in name:
            return NotExecutable(why)
        denied = denied or why
    return NotExecutable(denied) if denied else Missing()


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p and p != ".")
