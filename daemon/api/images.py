"""Named base images: ``image-import``, ``image-ls``, ``image-rm``.

A name belongs to the uid that imported it (or root, for images imported
before amber recorded who did); only that uid or root may replace or forget
it. Forgetting keeps the tree in the store until GC finds nothing else uses it.
Names are one namespace: any user may build on any image they can name, but
``image-ls`` lists another user's only to root.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import trio

from amber.daemon.api.operation import operation
from amber.daemon.build.bases import resolve_base
from amber.daemon.errors import BadArgs, Busy, NotFound, PermissionDenied

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.server import Connection
    from amber.daemon.storage.db import BuildRecord
    from amber.daemon.storage.roots import Hold


@operation(name=str, source=str)
async def image_import(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    name, source = args["name"], args["source"]
    if not name or name.startswith(("dir:", "oci:", "tree:")) or name == "host" or "\0" in name:
        raise BadArgs(f"image name {name!r} is reserved or empty")
    existing = api.ctx.db.get_image(name)
    if existing is not None and not conn.peer.is_root and existing.get("uid") != conn.peer.uid:
        owner = existing.get("uid")
        raise PermissionDenied(
            f"image {name} belongs to {'root' if owner is None else f'uid {owner}'}; "
            "import yours under another name",
        )
    if ":" not in source.split("/", 1)[0]:
        source = ("dir:" if os.path.isdir(source) else "oci:") + source

    def work(writer: Hold) -> bytes:
        uid, gid = conn.peer.uid, conn.peer.gid
        limit = api.ctx.config.import_max_size
        tree = resolve_base(
            writer.store,
            api.ctx.db,
            source,
            uid=uid,
            gid=gid,
            groups=conn.peer.groups,
            import_max_size=limit,
        ).tree
        # Held before the image record refers to it, and checked whole
        # (``tree:`` and image names are reused, not written).
        if not writer.complete([tree]):
            raise NotFound(f"{source}: tree {tree.hex()[:12]} is not complete in the store")
        writer.checkpoint([tree])
        return tree

    # A writer from before the import reuses (deduplicates against) what the
    # store has until the image record keeps it: a GC meanwhile leaves it.
    with api.ctx.roots.writer(f"image import {name}") as writer:
        tree = await trio.to_thread.run_sync(work, writer)
        api.ctx.db.put_image(name, tree.hex(), source, uid=conn.peer.uid)
    return {"name": name, "tree": tree.hex()}


@operation()
async def image_ls(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    """Every image for root; for anyone else theirs and root's (the shared ones, which
    every user builds on), not another user's."""
    images = api.ctx.db.list_images()
    return {"images": [i for i in images if i.get("uid") in (None, 0) or api.owns(conn, i["uid"])]}


@operation(name=str)
async def image_rm(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    """Forget a named image, unless a pin or a live build still uses it.

    Only the user who imported it (or root) may; images imported before
    amber recorded who did are root's. The tree stays in the store until GC
    finds nothing else keeps it.
    """
    db, name = api.ctx.db, args["name"]
    image = db.get_image(name)
    if image is None:
        raise NotFound(f"no image {name!r} (see `amber image ls`)")
    owner = image.get("uid")
    if not conn.peer.is_root and owner != conn.peer.uid:
        who = "root" if owner is None else f"uid {owner}"
        raise PermissionDenied(f"image {name} belongs to {who}")
    for build in api.manager.running():
        if str(build.spec.base) == name:
            raise Busy(f"image {name} is the base of build {build.id}, which is {build.status}")
    pin = _pin_using(api, name, image["tree"])
    if pin is not None:
        raise Busy(
            f"image {name} is used by pin {pin[0]} ({pin[1]}); `amber pin rm {pin[0]}` first",
        )
    db.delete_image(name)
    return {"name": name, "tree": image["tree"], "removed": True}


def _pin_using(api: Api, name: str, tree: str) -> tuple[str, str] | None:
    """A pin holding the image's tree, or a build made on it: (pin name, its target)."""
    db = api.ctx.db
    for pin in db.list_pins():
        roots = pin.roots_dict()
        if tree in roots.get("trees", ()):
            return pin.name, pin.target
        for build_id in roots.get("builds", ()):
            record: BuildRecord | None = db.get_build(build_id)
            if record is not None and record.base == name:
                return pin.name, pin.target
    return None
