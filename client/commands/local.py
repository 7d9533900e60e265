"""Commands that do not ask amberd: ``amber daemon`` (becomes it) and ``amber completion``."""

from __future__ import annotations

import os
import sys

from ..cli import EXIT_FAILED, EXIT_OK, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from ..cli import Context


def cmd_daemon(ctx: Context, ns: argparse.Namespace) -> int:
    """Become amberd, in the foreground, with the arguments given."""
    argv = daemon_argv(ns.socket, ns.passthrough or [])
    ctx.out.flush()
    ctx.err.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        raise UsageError(f"cannot run amberd ({argv[0]}): {exc.strerror or exc}") from None
    return EXIT_FAILED  # not reached: execv replaced this process


def daemon_argv(socket: str | None, args: Sequence[str]) -> list[str]:
    """amberd's command line; ``amber --socket PATH daemon`` serves on PATH."""
    extra: list[str] = []
    named = any(a == "--socket" or a.startswith("--socket=") for a in args)
    if socket and not named:
        extra = ["--socket", socket]
    return [sys.executable, "-m", "amber.daemon.main", *extra, *args]


def cmd_completion(ctx: Context, ns: argparse.Namespace) -> int:
    from ..completion import script  # shtab and the whole parser: only for this command

    ctx.out.write(script(ns.shell))
    ctx.out.flush()
    return EXIT_OK
