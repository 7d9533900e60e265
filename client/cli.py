"""The ``amber`` command: its entry point, the context commands run in, exit codes.

Start-up time is part of the product (a fully cached ``amber build`` must
finish within 0.15 s end to end), so this module imports only the blocking
client and the parser (parser.py); each command's module (commands/) is
imported when that command runs, and the live terminal view, ``subprocess``,
``json`` and ``signal`` by the code paths that need them.

Exit codes: 0 success, 1 a build failed or errored (or the daemon refused a
request), 2 usage or spec error, 3 amberd unreachable, 130 interrupted.
``amber shell BUILD -- CMD`` exits with CMD's status, so its own failures
all exit 125 (as podman's and docker's do), which a command rarely uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .errors import AmberError, ErrorCode
from .parser import VERSION_ONLY, build_parser

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, TextIO

    from .connection import Connection

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_SHELL_ERROR = 125  # amber shell's own failure: CMD's statuses are all taken
EXIT_PIPE = 141  # what a shell reports for a process killed by SIGPIPE, as `git log | head` does
HELLO_TIMEOUT = 30.0  # a daemon that accepts but never answers is stuck, not busy

_USAGE_CODES = frozenset({ErrorCode.SPEC_ERROR, ErrorCode.BAD_ARGS, ErrorCode.BAD_REQUEST})
_UNREACHABLE_CODES = frozenset({ErrorCode.UNREACHABLE, ErrorCode.CONNECTION_LOST})


class UsageError(Exception):
    """A mistake on the command line or in a local file: exit 2 with the message."""


class BuildInterrupted(Exception):
    """Ctrl-C during ``amber build``; carries the build id to reattach to."""

    def __init__(self, build: str | None) -> None:
        super().__init__(build)
        self.build = build


def exit_code_for(exc: AmberError) -> int:
    """The exit code for an error, from its stable code."""
    if exc.code in _UNREACHABLE_CODES:
        return EXIT_UNREACHABLE
    if exc.code in _USAGE_CODES:
        return EXIT_USAGE
    return EXIT_FAILED


# --- running commands -------------------------------------------------------------


class Context:
    """What a command needs: its arguments, output streams and (lazily) the daemon."""

    def __init__(self, ns: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.ns = ns
        self.out = out
        self.err = err
        self.conn: Connection | None = None

    def connect(self) -> Connection:
        """The connection to amberd, opened (and the daemon started) on first use.

        Requests wait as long as the daemon works (gc, export, a build): a
        stuck daemon is the user's to interrupt, a slow one is not an error.
        """
        if self.conn is None:
            from .autostart import open_connection  # socket, msgpack: only commands that connect

            self.conn = open_connection(self.ns.socket, timeout=HELLO_TIMEOUT, say=self.say)
        set_timeout(self.conn, None)
        return self.conn

    def call(self, op: str, args: Mapping[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        """Make a request, showing any notes the daemon sends along; return its result."""
        stream = self.connect().request(op, args, fds=fds)
        for ev in stream:
            message = (ev.get("data") or {}).get("message")
            if ev.get("event") in ("note", "progress") and message:
                self.say(f"amber: {message}")
        return stream.wait()

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def say(self, text: str) -> None:
        """A message for the user, kept off stdout so it never mixes with data."""
        self.err.write(text + "\n")
        self.err.flush()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``amber`` with ``argv`` (default: the command line); return the exit code."""
    head, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    command = command_of(head)
    parser = build_parser(VERSION_ONLY if command is None and _asks_version(head) else command)
    try:
        ns = parse_command_line(parser, head)
    except SystemExit as exc:  # --help, --version or a usage error, already printed
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        return own_failure(command, code) if code else code
    ns.passthrough = passthrough
    ctx = Context(ns, sys.stdout, sys.stderr)
    try:
        return ns.func(ctx, ns)
    except UsageError as exc:
        ctx.say(f"amber: {exc}")
        return own_failure(command, EXIT_USAGE)
    except BuildInterrupted as exc:
        ctx.say(interrupted_message(exc.build))
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        ctx.say("")  # end the line the terminal echoed ^C on
        return EXIT_INTERRUPTED
    except AmberError as exc:
        ctx.say(f"amber: {describe_error(exc, ctx)}")
        return own_failure(command, exit_code_for(exc))
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    finally:
        ctx.close()


def own_failure(command: str | None, code: int) -> int:
    """The exit code for amber's own failure: ``code``, except under ``amber shell``.

    There every status 0-255 may be CMD's, so all of amber's failures (usage,
    no such build, not yours, daemon unreachable) exit 125, as podman's do.
    """
    return EXIT_SHELL_ERROR if command == "shell" else code


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args``, but an unknown flag is reported with its command's usage.

    argparse leaves unrecognised arguments to the top-level parser, whose usage
    says nothing about ``amber build``'s flags.
    """
    ns, extras = parser.parse_known_args(argv)
    if extras:
        getattr(ns, "group_parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
    return ns


def describe_error(exc: AmberError, ctx: Context) -> str:
    """The daemon's message, with what the user can do about the common cases."""
    if exc.code == ErrorCode.UNKNOWN_OP:
        server = ctx.conn.server if ctx.conn is not None and ctx.conn.server else "amberd"
        return (
            f"`amber {ctx.ns.label}` is not supported by this daemon ({server}): {exc.message}; "
            "it needs a newer amberd"
        )
    if exc.code == ErrorCode.CONNECTION_LOST:
        return f"{exc.message}; did amberd stop? (`amber status` tells)"
    return exc.message


def interrupted_message(build: str | None) -> str:
    if build is None:
        return "\namber: interrupted before amberd named the build; `amber ps` shows it if it runs"
    return (
        f"\namber: interrupted; build {build} goes on in amberd\n"
        f"  amber log -f {build}    reattach to it\n"
        f"  amber cancel {build}    stop it"
    )


def _silence_stdout() -> None:
    # Python flushes stdout again at exit and would complain a second time.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Cut off the arguments that go verbatim to another program.

    ``amber daemon ARGS`` hands ARGS to amberd untouched (``--help`` too), and
    in ``amber shell BUILD [opts] -- CMD...`` everything after ``--`` is the
    command; argparse cannot be told either reliably. Returns (what argparse
    parses, the passed-through arguments or None).
    """
    i = _command_index(argv)
    if i is None:
        return argv, None
    if argv[i] == "daemon":
        return argv[: i + 1], argv[i + 1 :]
    if argv[i] == "shell" and "--" in argv[i + 1 :]:
        cut = argv.index("--", i + 1)
        return argv[:cut], argv[cut + 1 :]
    return argv, None


def command_of(argv: Sequence[str]) -> str | None:
    """The command word in ``argv``, if any (None also when top-level help comes first)."""
    i = _command_index(argv)
    return None if i is None else argv[i]


def _asks_version(argv: Sequence[str]) -> bool:
    """``amber [--socket PATH] --version``: no command's parser is needed to answer."""
    return "--version" in argv and not {"-h", "--help"} & set(argv)


def _command_index(argv: Sequence[str]) -> int | None:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in ("-h", "--help"):
            return None
        i += 2 if argv[i] == "--socket" else 1
    return i if i < len(argv) else None


def set_timeout(conn: Connection, timeout: float | None) -> None:
    # A connection that failed has closed its socket; the failure itself was
    # already raised to whoever used it, so there is nothing to do here.
    with contextlib.suppress(OSError):
        conn.settimeout(timeout)
