"""Describing a directory tree the way a user would compare two of them."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def describe(root: Path, *, mtimes: bool = True, owners: bool = True) -> dict[str, tuple]:
    """Path -> (type, mode, uid, gid, size, content hash / link target, mtime, xattrs, link group).

    Hard-link groups are named by the first path (sorted) of each inode, so
    two trees with the same grouping describe equally; an inode with one name
    inside ``root`` is not a group.
    """
    out: dict[str, tuple] = {}
    first_of_inode: dict[tuple[int, int], str] = {}
    members: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            group = None
            if stat.S_ISREG(st.st_mode):
                content = _hash(path)
                if st.st_nlink > 1:
                    group = first_of_inode.setdefault((st.st_dev, st.st_ino), rel)
                    members[(st.st_dev, st.st_ino)] = members.get((st.st_dev, st.st_ino), 0) + 1
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = st.st_rdev
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            xattrs = tuple(sorted(
                (n, os.getxattr(path, n, follow_symlinks=False))
                for n in os.listxattr(path, follow_symlinks=False)
                if not n.startswith("trusted.overlay.") and not n.startswith("security.")
            ))  # fmt: skip
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid if owners else None,
                st.st_gid if owners else None,
                size,
                content,
                st.st_mtime_ns if mtimes else None,
                xattrs,
                group,
            )
    # A "group" with one name in this tree is no group (its other names are elsewhere).
    lone = {first for key, first in first_of_inode.items() if members[key] == 1}
    return {p: (*v[:-1], None) if v[-1] in lone else v for p, v in out.items()}


def _hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def differences(a: dict[str, tuple], b: dict[str, tuple], limit: int = 20) -> list[str]:
    """Human-readable differences, for assertion messages."""
    fields = ("type", "mode", "uid", "gid", "size", "content", "mtime", "xattrs", "hardlink")
    out = []
    for path in sorted(a.keys() | b.keys()):
        if path not in a:
            out.append(f"only in second: {path}")
        elif path not in b:
            out.append(f"only in first: {path}")
        elif a[path] != b[path]:
            diffs = [
                f"{f}: {x!r} != {y!r}"
                for f, x, y in zip(fields, a[path], b[path], strict=False)
                if x != y
            ]
            out.append(f"{path}: " + "; ".join(diffs))
        if len(out) >= limit:
            out.append("...")
            break
    return out
