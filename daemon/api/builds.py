"""Builds: ``build``, ``ps``, ``builds``, ``log``, ``cancel``, ``delete``, and the daemon's ``status``.

Handlers raise ``errors.DaemonError`` for anything the user should see; a build is
acted on only by the uid that started it, or root (``Api.record``), and listed
(``ps``, ``builds``) only to them.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from amber.client import __version__
from amber.daemon.api.operation import operation
from amber.daemon.build.build import Build
from amber.daemon.build.logs import blob_chunks, file_chunks
from amber.daemon.build.spec import Spec, SpecError, parse_spec
from amber.daemon.build.state import BuildStatus
from amber.daemon.context import DaemonContext
from amber.daemon.errors import (
    BadArgs,
    Busy,
    Internal,
    InvalidSpec,
    NotFound,
    PermissionDenied,
    TimedOut,
)
from amber.daemon.remote.pull import Miss
from amber.daemon.userthreads import run_as_user
from amber.sandbox.asuser import HelperError, HelperTimeout, Unreadable, User, UserReader, WrongKind
from amber.sandbox.asuser_pool import lease
from amber.sandbox.digest import from_hex

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.server import Connection


async def parse_spec_request(text: str, path: str, user: User) -> Spec:
    """A spec sent by a client, with errors as replies.

    Its local paths are looked at by a helper that is the client
    (sandbox/asuser.py): root's ``stat``, even with the client's fsuid,
    would pass directories the client cannot and tell whether a file there
    exists. On a thread of the user's own (``userthreads.py``): the helper
    starts, a path may be slow to open, and the user may stop their helper.
    """
    if not os.path.isabs(path):
        raise BadArgs(f"spec_path must be absolute, got {path!r}")

    def work() -> Spec:
        if user.uid == 0:
            return parse_spec(text, path, Path(path).parent)
        with _ModesAsUser(user) as mode_of:
            return parse_spec(text, path, Path(path).parent, mode_of=mode_of)

    try:
        return await run_as_user(user.uid, work)
    except SpecError as exc:
        raise InvalidSpec(str(exc)) from None
    except HelperTimeout as exc:  # the user's own process, stopped: not amberd's bug
        raise TimedOut(f"the helper reading your files: {exc}") from None
    except HelperError as exc:
        raise Internal(f"the helper reading your files failed: {exc}") from None


class _ModesAsUser:
    """Local sources' modes, asked of a helper that is the user (started for the first one)."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.reader: UserReader | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _ModesAsUser:
        return self

    def __exit__(self, *exc: object) -> bool | None:
        return self._stack.__exit__(*exc)

    def __call__(self, path: Path) -> int:
        if self.reader is None:
            self.reader = self._stack.enter_context(lease(self.user))
        try:
            fd = self.reader.open(str(path), follow_symlinks=True, allow_dir=True)
        except Unreadable as exc:  # "PATH: No such file or directory" as before, else the helper's
            raise OSError(exc.errno, os.strerror(exc.errno) if exc.missing else str(exc)) from None
        except WrongKind as exc:
            return exc.mode
        try:
            return os.fstat(fd).st_mode
        finally:
            os.close(fd)


def check_limits(spec: Spec, timeout_max: float) -> None:
    """Refuse a spec asking for more than this amberd allows, naming the limit."""
    for step in spec.steps:
        if step.timeout > timeout_max:
            raise InvalidSpec(
                f"step {step.name!r} asks for timeout {step.timeout:g}s; this amberd allows at "
                f"most {timeout_max:g}s (step-timeout-max)"
            )


def remote_options(args: dict[str, Any]) -> dict[str, Any]:
    """``--cache-from``/``--cache-to``/``--no-remote``, URLs checked like the config's."""
    from amber.daemon.remote.config import CacheConfigError, parse_remote_url

    for name in ("cache_from", "cache_to"):
        if args[name] is not None:
            try:
                parse_remote_url(args[name])
            except CacheConfigError as exc:
                raise BadArgs(f"--{name.replace('_', '-')}: {exc}") from None
    return {"cache_from": args["cache_from"], "cache_to": args["cache_to"],
            "no_remote": args["no_remote"]}  # fmt: skip


@operation(
    takes_fds=True,
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
    cache_from=(str | None, None),
    cache_to=(str | None, None),
    no_remote=(bool, False),
    auth=(dict[str, dict[str, str]] | None, None),
)
async def build(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    # The out-link's directory is the build's from submit on; closed here if it never gets there.
    fds = conn.take_fds(conn.request_fds)
    try:
        peer = conn.peer
        spec = await parse_spec_request(
            args["spec_text"], args["spec_path"], User(peer.uid, peer.gid, peer.groups)
        )
        build = _submit(api, conn, args, fds, spec)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    await api.send_event(
        conn,
        "build",
        {
            "build": build.id,
            "name": build.spec.name,
            "steps": [s.name for s in build.spec.steps],
            "base": str(build.spec.base),
        },
    )
    if args["detach"]:
        return {"build": build.id, "status": build.status}
    async for name, data in build.follow():
        await api.send_event(conn, name, data)
    return build.result()


def _submit(api: Api, conn: Connection, args: dict[str, Any], fds: list[int], spec: Spec) -> Build:
    """The build request's checks, then the build queued."""
    how = args["export_on_failure"]
    if how not in (None, "oci", "docker-archive", "registry"):
        raise BadArgs(f"export_on_failure must be oci, docker-archive or registry, not {how!r}")
    if how == "registry" and not args["export_ref"]:
        raise BadArgs("--export-on-failure registry needs --export-ref REF")
    if args["export_path"] is not None and not os.path.isabs(args["export_path"]):
        raise BadArgs(f"export_path must be absolute, got {args['export_path']!r}")
    if args["out_link_privileged"]:
        if not conn.peer.is_root:
            raise PermissionDenied(
                "--out-link-privileged is for root only: an out-link for anyone else never "
                "carries set-id bits, file capabilities or devices",
            )
        if not args["out_link"]:
            raise BadArgs("--out-link-privileged goes with --out-link PATH")
    remote = remote_options(args)
    if remote["cache_from"] is not None:
        from amber.daemon.api.remote import configured_or_admin

        configured_or_admin(api, conn, remote["cache_from"], "build --cache-from")
    if args["pin"] is not None and api.ctx.remote is not None:
        api.ctx.remote.pins.check_name(args["pin"], conn.peer.uid, **remote)
    out_link_dir, export_dir = _request_dirs(args, fds)
    check_limits(spec, api.ctx.config.step_timeout_max)
    return api.manager.submit(
        spec,
        args["spec_path"],
        uid=conn.peer.uid,
        gid=conn.peer.gid,
        groups=conn.peer.groups,
        retry_failed=args["retry_failed"],
        pin=args["pin"],
        out_link=args["out_link"],
        out_link_dir=out_link_dir,
        out_link_privileged=args["out_link_privileged"],
        export_on_failure=args["export_on_failure"],
        export_path=args["export_path"],
        export_dir=export_dir,
        export_ref=args["export_ref"],
        credentials=base_credentials(args["auth"], spec),
        **remote,
    )


def base_credentials(auth: dict | None, spec: Spec):
    """The user's credentials for the registry of a docker:// base (None: anonymous)."""
    from amber.daemon.api.exchange import request_credentials

    if spec.base.kind != "docker" or not auth:
        return None
    return request_credentials(auth, spec.base.ref)


def _request_dirs(args: dict[str, Any], fds: list[int]) -> tuple[int | None, int | None]:
    """The directories the client opened: for ``--out-link``, then for the export on failure.

    amberd never looks a path a user named up: root resolving it would pass
    directories the user cannot (CAP_SYS_PTRACE and ``/proc/PID/cwd``),
    whatever its fsuid. The paths sent along only name the entry made there.
    """
    wanted = [args["out_link"] is not None, args["export_on_failure"] in ("oci", "docker-archive")]
    if sum(wanted) and not fds:
        raise BadArgs(
            f"this amberd writes an out-link or an export only below a directory the client "
            f"opened; upgrade amber (the client) to {__version__}, the daemon's version"
        )
    if len(fds) != sum(wanted) or not all(stat.S_ISDIR(os.fstat(fd).st_mode) for fd in fds):
        raise BadArgs(
            f"a build takes one directory for --out-link and one for --export-path, {len(fds)} came"
        )
    for path in (args["out_link"], args["export_path"]):
        if path is not None and (os.path.basename(path) in ("", ".", "..") or "\0" in path):
            raise BadArgs(f"{path!r} names no entry in a directory")
    given = iter(fds)
    return (next(given) if wanted[0] else None), (next(given) if wanted[1] else None)


@operation()
async def ps(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "builds": [
            {"id": b.id, "name": b.spec.name, "uid": b.uid, "status": b.status, "step": b.current_step,
             "created": b.created, "elapsed": round(now - b.created, 1)}
            for b in api.manager.running() if api.owns(conn, b.uid)
        ]
    }  # fmt: skip


@operation(limit=(int, 50), all=(bool, False))
async def list_builds(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    # ``--all`` is every user's for root; anyone else sees their own builds only.
    uid = None if conn.peer.is_root else conn.peer.uid
    rows = api.ctx.db.list_builds(max(1, min(args["limit"], 10_000)), uid=uid)
    return {
        "builds": [
            {"id": r.id, "name": r.name, "uid": r.uid, "status": r.status, "frozen": bool(r.frozen),
             "created": r.created, "finished": r.finished, "failed_step": r.failed_step, "error": r.error}
            for r in rows
        ]
    }  # fmt: skip


_FOLLOWED = frozenset({"log", "note"})


@operation(build=str, step=(str | None, None), follow=(bool, False))
async def log(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
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
        return {"build": record.id, "status": str(live.status)}
    if args["step"] is None:  # what amber noted outside the steps (e.g. stamp removals)
        for message in api.ctx.db.get_build_notes(record.id):
            await api.send_event(conn, "note", {"message": message})
    steps = api.ctx.db.get_steps(record.id)
    if args["step"] is not None and args["step"] not in {s.name for s in steps}:
        raise NotFound(f"build {record.id} has no step {args['step']!r}")
    for step in steps:
        if args["step"] is not None and step.name != args["step"]:
            continue
        try:
            async for data in _step_log(api.ctx, record.id, step):
                await api.send_event(conn, "log", {"step": step.name, "data": data})
        except _Unpulled as exc:  # the other steps' logs are still worth reading
            await api.send_event(conn, "note", {"message": exc.message})
    status = live.status if live is not None else record.status
    return {"build": record.id, "status": str(status)}


class _Unpulled(NotFound):
    """A step's log that only a remote cache has, and that could not be pulled."""


async def _step_log(ctx: DaemonContext, build_id: str, step) -> AsyncIterator[bytes]:
    """A step's log in bounded chunks: its blob (pulled first if a remote cache has
    it and the store does not: a lazy hit), or the file of a step still running."""
    if not step.log:
        async for data in file_chunks(ctx.step_log_path(build_id, step.idx)):
            yield data
        return
    digest = from_hex(step.log)
    local = await trio.to_thread.run_sync(ctx.store.has_blob, digest)
    if not local and ctx.remote is not None and ctx.db.remote_sources(log=step.log):
        try:
            await ctx.remote.ensure_local(logs=[digest])
        except Miss as exc:
            raise _Unpulled(f"the log of step {step.name} is in a remote cache and could "
                            f"not be pulled: {exc}") from None  # fmt: skip
    async for data in blob_chunks(ctx.store, digest):
        yield data


@operation(build=str)
async def cancel(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    record = api.record(conn, args["build"])
    build: Build | None = api.manager.get(record.id)
    if build is None or build.done.is_set():
        return {"build": record.id, "cancelled": False, "status": record.status}
    api.manager.cancel(build)
    await build.done.wait()
    return {"build": record.id, "cancelled": True, "status": build.status}


@operation()
async def status(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    ctx = api.ctx
    running = api.manager.running()
    st = os.statvfs(ctx.store.root)
    return {
        "version": __version__,
        "uptime": round(time.time() - ctx.started, 1),
        "running": sum(1 for b in running if b.status == BuildStatus.RUNNING),
        "queued": sum(1 for b in running if b.status == BuildStatus.QUEUED),
        "store_bytes": await api_store_size(api),
        "free_bytes": st.f_bavail * st.f_frsize,
        "last_gc": ctx.db.get_meta("last_gc"),
        "state_dir": str(ctx.config.state_dir),
        "fs_mode": ctx.fs_mode.name,
        "fs_mode_reason": ctx.fs_mode.reason,
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


@operation(build=str)
async def delete(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    """Forget a finished build; what only it held becomes garbage for the next GC."""
    record = api.record(conn, args["build"])
    live = api.manager.get(record.id)
    if live is not None and not live.done.is_set():
        raise Busy(f"build {record.id} is still {live.status}; cancel it first")
    api.ctx.db.delete_build(record.id)
    return {"build": record.id, "deleted": True}
