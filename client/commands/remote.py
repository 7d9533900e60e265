"""``amber push`` and ``amber pull``: results to and from remote caches, by hand.

amberd does the work (daemon/api/remote.py) and reports each result as it
goes (printed on stderr by ``Context.call``, failures with their reason);
here is the summary, and the exit status: 1 when any result failed or was
not found.
"""

from __future__ import annotations

from ..cli import EXIT_FAILED, EXIT_OK
from ..units import human_bytes
from . import printed_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Mapping
    from typing import Any

    from ..cli import Context


def _size(n: int) -> str:
    return f"{human_bytes(n)} ({n} bytes)"


def _failed(result: Mapping[str, Any]) -> int:
    """1 when a result failed, was not found or not tried (each was said as it happened)."""
    bad = [r for r in result.get("results", []) if r.get("outcome") in ("failed", "missing")]
    return EXIT_FAILED if bad or result.get("not-tried") else EXIT_OK


def _run(ctx: Context, ns: argparse.Namespace, op: str, args: dict[str, Any],
         headline: Callable[[Mapping[str, Any]], str], extras: dict[str, str]) -> int:  # fmt: skip
    """Send ``op``; print ``headline`` and the counts of ``extras`` (outcome: words) if any."""
    result = ctx.call(op, {k: v for k, v in args.items() if v is not None})
    if not printed_json(ctx, ns, result):
        line = headline(result)
        for name, words in extras.items():
            if result.get(name):
                line += f", {result[name]} {words}"
        ctx.print(line)
    return _failed(result)


def cmd_push(ctx: Context, ns: argparse.Namespace) -> int:
    return _run(ctx, ns, "push", {"build": ns.build, "to": ns.to}, lambda r: (
        f"pushed {r.get('pushed', 0)} results of {r.get('build')} to {', '.join(r.get('urls', []))}: "
        f"{_size(r.get('bytes', 0))} uploaded, {r.get('present', 0)} skipped as present"
    ), {"failed": "failed", "not-tried": "not tried"})  # fmt: skip


def cmd_pull(ctx: Context, ns: argparse.Namespace) -> int:
    return _run(ctx, ns, "pull", {"target": ns.target, "remote": ns.source}, lambda r: (
        f"pulled {r.get('pulled', 0)} results of {r.get('target')}: {_size(r.get('bytes', 0))} "
        f"downloaded, {r.get('present', 0)} already in the store"
    ), {"missing": "not found", "failed": "failed"})  # fmt: skip
