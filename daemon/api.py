"""The operations amberd offers, each declared with the shape of its arguments.

Arguments are checked against the declared schema before a handler runs
(``untrusted`` until then); handlers raise ``AmberError`` for anything the
user should see. Ownership: a build belongs to the uid that started it, and
only that uid or root may act on it.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from amber.client import __version__
from amber.client.errors import AmberError
from amber.client.protocol import Request, event
from amber.client.validate import validate_args
from amber.sandbox.digest import from_hex

from .bases import resolve_base
from .build import Build
from .context import DaemonContext
from .db import BuildRecord
from .manager import BuildManager
from .spec import Spec, SpecError, parse_spec

if TYPE_CHECKING:
    from .server import Connection

Handler = Callable[["Api", "Connection", dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class Operation:
    handler: Handler
    schema: dict[str, Any]


OPERATIONS: dict[str, Operation] = {}


def operation(op_name: str, /, **schema: Any):
    def register(handler: Handler) -> Handler:
        OPERATIONS[op_name] = Operation(handler, schema)
        return handler

    return register


class Api:
    def __init__(self, ctx: DaemonContext, manager: BuildManager):
        self.ctx = ctx
        self.manager = manager
        self._store_size: tuple[float, int] = (0.0, 0)

    async def handle(self, conn: Connection, request: Request) -> dict[str, Any]:
        op = OPERATIONS.get(request.op)
        if op is None:
            raise AmberError("unknown-op", f"unknown operation {request.op!r}")
        args = validate_args(request.args, op.schema)
        conn.request_id = request.id
        conn.request_fds = request.fds
        return await op.handler(self, conn, args)

    # -- helpers ----------------------------------------------------------------

    def record(self, conn: Connection, build_id: str) -> BuildRecord:
        """The build named ``build_id``, if the caller may act on it."""
        record = self.ctx.db.get_build(build_id)
        if record is None:
            raise AmberError("not-found", f"no build {build_id!r} (see `amber builds`)")
        if not conn.peer.is_root and record.uid != conn.peer.uid:
            raise AmberError("permission-denied", f"build {build_id} belongs to uid {record.uid}")
        return record

    async def send_event(self, conn: Connection, name: str, data: dict[str, Any]) -> None:
        await conn.send(event(conn.request_id, name, data))


def parse_spec_request(text: str, path: str) -> Spec:
    """A spec sent by a client, with errors as replies."""
    if not os.path.isabs(path):
        raise AmberError("bad-args", f"spec_path must be absolute, got {path!r}")
    try:
        return parse_spec(text, path, Path(path).parent)
    except SpecError as exc:
        raise AmberError("spec-error", str(exc)) from None


@operation(
    "build",
    spec_text=str,
    spec_path=str,
    retry_failed=(bool, False),
    pin=(str | None, None),
    out_link=(str | None, None),
    out_link_privileged=(bool, False),
    detach=(bool, False),
    export_on_failure=(str | None, None),
    export_path=(str | None, None),
    export_ref=(str | None, None),
)
async def _build(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    how = args["export_on_failure"]
    if how not in (None, "oci", "docker-archive", "registry"):
        raise AmberError(
            "bad-args", f"export_on_failure must be oci, docker-archive or registry, not {how!r}"
        )
    if how == "registry" and not args["export_ref"]:
        raise AmberError("bad-args", "--export-on-failure registry needs --export-ref REF")
    if args["export_path"] is not None and not os.path.isabs(args["export_path"]):
        raise AmberError("bad-args", f"export_path must be absolute, got {args['export_path']!r}")
    if args["out_link_privileged"]:
        if not conn.peer.is_root:
            raise AmberError(
                "permission-denied",
                "--out-link-privileged is for root only: an out-link for anyone else never "
                "carries set-id bits, file capabilities or devices",
            )
        if not args["out_link"]:
            raise AmberError("bad-args", "--out-link-privileged goes with --out-link PATH")
    spec = parse_spec_request(args["spec_text"], args["spec_path"])
    build = api.manager.submit(
        spec,
        args["spec_path"],
        uid=conn.peer.uid,
        gid=conn.peer.gid,
        retry_failed=args["retry_failed"],
        pin=args["pin"],
        out_link=args["out_link"],
        out_link_privileged=args["out_link_privileged"],
        export_on_failure=args["export_on_failure"],
        export_path=args["export_path"],
        export_ref=args["export_ref"],
    )
    await api.send_event(
        conn,
        "build",
        {
            "build": build.id,
            "name": spec.name,
            "steps": [s.name for s in spec.steps],
            "base": str(spec.base),
        },
    )
    if args["detach"]:
        return {"build": build.id, "status": build.status}
    async for name, data in build.follow():
        await api.send_event(conn, name, data)
    return build.result()


@operation("ps")
async def _ps(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "builds": [
            {"id": b.id, "name": b.spec.name, "uid": b.uid, "status": b.status, "step": b.current_step,
             "created": b.created, "elapsed": round(now - b.created, 1)}
            for b in api.manager.running()
        ]
    }  # fmt: skip


@operation("builds", limit=(int, 50), all=(bool, False))
async def _builds(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    uid = None if conn.peer.is_root or args["all"] else conn.peer.uid
    rows = api.ctx.db.list_builds(max(1, min(args["limit"], 10_000)), uid=uid)
    return {
        "builds": [
            {"id": r.id, "name": r.name, "uid": r.uid, "status": r.status, "frozen": bool(r.frozen),
             "created": r.created, "finished": r.finished, "failed_step": r.failed_step, "error": r.error}
            for r in rows
        ]
    }  # fmt: skip


_FOLLOWED = frozenset({"log", "note"})


@operation("log", build=str, step=(str | None, None), follow=(bool, False))
async def _log(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    record = api.record(conn, args["build"])
    live = api.manager.get(record.id)
    if live is not None and args["follow"]:
        # The live build's history holds its notes (stamp removals, fetches,
        # retries) among its log lines: replayed and followed in that order.
        async for name, data in live.follow(only=_FOLLOWED, step=args["step"]):
            if name == "note":
                await api.send_event(conn, "note", {"message": data["message"]})
            else:
                await api.send_event(conn, "log", {"step": data["step"], "data": data["data"]})
        return {"build": record.id, "status": live.status}
    if args["step"] is None:  # what amber noted outside the steps (e.g. stamp removals)
        for message in api.ctx.db.get_build_notes(record.id):
            await api.send_event(conn, "note", {"message": message})
    steps = api.ctx.db.get_steps(record.id)
    if args["step"] is not None and args["step"] not in {s.name for s in steps}:
        raise AmberError("not-found", f"build {record.id} has no step {args['step']!r}")
    for step in steps:
        if args["step"] is not None and step.name != args["step"]:
            continue
        data = await trio.to_thread.run_sync(_step_log, api.ctx, record.id, step)
        if data:
            await api.send_event(conn, "log", {"step": step.name, "data": data})
    status = live.status if live is not None else record.status
    return {"build": record.id, "status": status}


def _step_log(ctx: DaemonContext, build_id: str, step) -> bytes:
    if step.log:
        return ctx.store.read_blob(from_hex(step.log))
    return read_partial_log(ctx.step_log_path(build_id, step.idx))


def read_partial_log(path: Path) -> bytes:
    """A running step's log file: a regular file of root's log directory, never a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    except OSError as exc:
        raise AmberError(
            "not-found", f"the log {path.name} cannot be read: {exc.strerror}"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise AmberError("not-found", f"the log {path.name} is not a file amberd wrote")
        return f.read()


@operation("cancel", build=str)
async def _cancel(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    record = api.record(conn, args["build"])
    build: Build | None = api.manager.get(record.id)
    if build is None or build.done.is_set():
        return {"build": record.id, "cancelled": False, "status": record.status}
    api.manager.cancel(build)
    await build.done.wait()
    return {"build": record.id, "cancelled": True, "status": build.status}


@operation("status")
async def _status(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    ctx = api.ctx
    running = api.manager.running()
    st = os.statvfs(ctx.store.root)
    return {
        "version": __version__,
        "uptime": round(time.time() - ctx.started, 1),
        "running": sum(1 for b in running if b.status == "running"),
        "queued": sum(1 for b in running if b.status == "queued"),
        "store_bytes": await api_store_size(api),
        "free_bytes": st.f_bavail * st.f_frsize,
        "last_gc": ctx.db.get_meta("last_gc"),
        "state_dir": str(ctx.config.state_dir),
    }


async def api_store_size(api: Api) -> int:
    checked, size = api._store_size
    if time.monotonic() - checked > 60:
        size = await trio.to_thread.run_sync(_du, api.ctx.store.root)
        api._store_size = (time.monotonic(), size)
    return size


def _du(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


@operation("image-import", name=str, source=str)
async def _image_import(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    name, source = args["name"], args["source"]
    if not name or name.startswith(("dir:", "oci:", "tree:")) or name == "host" or "\0" in name:
        raise AmberError("bad-args", f"image name {name!r} is reserved or empty")
    existing = api.ctx.db.get_image(name)
    if existing is not None and not conn.peer.is_root and existing.get("uid") != conn.peer.uid:
        owner = existing.get("uid")
        raise AmberError(
            "permission-denied",
            f"image {name} belongs to {'root' if owner is None else f'uid {owner}'}; "
            "import yours under another name",
        )
    if ":" not in source.split("/", 1)[0]:
        source = ("dir:" if os.path.isdir(source) else "oci:") + source

    def work() -> bytes:
        uid, gid = conn.peer.uid, conn.peer.gid
        return resolve_base(api.ctx.store, api.ctx.db, source, uid=uid, gid=gid).tree

    tree = await trio.to_thread.run_sync(work)
    api.ctx.db.put_image(name, tree.hex(), source, uid=conn.peer.uid)
    return {"name": name, "tree": tree.hex()}


@operation("image-ls")
async def _image_ls(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    return {"images": api.ctx.db.list_images()}
