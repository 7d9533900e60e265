"""pyfuse3 adapter for ``LowerModel``: decode, one model call, encode.

The only place errors become ``FUSEError`` (``_replies``, which every
handler that calls the model wears): a request the model refuses gets its
errno; a store object missing or corrupt under a live mount (deleted or
damaged behind amber's back) is EIO for that request, and the mount stays
up. Any other exception is a bug and is left to fail loudly.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pyfuse3

from .lowerfs import FOREVER, Attr, LowerError, LowerModel
from .store import StoreError

T = TypeVar("T")


def _attrs(a: Attr) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = a.ino
    out.generation = 0
    out.entry_timeout = FOREVER
    out.attr_timeout = FOREVER
    out.st_mode = a.mode
    out.st_nlink = a.nlink
    out.st_uid = a.uid
    out.st_gid = a.gid
    out.st_rdev = a.rdev
    out.st_size = a.size
    out.st_blksize = 4096
    out.st_blocks = (a.size + 511) // 512
    out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = a.mtime_ns
    return out


def _negative() -> pyfuse3.EntryAttributes:
    # st_ino == 0 tells the kernel to cache the absence of the name.
    out = pyfuse3.EntryAttributes()
    out.st_ino = 0
    out.entry_timeout = FOREVER
    return out


def _fuse_error(exc: LowerError) -> pyfuse3.FUSEError:
    """The one mapping of a model refusal to the errno the kernel is given."""
    return pyfuse3.FUSEError(pyfuse3.ENOATTR if exc.errno == errno.ENODATA else exc.errno)


def _replies(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """pyfuse3 replies an errno only for FUSEError: turn the model's refusals into one."""

    @functools.wraps(handler)
    async def wrapped(*args):
        try:
            return await handler(*args)
        except LowerError as exc:
            raise _fuse_error(exc) from None
        except StoreError:  # MissingObject, CorruptObject: from Store.get_tree in lookups
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapped


class LowerOperations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, model: LowerModel, statfs_path: str):
        super().__init__()
        self.model = model
        self.statfs_path = statfs_path

    @_replies
    async def lookup(self, parent_inode, name, ctx=None):
        found = self.model.lookup(parent_inode, name)
        return _negative() if found is None else _attrs(found)

    @_replies
    async def getattr(self, inode, ctx=None):
        return _attrs(self.model.getattr(inode))

    @_replies
    async def readlink(self, inode, ctx):
        return self.model.readlink(inode)

    async def opendir(self, inode, ctx):
        return inode

    @_replies
    async def readdir(self, fh, start_id, token):
        rows = self.model.readdir(fh, start_id)
        for name, attr, next_id in rows:
            if not pyfuse3.readdir_reply(token, name, _attrs(attr), next_id):
                break

    async def releasedir(self, fh):
        pass

    @_replies
    async def open(self, inode, flags, ctx):
        self.model.check_open(inode, flags)
        # keep_cache: the tree never changes, so pages read through one open
        # serve every later one (the fuse-data mode reads all data this way).
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_replies
    async def read(self, fh, off, size):
        return self.model.read(fh, off, size)

    async def flush(self, fh):
        # Read-only: nothing to flush, and ENOSYS stops the kernel asking.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh):
        pass

    @_replies
    async def getxattr(self, inode, name, ctx):
        return self.model.getxattr(inode, name)

    @_replies
    async def listxattr(self, inode, ctx):
        return self.model.listxattr(inode)

    async def statfs(self, ctx):
        st = os.statvfs(self.statfs_path)
        out = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
        ):
            setattr(out, name, getattr(st, name))
        out.f_namemax = 255
        return out
