"""The store: ``amber image ...``, ``pin ...``, ``gc`` and ``store fsck``."""

from __future__ import annotations

import os

from ..cli import EXIT_FAILED, EXIT_OK
from ..render import render_gc, render_images, render_mapping, render_pins
from . import print_result, printed_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

    from ..cli import Context


def cmd_image_import(ctx: Context, ns: argparse.Namespace) -> int:
    args: dict = {"name": ns.name, "source": local_source(ns.source)}
    if ns.shared:
        args["shared"] = True
    if ns.source.startswith("docker://"):
        from ..registry_auth import auth_for

        auth = auth_for(ns.source)
        if auth:
            args["auth"] = auth
        if ns.insecure:
            args["insecure"] = True
    result = ctx.call("image-import", args)
    if printed_json(ctx, ns, result):
        return EXIT_OK
    if result.get("digest"):
        how = (
            "pulled before"
            if not result.get("pulled")
            else f"{result.get('layers')} layer(s) pulled"
        )
        ctx.print(f"{ns.source} is {result.get('source')} ({how})")
    ctx.print(f"imported {result.get('name', ns.name)}: tree {result.get('tree')}")
    ctx.print(f'use it with base = "{result.get("name", ns.name)}" in a spec')
    return EXIT_OK


def cmd_image_ls(ctx: Context, ns: argparse.Namespace) -> int:
    return print_result(ctx, ns, ctx.call("image-ls", {}), render_images)


def cmd_image_rm(ctx: Context, ns: argparse.Namespace) -> int:
    args = {"name": ns.name, "shared": ns.shared, "user": ns.user}
    result = ctx.call("image-rm", {k: v for k, v in args.items() if v not in (None, False)})
    if not printed_json(ctx, ns, result):
        ctx.print(f"removed image {ns.name}; the next gc may collect its tree")
    return EXIT_OK


def local_source(source: str) -> str:
    """A source with its local path made absolute: the daemon does not share our cwd."""
    for prefix in ("dir:", "oci:"):
        if source.startswith(prefix):
            return prefix + os.path.abspath(source.removeprefix(prefix))
    if ":" in source.split("/", 1)[0]:  # tree:..., docker://... and other schemes
        return source
    return os.path.abspath(source)


def cmd_pin_add(ctx: Context, ns: argparse.Namespace) -> int:
    if printed_json(ctx, ns, ctx.call("pin-add", {"name": ns.name, "target": ns.target})):
        return EXIT_OK
    ctx.print(f"pinned {ns.target} as {ns.name}")
    return EXIT_OK


def cmd_pin_rm(ctx: Context, ns: argparse.Namespace) -> int:
    result = ctx.call("pin-rm", {"name": ns.name})
    if printed_json(ctx, ns, result):
        return EXIT_OK
    ctx.print(f"removed pin {ns.name}; the next gc may collect what it held")
    for remote in result.get("remotes") or []:
        if isinstance(remote, dict):
            ctx.print(f"  its tags in {remote.get('url')} are being re-pointed at a tombstone")
    return EXIT_OK


def cmd_pin_ls(ctx: Context, ns: argparse.Namespace) -> int:
    return print_result(ctx, ns, ctx.call("pin-ls", {}), render_pins)


def cmd_gc(ctx: Context, ns: argparse.Namespace) -> int:
    args = {"max_freed": ns.max_freed, "keep_failed_days": ns.keep_failed, "dry_run": ns.dry_run}
    return print_result(ctx, ns, ctx.call("gc", args), lambda r: render_gc(r, ns.dry_run))


def cmd_fsck(ctx: Context, ns: argparse.Namespace) -> int:
    """Check the store; exit 1 when it found problems, repaired or not (as fsck(8) does)."""
    result = ctx.call("fsck", {"repair": ns.repair})
    print_result(ctx, ns, result, render_mapping)
    found = any(result.get(k) for k in ("problems", "corrupt", "missing", "errors"))
    return EXIT_FAILED if found else EXIT_OK
