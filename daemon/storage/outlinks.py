"""Checking a result out for ``--out-link``, below a directory the client opened.

amberd never looks up the path a user named: with only its filesystem uid
switched, root keeps CAP_SYS_PTRACE, and ``/proc/PID/cwd`` of a third
user's process would take it into that user's 0700 home. The client, which
is the user, opens the out-link's parent directory and passes it over the
socket (client/userfiles.py); everything here is relative to that
descriptor, one component at a time, never following a link.

The user owns that directory and may change it meanwhile, so the tree is
not written there as the user: it is written by root into a fresh 0700
directory of root's (nobody else can reach into it), given to the user
(``lchown``, which also drops set-id bits and file capabilities), and only
then renamed into place. A previous out-link amber made is moved into that
private directory and removed there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from amber.daemon.errors import BadArgs, NotFound, PermissionDenied
from amber.sandbox.checkout import FOR_USER, PRIVILEGED, CheckoutError, checkout
from amber.sandbox.fsidentity import filesystem_identity
from amber.sandbox.store import Store

if TYPE_CHECKING:
    from amber.daemon.build.build import Build
    from amber.daemon.storage.db import OutLink

OUT_LINK_XATTR = "user.amber.out-link"


@dataclass(frozen=True)
class OutLinkPlace:
    dir_fd: int  # the out-link's parent directory, opened by the client
    name: str  # the out-link's name in it
    shown: str  # the path the user gave, for messages


def checkout_out_link(
    store: Store, digest: bytes, place: OutLinkPlace, build: Build, previous: OutLink | None
) -> tuple[int, int]:
    """Check ``digest`` out at ``place`` for the build's user; returns the directory's (dev, ino).

    The checkout is made aside and renamed into place, so the out-link is
    never half-written, and an out-link made earlier is replaced whole.
    """
    existing = _lstat(place)
    if existing is not None and not _made_by_amber(place, existing, previous, build):
        raise BadArgs(
            f"--out-link {place.shown} exists and is not an out-link amber made; remove it or pick another path",
        )
    try:
        private = _private_dir(place, build.uid, build.gid, build.groups)
    except OSError as exc:
        raise _error(place, exc) from None
    temp, private_fd = private
    try:
        # Root's own out-link too: a step's `chmod 4755` is no setuid-root file unless asked.
        trust = PRIVILEGED if build.uid == 0 and build.out_link_privileged else FOR_USER
        staged = f"/proc/self/fd/{private_fd}/tree"
        checkout(store, digest, staged, owners=False, trust=trust)
        with contextlib.suppress(OSError):  # no user xattrs here: the inode alone tells
            os.setxattr(staged, OUT_LINK_XATTR, build.id.encode())
        if build.uid != 0:
            _give(staged, build.uid, build.gid)
        st = os.stat("tree", dir_fd=private_fd, follow_symlinks=False)
        if _lstat(place) is not None:
            os.rename(place.name, "old", src_dir_fd=place.dir_fd, dst_dir_fd=private_fd)
        os.rename("tree", place.name, src_dir_fd=private_fd, dst_dir_fd=place.dir_fd)
    except (OSError, CheckoutError) as exc:
        raise _error(place, exc) from None
    finally:
        for left in ("tree", "old"):
            shutil.rmtree(left, ignore_errors=True, dir_fd=private_fd)
        os.close(private_fd)
        with contextlib.suppress(OSError):  # by name: whatever the user put there stays theirs
            os.rmdir(temp, dir_fd=place.dir_fd)
    return st.st_dev, st.st_ino


def _error(place: OutLinkPlace, exc: Exception) -> Exception:
    error = PermissionDenied if isinstance(exc, PermissionError) else NotFound
    return error(f"--out-link {place.shown}: {exc}")


def _lstat(place: OutLinkPlace) -> os.stat_result | None:
    try:
        return os.stat(place.name, dir_fd=place.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _made_by_amber(
    place: OutLinkPlace, st: os.stat_result, previous: OutLink | None, build: Build
) -> bool:
    """Whether the entry at ``place`` is the checkout recorded as ``previous``."""
    if previous is None or not stat.S_ISDIR(st.st_mode):
        return False
    if build.uid not in (0, previous.uid):  # another user's, say in a sticky /tmp: theirs to remove
        return False
    if (st.st_dev, st.st_ino) != (previous.dev, previous.ino):
        return False
    try:
        fd = os.open(place.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=place.dir_fd)
    except OSError:
        return False
    try:
        return os.getxattr(fd, OUT_LINK_XATTR) == previous.build_id.encode()
    except OSError as exc:
        # Made where user xattrs are not supported: the inode alone tells.
        return exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    finally:
        os.close(fd)


def _private_dir(
    place: OutLinkPlace, uid: int, gid: int, groups: tuple[int, ...]
) -> tuple[str, int]:
    """A fresh 0700 directory of root's next to the out-link, and an fd of it.

    Made as the user (``mkdir`` with the user's filesystem ids, one component
    below the client's descriptor): only where the user may create an entry
    may root put one, and the directory the client opened may be /etc.
    Then it is made root's; what is opened is checked to be it: a directory
    of root's, 0700 and empty (the user can put nothing in it once it is).
    """
    temp = f".{place.name}.amber-{secrets.token_hex(6)}"
    with filesystem_identity(uid, gid, groups):
        os.mkdir(temp, 0o700, dir_fd=place.dir_fd)
    fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=place.dir_fd)  # fmt: skip
    os.fchown(fd, os.geteuid(), os.getegid())
    os.fchmod(fd, 0o700)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700 or os.listdir(fd):
        os.close(fd)
        raise PermissionError(errno.EPERM, "the staging directory was replaced meanwhile")
    return temp, fd


def _give(top: str, uid: int, gid: int) -> None:
    """``lchown`` everything below ``top`` (root's private directory: nobody else reaches it)."""
    os.chown(top, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
