"""Start-up recovery: what a crashed or killed predecessor left behind.

Runs before the daemon says it is ready. Mounts below the state directory
are unmounted, their work directories removed, temporary store files
dropped (no writer can be alive: filesystem processes die with their
daemon), and builds that were queued or running are marked ``errored``.
"""

from __future__ import annotations

import logging
import shutil
import time

from amber.sandbox.mounts import mounts_under, unmount_all_under

from .context import DaemonContext

log = logging.getLogger("amber.recovery")


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
    interrupted = ctx.db.builds_with_status("queued", "running")
    for record in interrupted:
        ctx.db.update_build(
            record.id,
            status="errored",
            error="interrupted: amberd stopped or crashed",
            finished=time.time(),
        )
        for step in ctx.db.get_steps(record.id):
            if step.status == "running":
                ctx.db.update_step(
                    record.id,
                    step.idx,
                    status="errored",
                    log=_keep_partial_log(ctx, record.id, step.idx),
                )
            elif step.status == "pending":
                ctx.db.update_step(record.id, step.idx, status="skipped")
        log.warning("build %s was interrupted by a previous amberd: marked errored", record.id)
    return {
        "unmounted": len(unmounted),
        "work_dirs": removed,
        "temp_files": temps,
        "interrupted": len(interrupted),
    }


def _keep_partial_log(ctx: DaemonContext, build_id: str, idx: int) -> str | None:
    """What an interrupted step printed, moved into the store."""
    path = ctx.log_dir / f"{build_id}.{idx}.log"
    if not path.exists():
        return None
    with ctx.store.batch() as batch:
        digest, _ = ctx.store.put_blob_file(path, batch)
    path.unlink()
    return digest.hex()
