"""Start-up recovery: what a crashed or killed predecessor left behind.

Runs before the daemon says it is ready. Mounts below the state directory
are unmounted, their work directories removed, temporary store files
dropped (no writer can be alive: filesystem processes die with their
daemon), and builds that were queued or running are marked ``errored``.

All of that would wreck a daemon that is still alive, so it runs only
under the state directory's lock (``lock_state_dir``), which the running
daemon holds until it exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
from pathlib import Path

from amber.daemon.build.state import BuildStatus, recover_interrupted
from amber.daemon.context import DaemonContext
from amber.daemon.errors import PermissionDenied
from amber.sandbox.mounts import mounts_under, unmount_all_under

log = logging.getLogger("amber.recovery")

LOCK_NAME = "amberd.lock"


class StateDirBusy(OSError):
    """Another amberd holds the state directory."""


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``state_dir`` for this process's lifetime; return the lock's descriptor.

    An exclusive ``flock`` on ``state_dir/amberd.lock``, which also records
    our pid. The kernel drops it when the process dies, ``kill -9`` included;
    the descriptor is close-on-exec, so the filesystem processes and
    sandboxes amberd starts never keep it alive after amberd.

    Raises:
        StateDirBusy: another amberd holds it (its pid in the message).
    """
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirBusy(f"another amberd (pid {holder}) is using {state_dir}") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_state_dir(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def recover(ctx: DaemonContext) -> dict[str, int]:
    unmounted = unmount_all_under(ctx.mount_dir)
    for point in unmounted:
        log.warning("unmounted %s left by a previous amberd", point)
    removed = 0
    if not mounts_under(ctx.mount_dir):
        for child in ctx.mount_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True)
            removed += 1
    temps = ctx.store.remove_temp_files()
    interrupted = ctx.db.builds_with_status(BuildStatus.QUEUED.value, BuildStatus.RUNNING.value)
    for record in interrupted:
        recover_interrupted(ctx.db, record.id, functools.partial(_keep_partial_log, ctx, record.id))
        log.warning("build %s was interrupted by a previous amberd: marked errored", record.id)
    return {
        "unmounted": len(unmounted),
        "work_dirs": removed,
        "temp_files": temps,
        "interrupted": len(interrupted),
    }


def _keep_partial_log(ctx: DaemonContext, build_id: str, idx: int) -> str | None:
    """What an interrupted step printed, moved into the store."""
    try:
        path = ctx.step_log_path(build_id, idx)
    except PermissionDenied:  # a record from before ids were checked: not a path to follow
        return None
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    # Recovery runs before any GC can: the writer is for the store's guard.
    with ctx.roots.writer(f"log of {build_id}") as writer, writer.store.batch() as batch:
        digest, _ = writer.store.put_blob_file(path, batch)
    path.unlink()
    return digest.hex()


def unmount_leftovers(mount_dir: Path) -> list[str]:
    """At exit: unmount whatever is still mounted under ``mount_dir`` (a bug if anything).

    Every build and shell unmounts its own filesystems as it ends; this only
    makes sure an amberd that stops leaves nothing behind either way.
    """
    left = unmount_all_under(mount_dir)
    for point in left:
        log.warning("unmounted %s, still mounted as amberd stopped", point)
    return left
