"""Materialising a tree as a plain directory.

Content is copied from blobs (holes kept), then metadata is applied in the
order the kernel requires (``apply_metadata``), directories after their
children (so read-only directories can be filled and their mtimes survive).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import tree as treefmt
from .fileio import data_ranges
from .store import Store
from .tree import Entry
from .userns import IDENTITY, IdMap


class CheckoutError(Exception):
    pass


@dataclass(frozen=True)
class Trust:
    """What a checkout may carry beyond plain content: who gets it decides.

    A tree holds whatever an image or a step put there. Written by root for
    someone, a set-id bit, a file capability (``security.capability`` is
    set even under a user's filesystem uid: CAP_SETFCAP stays) or a device
    node is a privilege handed out.
    """

    setid: bool  # setuid and setgid bits
    xattrs: tuple[bytes, ...]  # xattr names kept: exact, or prefixes ending in "."
    devices: bool  # character and block devices

    def keeps_xattr(self, name: bytes) -> bool:
        return any(name.startswith(p) if p.endswith(b".") else name == p for p in self.xattrs)


_ACLS = (b"system.posix_acl_access", b"system.posix_acl_default")
#: Everything the tree holds, for root's own copies (tests, tools).
FAITHFUL = Trust(setid=True, xattrs=(b"",), devices=True)
#: A checkout handed to a user (or to root who did not ask for more):
#: no set-id bits, only user xattrs and ACLs, no devices.
FOR_USER = Trust(setid=False, xattrs=(b"user.", *_ACLS), devices=False)
#: Root asked explicitly (``--out-link-privileged``): set-id bits, ``security.*``
#: and devices too; ``trusted.*`` never (it steers the kernel, not the file).
PRIVILEGED = Trust(setid=True, xattrs=(b"user.", b"security.", *_ACLS), devices=True)


def checkout(
    store: Store,
    digest: bytes,
    dest: str | Path,
    *,
    ids: IdMap = IDENTITY,
    owners: bool | None = None,
    trust: Trust = FAITHFUL,
) -> None:
    """Write tree ``digest`` into ``dest`` (created; must not hold anything).

    ``owners`` defaults to applying uids/gids when running as root.
    ``trust`` says what may be written beyond content (``FOR_USER`` for
    anything another uid will own or use).
    """
    dest_b = os.fsencode(dest)
    try:
        os.mkdir(dest_b, 0o700)
    except FileExistsError:
        if os.listdir(dest_b):
            raise CheckoutError(f"checkout target {dest} is not empty") from None
    writer = _Writer(store, ids, os.geteuid() == 0 if owners is None else owners, trust)
    writer.fill(digest, dest_b)
    os.chmod(dest_b, 0o755)


class _Writer:
    def __init__(self, store: Store, ids: IdMap, owners: bool, trust: Trust):
        self.store = store
        self.ids = ids
        self.owners = owners
        self.trust = trust
        self.links: dict[tuple, bytes] = {}

    def fill(self, digest: bytes, path: bytes) -> None:
        for entry in self.store.get_tree(digest):
            child = path + b"/" + entry.name
            if entry.kind == treefmt.DIR:
                os.mkdir(child, 0o700)
                self.fill(entry.ref, child)
            elif not self._make(entry, child):
                continue  # a further name of a hard-link group: metadata is shared
            self._apply(entry, child)

    def _make(self, e: Entry, path: bytes) -> bool:
        if e.kind == treefmt.FILE:
            if e.link is not None:
                key = treefmt.link_group(e)
                first = self.links.get(key)
                if first is not None:
                    os.link(first, path)
                    return False
                self.links[key] = path
            self._write_file(e, path)
        elif e.kind == treefmt.SYMLINK:
            os.symlink(e.ref, path)
        elif e.kind == treefmt.FIFO:
            os.mkfifo(path, 0o600)
        elif e.kind in (treefmt.CHR, treefmt.BLK):
            if not self.trust.devices:
                return False  # left out, like sockets
            os.mknod(path, treefmt.MODE_OF_KIND[e.kind] | 0o600, e.rdev)
        elif e.kind == treefmt.SOCK:
            return False  # sockets cannot be recreated meaningfully; skip
        return True

    def _write_file(self, e: Entry, path: bytes) -> None:
        dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if e.size:
                src = self.store.open_blob(e.ref)
                try:
                    _copy_sparse(src, dst, e.size)
                finally:
                    os.close(src)
        finally:
            os.close(dst)

    def _apply(self, e: Entry, path: bytes) -> None:
        trust = self.trust
        if trust is not FAITHFUL:
            mode = e.mode if trust.setid else e.mode & ~(stat.S_ISUID | stat.S_ISGID)
            xattrs = tuple((n, v) for n, v in e.xattrs if trust.keeps_xattr(n))
            e = e._replace(mode=mode, xattrs=xattrs)
        apply_metadata(path, e, self.ids, owners=self.owners, xattr_refused=_skip_unsupported)


def _skip_unsupported(name: bytes, exc: OSError) -> None:
    # A checkout as a user, or onto a filesystem without that namespace: the
    # rest of the entry is still worth having.
    if exc.errno not in (errno.EPERM, errno.ENOTSUP):
        raise exc


def apply_metadata(
    path: bytes,
    e: Entry,
    ids: IdMap,
    *,
    owners: bool = True,
    xattr_refused: Callable[[bytes, OSError], None] | None = None,
) -> None:
    """Give ``path`` the entry's owner, xattrs, mode and mtime.

    In the one order that keeps them all: chown first (it clears
    ``security.capability`` and set-id bits), then the xattrs, then the mode
    (after any ACL xattr, so the mode's bits win), the mtime last.
    ``xattr_refused`` decides about an xattr the filesystem refuses (by
    default the error is raised).
    """
    symlink = e.kind == treefmt.SYMLINK
    if owners:
        os.chown(path, ids.to_host(e.uid), ids.to_host(e.gid), follow_symlinks=False)
    for name, value in e.xattrs:
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            if xattr_refused is None:
                raise
            xattr_refused(name, exc)
    if not symlink:
        os.chmod(path, e.mode)
    os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def _copy_sparse(src: int, dst: int, size: int) -> None:
    for start, end in data_ranges(src, size):
        pos = start
        while pos < end:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
            if n == 0:
                break
            pos += n
    os.ftruncate(dst, size)
