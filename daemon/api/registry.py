"""The operations amberd offers: one table from wire name to handler, and the ``Api`` that serves it.

Arguments are checked against each operation's declared schema before its
handler runs (``untrusted`` until then). Ownership: a build belongs to the
uid that started it, and only that uid or root may act on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from amber.client.protocol import Request, event
from amber.daemon.api import builds, exchange, frozen, images, show, sources, store
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

    async def send_event(self, conn: Connection, name: str, data: dict[str, Any]) -> None:
        await conn.send(event(conn.request_id, name, data))
