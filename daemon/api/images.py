"""Named base images: ``image-import``, ``image-ls``, ``image-rm``.

Each user has a namespace of their own, and root's is the shared one: a name
means the user's own image, else root's, never another user's, so nobody can
squat a name another user builds on, or learn that they have one. Root (and,
with ``--shared``, members of the ``admin-group``) write the shared namespace.
Forgetting keeps the tree in the store until GC finds nothing else uses it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import trio

from amber.daemon.api.exchange import AUTH_ARG, request_credentials
from amber.daemon.api.operation import operation
from amber.daemon.build.bases import resolve_base
from amber.daemon.build.registry_base import PullReport, RegistryAccess
from amber.daemon.errors import BadArgs, Busy, NotFound, PermissionDenied

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.server import Connection
    from amber.daemon.storage.db import BuildRecord
    from amber.daemon.storage.roots import Hold


def _namespace(api: Api, conn: Connection, shared: bool, user: int | None, what: str) -> int:
    """The uid whose names ``what`` writes: the caller's own, the shared (0) or, for root, ``user``'s."""
    if user is not None:
        if not conn.peer.is_root:
            raise PermissionDenied(f"only root may {what} another user's image")
        return user
    if shared:
        api.require_admin(conn, f"{what} a shared image", "yours go without --shared")
        return 0
    return conn.peer.uid


@operation(name=str, source=str, shared=(bool, False), insecure=(bool, False), auth=AUTH_ARG)
async def image_import(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    """Name an image: a directory, an OCI archive or layout, or ``docker://REF`` pulled
    with the credentials the user sent (``auth``), as a docker:// base is."""
    name, source = args["name"], args["source"]
    if (
        not name
        or name.startswith(("dir:", "oci:", "tree:", "docker:"))
        or name == "host"
        or "\0" in name
    ):
        raise BadArgs(f"image name {name!r} is reserved or empty")
    owner = _namespace(api, conn, args["shared"], None, "import")
    if ":" not in source.split("/", 1)[0]:
        source = ("dir:" if os.path.isdir(source) else "oci:") + source
    remote = source.startswith("docker://")
    credentials = request_credentials(args["auth"], source) if remote else None
    report: list[PullReport] = []

    def work(writer: Hold) -> bytes:
        uid, gid = conn.peer.uid, conn.peer.gid
        limit = api.ctx.config.import_max_size
        resolved = resolve_base(
            writer.store,
            api.ctx.db,
            source,
            uid=uid,
            gid=gid,
            groups=conn.peer.groups,
            import_max_size=limit,
            registry=RegistryAccess(credentials, args["insecure"], writer.complete_one),
        )
        if resolved.pulled is not None:
            report.append(resolved.pulled)
        tree = resolved.tree
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
        # A pulled image is recorded by digest: what the name means stays put if the tag moves.
        recorded = report[0].pinned if report else source
        api.ctx.db.put_image(name, tree.hex(), recorded, uid=owner)
    out: dict[str, Any] = {"name": name, "tree": tree.hex(), "uid": owner}
    if report:
        out.update(source=recorded, digest=report[0].digest, manifest=report[0].manifest,
                   pulled=report[0].pulled, layers=report[0].layers, bytes=report[0].size)  # fmt: skip
    return out


@operation()
async def image_ls(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    """Every image (with its owner) for root; for anyone else theirs and root's (the
    shared ones), not another user's."""
    images = api.ctx.db.list_images()
    return {"images": [i for i in images if i["uid"] == 0 or api.owns(conn, i["uid"])]}


@operation(name=str, shared=(bool, False), user=(int | None, None))
async def image_rm(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    """Forget a named image of the caller's namespace (``shared``: root's; ``user``: for
    root, that uid's), unless a pin or a live build still uses it. The tree stays in
    the store until GC finds nothing else keeps it.
    """
    db, name = api.ctx.db, args["name"]
    owner = _namespace(api, conn, args["shared"], args["user"], "remove")
    image = db.get_image(name, owner)
    if image is None:
        where = "among the shared ones" if owner == 0 else "of yours"
        if owner not in (0, conn.peer.uid):
            where = f"of uid {owner}"
        elif owner != 0 and db.get_image(name, 0) is not None:
            where += " (the shared one is root's: --shared)"
        raise NotFound(f"no image {name!r} {where} (see `amber image ls`)")
    for build in api.manager.running():
        if str(build.spec.base) == name and _resolves(api, build.uid, name, owner):
            raise Busy(f"image {name} is the base of build {build.id}, which is {build.status}")
    pin = _pin_using(api, name, owner, image["tree"])
    if pin is not None:
        raise Busy(
            f"image {name} is used by pin {pin[0]} ({pin[1]}); `amber pin rm {pin[0]}` first",
        )
    db.delete_image(name, owner)
    return {"name": name, "uid": owner, "tree": image["tree"], "removed": True}


def _resolves(api: Api, uid: int, name: str, owner: int) -> bool:
    """Whether ``name`` in a spec of ``uid`` means ``owner``'s image."""
    image = api.ctx.db.find_image(name, uid)
    return image is not None and image["uid"] == owner


def _pin_using(api: Api, name: str, owner: int, tree: str) -> tuple[str, str] | None:
    """A pin holding the image's tree, or a build made on it: (pin name, its target)."""
    db = api.ctx.db
    for pin in db.list_pins():
        roots = pin.roots_dict()
        if tree in roots.get("trees", ()):
            return pin.name, pin.target
        for build_id in roots.get("builds", ()):
            record: BuildRecord | None = db.get_build(build_id)
            if record is not None and record.base == name and record.base_owner in (owner, None):
                return pin.name, pin.target
    return None
