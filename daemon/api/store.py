"""Operations on GC roots and the store: ``pin-add``, ``pin-rm``, ``pin-ls``, ``gc``, ``fsck``.

Anyone who may use amberd may pin and check. Moving or removing a pin takes
its owner or root; ``pin-ls`` shows a non-root caller their own pins only.
Collecting (anything but a dry run: it deletes other users' unpinned builds
and frozen failures) and ``fsck --repair`` take root or the ``admin-group``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from amber.daemon.api.operation import operation
from amber.daemon.errors import BadArgs, NotFound
from amber.daemon.storage.db import Pin
from amber.daemon.storage.gc import GcOptions
from amber.daemon.storage.pins import (
    check_pin_name,
    check_pin_owner,
    held_here,
    new_pin,
    pin_summary,
    resolve_target,
    result_keys,
)

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.server import Connection


@operation(name=str, target=str)
async def pin_add(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    ctx = api.ctx
    name = check_pin_name(args["name"])
    kind, target, record, roots = resolve_target(
        ctx.db, ctx.store, args["target"], uid=conn.peer.uid
    )
    if record is not None:
        api.record(conn, record.id)  # the build's owner or root only
    check_pin_owner(ctx.db, name, conn.peer.uid)
    urls: list[str] = []
    if ctx.remote is not None and roots.results:
        urls = ctx.remote.pins.urls_for()
        ctx.remote.pins.check_name(name, conn.peer.uid)
    trees, blobs = roots.digests()
    # Held while the pin is written: a GC running now cannot take the target
    # between the completeness check and the pin's record.
    with ctx.roots.hold(f"pin {name}") as hold:
        if not await trio.to_thread.run_sync(hold.complete, *held_here(ctx.db, trees, blobs)):
            raise NotFound(
                f"{target} is no longer complete in the store (collected, or removed behind "
                "amber's back); rebuild it, then pin the new build",
            )
        pin = new_pin(name, kind, target, conn.peer.uid, roots)
        ctx.db.put_pin(pin)
    if ctx.remote is not None:
        ctx.remote.pins.pin(name, conn.peer.uid, result_keys(ctx.db, roots), urls)
    return _summary(api, pin)


@operation(name=str)
async def pin_rm(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    pin = api.ctx.db.get_pin(args["name"])
    if pin is None:
        raise NotFound(f"no pin {args['name']!r} (see `amber pin ls`)")
    check_pin_owner(api.ctx.db, pin.name, conn.peer.uid)
    summary = _summary(api, pin)
    api.ctx.db.delete_pin(pin.name)
    if api.ctx.remote is not None:
        api.ctx.remote.pins.unpin(pin.name)  # the tags it made re-pointed to the tombstone
    return summary


@operation()
async def pin_ls(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    return {"pins": [_summary(api, p) for p in api.ctx.db.list_pins() if api.owns(conn, p.uid)]}


def _summary(api: Api, pin: Pin) -> dict[str, Any]:
    """A pin as ``pin ls`` shows it: where it lives, here and in remotes."""
    remotes = api.ctx.remote.pins.where(pin.name) if api.ctx.remote is not None else []
    return {**pin_summary(pin), "local": True, "remotes": remotes}


@operation(
    max_freed=(int | None, None),
    keep_failed_days=(float | None, None),
    dry_run=(bool, False),
)
async def gc(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    config = api.ctx.config
    keep = config.keep_failed_days if args["keep_failed_days"] is None else args["keep_failed_days"]
    if keep < 0 or (args["max_freed"] is not None and args["max_freed"] < 0):
        raise BadArgs("--keep-failed and --max-freed cannot be negative")
    if not args["dry_run"]:
        api.require_admin(conn, "collect garbage", "anyone may `amber gc --dry-run`")
    options = GcOptions(
        max_freed=args["max_freed"],
        keep_failed_days=keep,
        keep_failed_per_spec=config.keep_failed_per_spec,
        dry_run=args["dry_run"],
    )

    async def progress(message: str) -> None:
        await api.send_event(conn, "note", {"message": message})

    report = await api.ctx.gc.collect(options, progress)
    return report.to_dict()


@operation(repair=(bool, False))
async def fsck(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    if args["repair"]:
        api.require_admin(conn, "repair the store", "anyone may check it (without --repair)")
    return await api.ctx.gc.fsck(args["repair"])
