"""Following builds: ``amber ps``, ``builds``, ``show``, ``log``, ``cancel`` and ``status``."""

from __future__ import annotations

import os

from ..autostart import socket_path
from ..cli import EXIT_FAILED, EXIT_OK, UsageError
from ..render import render_builds, render_ps, render_status, to_json
from . import print_result, printed_json, terminal_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, TextIO

    from ..cli import Context


def cmd_ps(ctx: Context, ns: argparse.Namespace) -> int:
    return print_result(ctx, ns, ctx.call("ps", {}), render_ps, ids="id")


def cmd_builds(ctx: Context, ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"limit": ns.limit}
    if ns.all:
        args["all"] = True
    return print_result(
        ctx, ns, ctx.call("builds", args), lambda r: render_builds(r, ns.all), ids="id"
    )


def cmd_log(ctx: Context, ns: argparse.Namespace) -> int:
    """Write a build's output as it was produced: raw bytes, one header per step."""
    stream = ctx.connect().request("log", {"build": ns.build, "step": ns.step, "follow": ns.follow})
    shown: str | None = None
    at_line_start = True
    for ev in stream:
        data = ev.get("data") or {}
        if ev.get("event") == "note" and data.get("message"):
            # With the log, not on stderr: `amber log B | grep stamp` must find them.
            text = f"amber: {data['message']}\n"
            _write_bytes(ctx.out, (b"" if at_line_start else b"\n") + text.encode())
            at_line_start = True
        if ev.get("event") != "log":
            continue
        chunk = data.get("data") or b""
        chunk = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        step = data.get("step")
        if ns.step is None and step != shown:
            header = f"==> step {step} <==\n"
            _write_bytes(ctx.out, (b"" if at_line_start else b"\n") + header.encode())
            shown = step
        if chunk:
            _write_bytes(ctx.out, chunk)
            at_line_start = chunk.endswith(b"\n")
    result = stream.wait()
    if not ns.follow:
        return EXIT_OK
    status = result.get("status")
    ctx.say(f"amber: build {result.get('build', ns.build)}: {status}")
    return EXIT_OK if status == "success" else EXIT_FAILED


def cmd_cancel(ctx: Context, ns: argparse.Namespace) -> int:
    result = ctx.call("cancel", {"build": ns.build})
    if printed_json(ctx, ns, result):
        return EXIT_OK
    bid, status = result.get("build", ns.build), result.get("status")
    if result.get("cancelled"):
        ctx.print(f"cancelled build {bid} (now {status})")
    else:
        ctx.print(f"build {bid} was not running ({status}); nothing to cancel")
    return EXIT_OK


def cmd_status(ctx: Context, ns: argparse.Namespace) -> int:
    path = socket_path(ns.socket)
    return print_result(ctx, ns, ctx.call("status", {}), lambda r: render_status(r, path))


def cmd_show(ctx: Context, ns: argparse.Namespace) -> int:
    """A build's record: summary, steps and a timeline; ``--trace`` writes a Chrome trace."""
    result = ctx.call("show", {"build": ns.build})
    from .. import show  # only `amber show` pays for it

    if ns.trace:
        _write_trace(ctx, ns.trace, show.trace_json(result))
        if ns.trace == "-":
            return EXIT_OK
    if ns.json:
        ctx.print(to_json(result))
        return EXIT_OK
    _lines, cols = terminal_size()
    fancy = show.unicode_ok(ctx.out, os.environ)
    ctx.print(show.render_show(result, unicode=fancy, width=cols or 80))
    return EXIT_OK


def _write_trace(ctx: Context, path: str, text: str) -> None:
    if path == "-":
        ctx.print(text)
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    ctx.say(f"amber: wrote {path}: open it in https://ui.perfetto.dev or chrome://tracing")


def _write_bytes(out: TextIO, data: bytes) -> None:
    """Raw bytes to a text stream, in order with the text already written to it."""
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is None:
        out.write(data.decode("utf-8", "replace"))
    else:
        buffer.write(data)
        buffer.flush()
