"""Looking into frozen builds: ``shell`` and ``diff``.

A shell runs on a fresh writable layer over the frozen tree: the mount is
thrown away when the shell exits, so the frozen state never changes.
"""

from __future__ import annotations

import logging
import os
import shlex
import stat
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from amber.daemon.api.operation import operation
from amber.daemon.build.bases import host_binds
from amber.daemon.build.frozen import FrozenState, make_local, resolve_state
from amber.daemon.errors import BadArgs, Busy, NotFound, SandboxFailed
from amber.sandbox import tree as treefmt
from amber.sandbox.beneath import exists_in_root, write_beneath
from amber.sandbox.fscontrol import FilesystemError, OverlayMount, open_overlay
from amber.sandbox.runner import run_interactive
from amber.sandbox.sandboxerror import CommandError, SandboxError
from amber.sandbox.sandboxspec import BUILD_UID, Bind
from amber.sandbox.treediff import diff_trees
from amber.sandbox.userns import IdMap, IdPoolExhausted

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.server import Connection
    from amber.daemon.storage.db import BuildRecord
    from amber.daemon.storage.roots import Hold

log = logging.getLogger(__name__)
HISTORY = "tmp/.amber_history"
CLIENT_WRITE_TIMEOUT = 5.0  # seconds a client's stderr has to take the banner


def _binds_for(record: BuildRecord, state_dir: Path) -> list[Bind]:
    """The host's system directories, for builds on the ``host`` base."""
    if record.base != "host":
        return []
    return [Bind(Path(source), dest) for source, dest in host_binds(state_dir)]


def _shell_argv(root: str, binds: list[Bind]) -> list[str]:
    # Looked up as the shell will see the tree: its links resolve inside it.
    for candidate in ("bin/bash", "usr/bin/bash"):
        if exists_in_root(root, candidate) or (binds and os.path.exists("/" + candidate)):
            return ["/" + candidate, "-i"]
    return ["/bin/sh", "-i"]


def _seed_history(root: str, state: FrozenState, uid: int) -> None:
    """The failed command, one arrow-up away.

    Root writes into a tree the build's user shaped: through no link it
    holds (``write_beneath``). A tree whose /tmp is a link gets no history.
    """
    lines = [line for line in state.run.splitlines() if line.strip()]
    try:
        write_beneath(root, HISTORY, ("\n".join(lines) + "\n").encode(), uid=uid, gid=uid)
    except OSError as exc:
        log.info("no shell history in %s: %s", root, exc)


@operation(
    takes_fds=True,
    build=str,
    before=(bool, False),
    step=(str | None, None),
    argv=(list[str] | None, None),
    term=(str | None, None),
    rows=(int | None, None),
    cols=(int | None, None),
)
async def shell(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    fds = conn.take_fds(conn.request_fds)
    try:
        return await _run_shell(api, conn, args, fds)
    finally:
        for fd in (
            fds
        ):  # ours now, whatever happens: a refused shell must not keep the client's pipes open
            os.close(fd)


@contextmanager
def _id_range(api: Api) -> Iterator[IdMap]:
    """The shell's own host id range, like a build's (see userns.IdPool)."""
    try:
        ids = api.ctx.id_pool.acquire()
    except IdPoolExhausted as exc:
        raise Busy(str(exc)) from None
    try:
        yield ids
    finally:
        api.ctx.id_pool.release(ids)


async def _mount_whole(
    api: Api, stack: AsyncExitStack, hold: Hold, state: FrozenState, work: Path, ids: IdMap
) -> OverlayMount:
    """Mount ``state`` for a shell (kept open by ``stack``), refused when it is not whole.

    The presence check and the filesystem's start-up each take a few hundred
    milliseconds on a large state: they run at once. The nursery ends before
    anything is raised: an error raised inside it would reach the client
    wrapped in a group, as an internal error.
    """
    complete: list[bool] = []

    async def check() -> None:
        complete.append(await trio.to_thread.run_sync(hold.complete, [state.tree]))

    failed: FilesystemError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        try:
            mnt = await stack.enter_async_context(
                open_overlay(
                    api.ctx.store.state_dir,
                    state.tree,
                    work,
                    ids=ids,
                    pool=api.ctx.fs_pool,
                    fs_mode=api.ctx.fs_mode.name,
                )
            )
        except FilesystemError as exc:  # e.g. a tree GC took: the check says which
            failed = exc
    if not complete[0]:
        raise NotFound(f"the state of {state.label} is no longer complete in the store")
    if failed is not None:
        raise failed
    return mnt


async def _run_shell(
    api: Api, conn: Connection, args: dict[str, Any], fds: list[int]
) -> dict[str, Any]:
    if len(fds) != 3:
        raise BadArgs("shell needs the terminal's stdin, stdout and stderr (3 descriptors)")
    if args["argv"] == []:
        raise BadArgs("argv must name a command (leave it out for a shell)")
    record = api.record(conn, args["build"])
    state = resolve_state(api.ctx.db, record, step=args["step"], before=args["before"])
    # A temp root for the shell's life, taken before the presence check: a GC
    # running meanwhile cannot take the frozen state from under the mount.
    with api.ctx.roots.hold(f"shell in {record.id}") as hold:
        await make_local(api.ctx, hold, [state.tree], state.label)
        binds = await trio.to_thread.run_sync(_binds_for, record, api.ctx.store.state_dir)
        env = dict(state.env)
        env.update(
            HISTFILE="/" + HISTORY, debian_chroot=f"amber:{record.id}", AMBER_BUILD=record.id
        )
        if args["term"]:
            env["TERM"] = args["term"]
        work = api.ctx.work_dir("shell-", record.id)
        async with AsyncExitStack() as stack:
            ids = stack.enter_context(_id_range(api))  # released after the mount is gone
            mnt = await _mount_whole(api, stack, hold, state, work, ids)
            user_uid = ids.to_host(0 if state.user == "root" else BUILD_UID)
            await trio.to_thread.run_sync(_seed_history, str(mnt.root), state, user_uid)
            interactive = args["argv"] is None
            argv = _shell_argv(str(mnt.root), binds) if interactive else args["argv"]
            if interactive:
                await write_to_client(fds[2], _banner(state).encode())
            try:
                code = await run_interactive(
                    mnt.root,
                    argv=argv,
                    cwd=state.cwd,
                    env=env,
                    user=state.user,
                    stdin=fds[0],
                    stdout=fds[1],
                    stderr=fds[2],
                    id_map=ids,
                    extra_binds=binds,
                    private_tmp=False,
                )
            except CommandError as exc:
                return await _not_started(exc, state, fds[2])
            except SandboxError as exc:
                raise SandboxFailed(f"the shell in {state.label} did not start: {exc}") from exc
    return {"exit_code": code}


async def _not_started(exc: CommandError, state: FrozenState, stderr: int) -> dict[str, Any]:
    """A command the frozen tree lacks is the user's slip, answered as a shell would:
    the message on the command's stderr, and 127 (not found) or 126 (not executable)."""
    message = f"amber shell: {exc.command}: {exc.why} in build {state.label}"
    # If the client's stderr is gone or stuck, the reply still says it.
    await write_to_client(stderr, (message + "\n").encode(errors="surrogateescape"))
    return {"exit_code": exc.status, "message": message}


async def write_to_client(fd: int, data: bytes, timeout: float = CLIENT_WRITE_TIMEOUT) -> bool:
    """Write to a descriptor a client passed, never blocking amberd's loop.

    A pipe nobody reads (or a stopped terminal) would block a plain
    ``os.write`` and with it every client. The write waits on trio instead,
    for ``timeout`` at most, and gives up; a descriptor trio cannot poll (a
    regular file, which on a FUSE mount could block too) gets nothing.
    Returns whether everything was written.
    """
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR):
            return False
        blocking = os.get_blocking(fd)
    except OSError:
        return False
    try:
        # On a dup: FdStream closes its own descriptor, telling trio first.
        async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
            with trio.move_on_after(timeout):
                await stream.send_all(data)
                return True
        log.info("a client's descriptor took no output for %gs; skipped", timeout)
        return False
    except (OSError, trio.BrokenResourceError):
        return False
    finally:
        with suppress(OSError):
            os.set_blocking(fd, blocking)  # trio made the shared description non-blocking


def _banner(state: FrozenState) -> str:
    step = state.step
    status = f"exit {step.exit_code}" if step.exit_code is not None else step.status
    return (
        f"amber: {state.label} ({status}), in {state.cwd}\r\n"
        f"amber: the command is in your history (arrow up): {shlex.quote(state.run.splitlines()[0] if state.run else '')}\r\n"
        "amber: changes made here are thrown away when you leave\r\n"
    )


@operation(build=str, step=(str | None, None), stat=(bool, False))
async def diff(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    record = api.record(conn, args["build"])
    after = resolve_state(api.ctx.db, record, step=args["step"], before=False)
    before = resolve_state(api.ctx.db, record, step=after.step.name, before=True)

    def work() -> list[dict[str, Any]]:
        out = []
        for change in diff_trees(api.ctx.store, before.tree, after.tree):
            entry = change.new or change.old
            assert entry is not None
            out.append(
                {
                    "kind": change.kind,
                    "path": "/" + change.path.decode(errors="surrogateescape"),
                    "type": treefmt.KIND_NAMES[entry.kind],
                    "size": entry.size if change.new is not None else 0,
                    "old_size": change.old.size if change.old is not None else 0,
                }
            )
        return out

    with api.ctx.roots.hold(f"diff of {record.id}") as hold:
        await make_local(api.ctx, hold, [before.tree, after.tree], after.label)
        changes = await trio.to_thread.run_sync(work)
    summary = {
        k: sum(1 for c in changes if c["kind"] == k) for k in ("added", "modified", "deleted")
    }
    return {"build": record.id, "step": after.step.name, "changes": changes, "summary": summary}
