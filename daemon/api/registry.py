"""The operations amberd offers: one table from wire name to handler, and the ``Api`` that serves it.

Arguments are checked against each operation's declared schema before its
handler runs (``untrusted`` until then). Ownership: a build belongs to the
uid that started it, and only that uid or root may act on it; each handler
that names a build asks ``Api.record`` itself, so no check covers two
operations. Deleting what nothing else protects (``gc``, ``fsck --repair``)
is for root and the ``admin-group`` (``Api.require_admin``).
"""

from __future__ import annotations

import grp
from typing import TYPE_CHECKING, Any

from amber.client.protocol import Request, event
from amber.daemon.api import builds, exchange, frozen, images, remote, show, sources, store
from amber.daemon.api.operation import Operation
from amber.daemon.api.validate import validate_args
from amber.daemon.errors import BadArgs, NotFound, PermissionDenied, UnknownOperation

if TYPE_CHECKING:
    from amber.daemon.build.manager import BuildManager
    from amber.daemon.context import DaemonContext
    from amber.daemon.server import Connection
    from amber.daemon.storage.db import BuildRecord

#: Every operation a client can send, by its wire name.
OPERATIONS: dict[str, Operation] = {
    # builds: start, follow, list, cancel, forget, inspect
    "build": builds.build,
    "ps": builds.ps,
    "builds": builds.list_builds,
    "log": builds.log,
    "cancel": builds.cancel,
    "delete": builds.delete,
    "status": builds.status,
    "show": show.show,
    # frozen builds: look inside
    "shell": frozen.shell,
    "diff": frozen.diff,
    # named base images
    "image-import": images.image_import,
    "image-ls": images.image_ls,
    "image-rm": images.image_rm,
    # OCI images in and out
    "export": exchange.export,
    "import": exchange.import_image,
    # GC roots and the store
    "pin-add": store.pin_add,
    "pin-rm": store.pin_rm,
    "pin-ls": store.pin_ls,
    "gc": store.gc,
    "fsck": store.fsck,
    # stamp rules
    "verify": sources.verify,
    # remote caches, by hand
    "push": remote.push,
    "pull": remote.pull,
}


class Api:
    """What handlers get: the daemon's context, the build manager and shared checks."""

    def __init__(self, ctx: DaemonContext, manager: BuildManager):
        self.ctx = ctx
        self.manager = manager
        self._store_size: tuple[float, int] = (0.0, 0)

    async def handle(self, conn: Connection, request: Request) -> dict[str, Any]:
        op = OPERATIONS.get(request.op)
        if op is None:
            raise UnknownOperation(f"unknown operation {request.op!r}")
        if request.fds and not op.takes_fds:
            raise BadArgs(f"{request.op} takes no file descriptors")
        args = validate_args(request.args, op.schema)
        conn.request_id = request.id
        conn.request_fds = request.fds
        return await op.handler(self, conn, args)

    # -- helpers ----------------------------------------------------------------

    def record(self, conn: Connection, build_id: str) -> BuildRecord:
        """The build named ``build_id``, if the caller may act on it."""
        record = self.ctx.db.get_build(build_id)
        if record is None:
            raise NotFound(f"no build {build_id!r} (see `amber builds`)")
        if not conn.peer.is_root and record.uid != conn.peer.uid:
            raise PermissionDenied(f"build {build_id} belongs to uid {record.uid}")
        return record

    def is_admin(self, conn: Connection) -> bool:
        """Root, or a member (primary or supplementary) of the configured ``admin-group``."""
        if conn.peer.is_root:
            return True
        name = self.ctx.config.admin_group
        if name is None:
            return False
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:  # removed since amberd started: nobody is a member
            return False
        return conn.peer.in_group(gid)

    def require_admin(self, conn: Connection, what: str, others: str) -> None:
        """Refuse ``what`` to anyone but root and the ``admin-group``; ``others``: what they may."""
        if not self.is_admin(conn):
            group = self.ctx.config.admin_group
            if group is None:
                who = "root may"
                how = " (admin-group in amberd.toml lets a group's members too)"
            else:
                who, how = f"root and members of group {group} may", ""
            raise PermissionDenied(f"only {who} {what}{how}; {others}")

    def owns(self, conn: Connection, uid: int | None) -> bool:
        """Whether the caller sees an object of ``uid`` in a listing: theirs, or they are root."""
        return conn.peer.is_root or uid == conn.peer.uid

    async def send_event(self, conn: Connection, name: str, data: dict[str, Any]) -> None:
        await conn.send(event(conn.request_id, name, data))
