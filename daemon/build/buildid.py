"""Build ids: made by amberd, one grammar, checked wherever one becomes a path.

A build id names a log file (``logs/ID.N.log``) and a work directory under
the mount directory, both opened, mounted on and deleted by root. So an id
is only ever made here, from a name cut down to the grammar (a spec's name,
or whatever label an imported image carries), and every path made from an
id goes through ``check_build_id`` first: one written before this check
existed (an old database) is refused, not followed.
"""

from __future__ import annotations

import re

from amber.daemon.errors import PermissionDenied

NAME_MAX = 100
BUILD_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}-[0-9]+")
_OUTSIDE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, fallback: str = "build") -> str:
    """``text`` cut down to the name part of the grammar (``fallback`` if nothing is left)."""
    name = _OUTSIDE.sub("_", text).lstrip("._-")[:NAME_MAX]
    return name or fallback


def make_build_id(name: str, seq: int) -> str:
    build_id = f"{safe_name(name)}-{seq}"
    return check_build_id(build_id)


def check_build_id(build_id: str) -> str:
    """``build_id`` if it is one amberd could have made; fit to put into a path."""
    if not BUILD_ID.fullmatch(build_id):
        raise PermissionDenied(f"{build_id!r} is not a build id amberd makes; refusing to use it")
    return build_id
