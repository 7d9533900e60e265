"""The commands of ``amber``, one module per kind of thing they touch.

The parser (parser.py) names each command's function as ``"module.name"``
and imports its module only when it runs. This package's own code is what
several commands share: printing a daemon's answer, paths and the terminal.
"""

from __future__ import annotations

import os

from ..cli import EXIT_OK
from ..render import to_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Mapping
    from typing import Any

    from ..cli import Context


def print_result(
    ctx: Context,
    ns: argparse.Namespace,
    result: Mapping[str, Any],
    render: Callable[[Any], str],
    ids: str | None = None,
) -> int:
    """Print ``result`` as JSON, as ids only (``-q``, from the list's ``ids`` key), or rendered."""
    if getattr(ns, "quiet", False) and ids is not None:
        listed = next((v for v in result.values() if isinstance(v, list)), [])
        for item in listed:
            ctx.print(str(item.get(ids)))
        return EXIT_OK
    ctx.print(to_json(result) if getattr(ns, "json", False) else render(result))
    return EXIT_OK


def printed_json(ctx: Context, ns: argparse.Namespace, result: Mapping[str, Any]) -> bool:
    """With ``--json``, print the daemon's answer as it is and say so."""
    if getattr(ns, "json", False):
        ctx.print(to_json(result))
        return True
    return False


def absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def terminal_size() -> tuple[int | None, int | None]:
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return size.lines, size.columns
    return None, None
