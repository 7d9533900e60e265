"""The ``amber`` command: argument parsing, one small function per command, exit codes.

Start-up time is part of the product (a fully cached ``amber build`` must
finish within 0.15 s end to end), so this module imports only the blocking
client and the plain renderer; the live terminal view, ``subprocess``,
``json`` and ``signal`` are imported by the code paths that need them.

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

from . import __version__
from .autostart import open_connection, socket_path
from .errors import AmberError, ErrorCode
from .render import (
    PlainBuildView,
    build_json,
    describe_item,
    render_builds,
    render_diff,
    render_gc,
    render_images,
    render_mapping,
    render_pins,
    render_ps,
    render_status,
    to_json,
)
from .units import parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, NoReturn, TextIO

    from .connection import Connection, Stream

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
            self.conn = open_connection(self.ns.socket, timeout=HELLO_TIMEOUT, say=self.say)
        _settimeout(self.conn, None)
        return self.conn

    def call(self, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Make a request, showing any notes the daemon sends along; return its result."""
        stream = self.connect().request(op, args)
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
    parser = build_parser(command)
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


def _command_index(argv: Sequence[str]) -> int | None:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in ("-h", "--help"):
            return None
        i += 2 if argv[i] == "--socket" else 1
    return i if i < len(argv) else None


# --- amber build ----------------------------------------------------------------------


def cmd_build(ctx: Context, ns: argparse.Namespace) -> int:
    """Build each spec in turn; the worst outcome decides the exit code."""
    check_build_options(ns)
    specs = [read_spec(path) for path in ns.specs]  # all readable before any build starts
    worst = EXIT_OK
    for i, (path, text) in enumerate(specs):
        code = build_one(ctx, ns, path, text)
        worst = max(worst, code)
        left = len(specs) - i - 1
        if code != EXIT_OK and ns.on_error == "quit" and left:
            ctx.say(
                f"amber: stopping; {left} more spec(s) not built (--on-error continue builds them)"
            )
            break
    return worst


def check_build_options(ns: argparse.Namespace) -> None:
    if len(ns.specs) > 1 and (ns.pin or ns.out_link):
        raise UsageError("--pin and --out-link name one result: give one SPEC with them")
    how = ns.export_on_failure
    if (ns.export_path or ns.export_ref) and how is None:
        raise UsageError("--export-path and --export-ref go with --export-on-failure")
    if how == "registry" and not ns.export_ref:
        raise UsageError("--export-on-failure registry needs --export-ref REF")
    if how in ("oci", "docker-archive") and ns.export_ref:
        raise UsageError(
            f"--export-on-failure {how} writes a file: use --export-path, not --export-ref"
        )
    if how == "engine" and (ns.export_path or ns.detach):
        raise UsageError(
            "--export-on-failure engine: amber loads the image into the engine itself when the "
            "build fails, so it stays attached (no --detach) and names it with --export-ref NAME:TAG"
        )
    if ns.engine_socket and how != "engine":
        raise UsageError("--engine-socket goes with --export-on-failure engine")


def read_spec(path: str) -> tuple[str, str]:
    """A spec file's absolute path and text; the daemon resolves relative paths in it from there."""
    absolute = os.path.abspath(path)
    try:
        with open(absolute, encoding="utf-8") as f:
            return absolute, f.read()
    except FileNotFoundError:
        raise UsageError(f"spec file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a spec file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: a spec must be UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def build_args(ns: argparse.Namespace, path: str, text: str) -> dict[str, Any]:
    """The ``build`` request's arguments; export options only when asked (older daemons refuse them)."""
    args: dict[str, Any] = {
        "spec_text": text,
        "spec_path": path,
        "retry_failed": ns.retry_failed,
        "pin": ns.pin,
        "out_link": _absolute(ns.out_link),
        "detach": ns.detach,
    }
    if ns.out_link_privileged:  # only when asked: older daemons refuse arguments they lack
        args["out_link_privileged"] = True
    if ns.export_on_failure and ns.export_on_failure != "engine":  # engine: see build_one
        args["export_on_failure"] = ns.export_on_failure
        args["export_path"] = _absolute(ns.export_path)
        args["export_ref"] = ns.export_ref
    return args


def build_one(ctx: Context, ns: argparse.Namespace, path: str, text: str) -> int:
    """Run one build, showing it as it goes; return its exit code."""
    human = ctx.err if ns.json else ctx.out  # with --json, stdout carries JSON only
    view = make_build_view(human, path)
    try:
        conn = ctx.connect()
        result = follow(conn, conn.request("build", build_args(ns, path, text)), view)
    except KeyboardInterrupt:
        view.abort()
        raise BuildInterrupted(view.state.build) from None
    except AmberError as exc:
        view.abort()
        if exc.code in (ErrorCode.SPEC_ERROR, ErrorCode.BAD_ARGS):
            # Name the spec in its errors, as there may be several; bad-args
            # is about the request (an older daemon, say), not the file.
            named = exc.code == ErrorCode.BAD_ARGS or path in exc.message
            ctx.say(f"amber: {exc.message if named else f'{path}: {exc.message}'}")
            return EXIT_USAGE
        if exc.code == ErrorCode.CONNECTION_LOST and view.state.build:
            bid = view.state.build
            raise AmberError(
                exc.code,
                f"{exc.message} during build {bid}; `amber builds` tells what became of it",
            ) from None
        raise
    view.finish(result)
    if ns.export_on_failure == "engine" and result.get("frozen") and result.get("build"):
        with contextlib.suppress(AmberError):  # said already; the build's outcome stands
            _export_failure_to_engine(ctx, ns, result["build"])
    if ns.json:
        ctx.print(to_json(build_json(result)))
    status = result.get("status")
    if status == "success" or (ns.detach and status not in ("failed", "errored")):
        return EXIT_OK
    return EXIT_FAILED


def _export_failure_to_engine(ctx: Context, ns: argparse.Namespace, build: str) -> None:
    """``--export-on-failure engine``: the client, not amberd, connects to the engine (see engine.py)."""
    try:
        export_to_engine(ctx, build, False, None, ns.export_ref, ns.engine_socket)
    except AmberError as exc:
        ctx.say(f"amber: export on failure did not complete: {exc.message}")
        raise


def make_build_view(out: TextIO, spec_path: str) -> Any:
    """The live view on a terminal that can move its cursor, plain lines otherwise."""
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        tty = False
    if tty and os.environ.get("TERM", "dumb") != "dumb":
        from .live import LiveBuildView  # only terminals pay for it

        return LiveBuildView(out, spec_path)
    return PlainBuildView(out, spec_path)


def follow(conn: Connection, stream: Stream, view: Any) -> dict[str, Any]:
    """Feed a build's events to ``view`` until its result; tick the view while nothing comes."""
    interval = view.tick_interval
    _settimeout(conn, interval)
    try:
        while True:
            try:
                ev = next(stream)
            except StopIteration as stop:
                return stop.value
            except AmberError as exc:
                # A timeout consumed nothing: the stream is still good to read.
                if exc.code == ErrorCode.TIMEOUT and interval is not None:
                    view.tick()
                    continue
                raise
            view.event(ev)
    finally:
        _settimeout(conn, None)


# --- following builds ----------------------------------------------------------------


def cmd_ps(ctx: Context, ns: argparse.Namespace) -> int:
    return _show(ctx, ns, ctx.call("ps", {}), render_ps, ids="id")


def cmd_builds(ctx: Context, ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"limit": ns.limit}
    if ns.all:
        args["all"] = True
    return _show(ctx, ns, ctx.call("builds", args), lambda r: render_builds(r, ns.all), ids="id")


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
    if _printed_json(ctx, ns, result):
        return EXIT_OK
    bid, status = result.get("build", ns.build), result.get("status")
    if result.get("cancelled"):
        ctx.print(f"cancelled build {bid} (now {status})")
    else:
        ctx.print(f"build {bid} was not running ({status}); nothing to cancel")
    return EXIT_OK


def cmd_status(ctx: Context, ns: argparse.Namespace) -> int:
    path = socket_path(ns.socket)
    return _show(ctx, ns, ctx.call("status", {}), lambda r: render_status(r, path))


# --- images ------------------------------------------------------------------------


def cmd_image_import(ctx: Context, ns: argparse.Namespace) -> int:
    result = ctx.call("image-import", {"name": ns.name, "source": local_source(ns.source)})
    if _printed_json(ctx, ns, result):
        return EXIT_OK
    ctx.print(f"imported {result.get('name', ns.name)}: tree {result.get('tree')}")
    ctx.print(f'use it with base = "{result.get("name", ns.name)}" in a spec')
    return EXIT_OK


def cmd_image_ls(ctx: Context, ns: argparse.Namespace) -> int:
    return _show(ctx, ns, ctx.call("image-ls", {}), render_images)


def cmd_image_rm(ctx: Context, ns: argparse.Namespace) -> int:
    result = ctx.call("image-rm", {"name": ns.name})
    if not _printed_json(ctx, ns, result):
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


# --- the daemon ----------------------------------------------------------------------


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


# --- frozen builds ----------------------------------------------------------------------


def cmd_shell(ctx: Context, ns: argparse.Namespace) -> int:
    """Enter a build's state with this terminal; exit with the shell's (or CMD's) status."""
    command = ns.passthrough or None
    rows, cols = _terminal_size()
    args = {
        "build": ns.build,
        "before": ns.before,
        "step": ns.step,
        "argv": command,
        "term": os.environ.get("TERM"),
        "rows": rows,
        "cols": cols,
    }
    fds, opened = _std_fds()
    try:
        stream = ctx.connect().request("shell", args, fds=fds)
        # In an interactive shell, Ctrl-C, Ctrl-\ and Ctrl-Z are the shell's
        # business; they must not kill or stop the client holding it open.
        with _ignoring_job_signals(command is None):
            result = stream.wait()
    finally:
        for fd in opened:
            os.close(fd)
    return exit_status(result.get("exit_code"))


def exit_status(code: object) -> int:
    """A process's status as our exit code: signals as 128+N, the way shells report them.

    A status amberd did not give is amber's failure, not CMD's: 125.
    """
    if not isinstance(code, int) or isinstance(code, bool) or code >= 256:
        return EXIT_SHELL_ERROR
    if code < 0:
        return 128 + (-code & 0x7F)
    return code


def cmd_diff(ctx: Context, ns: argparse.Namespace) -> int:
    result = ctx.call("diff", {"build": ns.build, "step": ns.step, "stat": ns.stat})
    return _show(ctx, ns, result, lambda r: render_diff(r, ns.stat))


def cmd_export(ctx: Context, ns: argparse.Namespace) -> int:
    if ns.format and not ns.output:
        raise UsageError(
            "--format is for -o FILE; a push sends an OCI image, an engine gets a docker archive"
        )
    if ns.insecure and not ns.push:
        raise UsageError("--insecure goes with --push")
    if (ns.tag or ns.engine_socket) and not ns.to_engine:
        raise UsageError("--tag and --engine-socket go with --to-engine")
    if ns.to_engine:
        return export_to_engine(ctx, ns.build, ns.before, ns.step, ns.tag, ns.engine_socket)
    args = {
        "build": ns.build,
        "before": ns.before,
        "step": ns.step,
        "output": _absolute(ns.output),
        "format": ns.format or "oci",
        "push": ns.push,
        "insecure": ns.insecure,
    }
    result = ctx.call("export", args)
    if _printed_json(ctx, ns, {"build": ns.build, **result}):
        return EXIT_OK
    where = result.get("path") or result.get("ref") or ns.output or ns.push
    ctx.print(
        f"exported build {ns.build} to {where} "
        f"({result.get('layers', '?')} layers, digest {result.get('digest', '?')})"
    )
    if ns.output:
        ctx.print(f"load it with `podman load -i {where}` or `docker load -i {where}`")
    return EXIT_OK


def export_to_engine(
    ctx: Context, build: str, before: bool, step: str | None, tag: str | None, socket: str | None
) -> int:
    """Load a build's state into a container engine; the client connects to it, not amberd."""
    from .engine import export_to_engine as stream_into

    args = {"build": build, "before": before, "step": step, "tag": tag}
    result = stream_into(ctx.connect(), args, socket, ctx.say)
    if _printed_json(ctx, ctx.ns, {"build": build, **result}):
        return EXIT_OK
    name = ", ".join(result.get("loaded") or []) or result.get("name", "?")
    ctx.print(
        f"loaded build {build} into the engine at {result['socket']} as {name} "
        f"({result.get('layers', '?')} layers, image id {result.get('digest', '?')})"
    )
    return EXIT_OK


def cmd_import(ctx: Context, ns: argparse.Namespace) -> int:
    source = os.path.abspath(ns.source) if os.path.exists(ns.source) else ns.source
    result = ctx.call("import", {"source": source, "insecure": ns.insecure})
    if _printed_json(ctx, ns, result):
        return EXIT_OK
    bid = result.get("build")
    ctx.print(f"imported as build {bid}: `amber shell {bid}`, `amber diff {bid}`")
    return EXIT_OK


def cmd_verify(ctx: Context, ns: argparse.Namespace) -> int:
    """Check a spec (a file that exists, or a name ending in .toml) or a build; exit 1 on problems."""
    if os.path.exists(ns.target) or ns.target.endswith(".toml"):
        path, text = read_spec(ns.target)
        result = ctx.call("verify", {"spec_text": text, "spec_path": path})
    else:
        result = ctx.call("verify", {"build": ns.target})
    problems = result.get("problems") or []
    if ns.json:
        ctx.print(to_json(result))
    elif problems:
        for problem in problems:
            ctx.print(describe_item(problem))
    else:
        ctx.print(f"{ns.target}: no problems found")
    return EXIT_FAILED if problems else EXIT_OK


def cmd_delete(ctx: Context, ns: argparse.Namespace) -> int:
    if _printed_json(ctx, ns, ctx.call("delete", {"build": ns.build})):
        return EXIT_OK
    ctx.print(f"deleted build {ns.build}")
    return EXIT_OK


def cmd_show(ctx: Context, ns: argparse.Namespace) -> int:
    """A build's record: summary, steps and a timeline; ``--trace`` writes a Chrome trace."""
    result = ctx.call("show", {"build": ns.build})
    from . import show  # only `amber show` pays for it

    if ns.trace:
        _write_trace(ctx, ns.trace, show.trace_json(result))
        if ns.trace == "-":
            return EXIT_OK
    if ns.json:
        ctx.print(to_json(result))
        return EXIT_OK
    _lines, cols = _terminal_size()
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


# --- pins and the store ----------------------------------------------------------------


def cmd_pin_add(ctx: Context, ns: argparse.Namespace) -> int:
    if _printed_json(ctx, ns, ctx.call("pin-add", {"name": ns.name, "target": ns.target})):
        return EXIT_OK
    ctx.print(f"pinned {ns.target} as {ns.name}")
    return EXIT_OK


def cmd_pin_rm(ctx: Context, ns: argparse.Namespace) -> int:
    if _printed_json(ctx, ns, ctx.call("pin-rm", {"name": ns.name})):
        return EXIT_OK
    ctx.print(f"removed pin {ns.name}; the next gc may collect what it held")
    return EXIT_OK


def cmd_pin_ls(ctx: Context, ns: argparse.Namespace) -> int:
    return _show(ctx, ns, ctx.call("pin-ls", {}), render_pins)


def cmd_gc(ctx: Context, ns: argparse.Namespace) -> int:
    args = {"max_freed": ns.max_freed, "keep_failed_days": ns.keep_failed, "dry_run": ns.dry_run}
    return _show(ctx, ns, ctx.call("gc", args), lambda r: render_gc(r, ns.dry_run))


def cmd_fsck(ctx: Context, ns: argparse.Namespace) -> int:
    """Check the store; exit 1 when it found problems, repaired or not (as fsck(8) does)."""
    result = ctx.call("fsck", {"repair": ns.repair})
    _show(ctx, ns, result, render_mapping)
    found = any(result.get(k) for k in ("problems", "corrupt", "missing", "errors"))
    return EXIT_FAILED if found else EXIT_OK


def _show(
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


def _printed_json(ctx: Context, ns: argparse.Namespace, result: Mapping[str, Any]) -> bool:
    """With ``--json``, print the daemon's answer as it is and say so."""
    if getattr(ns, "json", False):
        ctx.print(to_json(result))
        return True
    return False


# --- helpers ------------------------------------------------------------------------------


def _settimeout(conn: Connection, timeout: float | None) -> None:
    # A connection that failed has closed its socket; the failure itself was
    # already raised to whoever used it, so there is nothing to do here.
    with contextlib.suppress(OSError):
        conn.settimeout(timeout)


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def _write_bytes(out: TextIO, data: bytes) -> None:
    """Raw bytes to a text stream, in order with the text already written to it."""
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is None:
        out.write(data.decode("utf-8", "replace"))
    else:
        buffer.write(data)
        buffer.flush()


def _terminal_size() -> tuple[int | None, int | None]:
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return size.lines, size.columns
    return None, None


def _std_fds() -> tuple[list[int], list[int]]:
    """Descriptors 0, 1, 2 to pass, with /dev/null standing in for any that is closed."""
    fds, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            opened.append(os.open(os.devnull, os.O_RDWR))
            fds.append(opened[-1])
    return fds, opened


class _ignoring_job_signals:
    """Ignore SIGINT, SIGQUIT and SIGTSTP while active, when ``active`` (restored after)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> None:
        if self.active:
            import signal

            for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP):
                self.saved[sig] = signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# --- the parser --------------------------------------------------------------------------

_DESCRIPTION = """\
amber runs builds in sandboxes through the amberd daemon. Every step is
snapshotted and cached, failures included; a failed build is frozen, and you
can enter it (amber shell), diff it, export it or import it elsewhere."""

_EPILOG = """\
quick start:
  amber build spec.toml       build (as root, starts amberd if none is running)
  amber builds                the history; frozen failures are marked
  amber shell BUILD           enter a failed build where it failed

exit status:
  0 success, 1 a build failed or errored (or amberd refused the request),
  2 usage or spec error, 3 amberd unreachable, 130 interrupted
  amber shell BUILD -- CMD: CMD's status (128+N if a signal N killed it),
  and 125 for any failure of amber's own (see `amber shell --help`)

environment:
  AMBER_SOCKET         amberd's socket, like --socket
  AMBER_NO_AUTOSTART   never start amberd automatically
  AMBER_SYSTEM_SOCKET  for tests and packagers: where the system daemon's
                       socket is (default /run/amber/amberd.sock)

`amber COMMAND --help` explains each command."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, with help at every level.

    Given the ``command`` about to run, only its arguments are declared: all
    twenty subparsers take ~10 ms to build, a tenth of a cached build's budget.
    """
    parser = _Parser(
        prog="amber",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="amberd's socket (default: $AMBER_SOCKET, else the system daemon's "
        "/run/amber/amberd.sock)",
    )
    parser.add_argument("--version", action="version", version=f"amber {__version__}")
    parser.set_defaults(func=_group_help, group_parser=parser)
    group = parser.add_subparsers(title="commands", metavar="COMMAND")
    commands = _Commands(group, only=command if command in _COMMAND_NAMES else None)
    _add_build(commands)
    _add_following(commands)
    _add_frozen(commands)
    _add_store(commands)
    commands.add(
        "daemon",
        cmd_daemon,
        "run amberd in the foreground (arguments go to amberd)",
        "Run amberd in this terminal; every argument goes to it (see `amber daemon --help`).",
        add_help=False,
    )
    sub = commands.add(
        "completion",
        cmd_completion,
        "print a shell completion script",
        "Print the completion script for SHELL, e.g. for bash:\n"
        "  amber completion bash > ~/.local/share/bash-completion/completions/amber\n"
        "(scripts/setup installs them for all users, and the man page amber(1)).",
    )
    sub.add_argument(
        "shell", choices=("bash", "zsh", "fish"), metavar="SHELL", help="bash, zsh or fish"
    )
    return parser


def cmd_completion(ctx: Context, ns: argparse.Namespace) -> int:
    from .completion import script  # shtab and the whole parser: only for this command

    ctx.out.write(script(ns.shell))
    ctx.out.flush()
    return EXIT_OK


_COMMAND_NAMES = frozenset(
    [
        "build",
        "ps",
        "builds",
        "log",
        "cancel",
        "status",
        "shell",
        "diff",
        "export",
        "import",
        "verify",
        "delete",
        "show",
        "image",
        "pin",
        "gc",
        "store",
        "daemon",
        "completion",
    ]
)


class _Skipped:
    """Stands in for the parser of a command not being run: declarations go nowhere."""

    def add_argument(self, *args: Any, **kw: Any) -> None:
        pass

    def add_mutually_exclusive_group(self, **kw: Any) -> _Skipped:
        return self

    def add_subparsers(self, **kw: Any) -> _Skipped:
        return self

    def add_parser(self, *args: Any, **kw: Any) -> _Skipped:
        return self

    def set_defaults(self, **kw: Any) -> None:
        pass


class _Commands:
    """Adds subcommands that share help formatting and accept ``--socket`` after the command."""

    def __init__(self, group: Any, prefix: str = "", only: str | None = None) -> None:
        self.group = group
        self.prefix = prefix
        self.only = only  # declare only this command (see build_parser)
        self.common = argparse.ArgumentParser(add_help=False)
        # SUPPRESS: when absent here, the value given before the command stays.
        self.common.add_argument(
            "--socket", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )

    def add(
        self,
        name: str,
        func: Callable[[Context, argparse.Namespace], int],
        summary: str,
        description: str | None = None,
        *,
        json: bool = False,
        **kw: Any,
    ) -> Any:
        if self.only is not None and name != self.only:
            return _Skipped()
        sub = self.group.add_parser(
            name,
            parents=[self.common],
            help=summary,
            description=description or summary[:1].upper() + summary[1:] + ".",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )
        sub.set_defaults(func=func, label=self.prefix + name, group_parser=sub)
        if json:
            sub.add_argument("--json", action="store_true", help="print the answer as JSON")
        return sub

    def group_of(self, name: str, summary: str) -> _Commands:
        """A command with subcommands (``amber image ...``); alone, it shows its help."""
        sub = self.add(name, _group_help, summary)
        return _Commands(sub.add_subparsers(title="commands", metavar="COMMAND"), f"{name} ")


def _add_build(commands: _Commands) -> None:
    sub = commands.add(
        "build",
        cmd_build,
        "build specs, one after the other",
        "Build each SPEC (a TOML file) in turn. Steps whose inputs did not change\n"
        "are cache hits; a failed step freezes its build, to enter with amber shell.\n"
        "On a terminal the view updates in place; otherwise one line per event.\n"
        "Ctrl-C detaches: the build goes on in amberd (amber log -f BUILD).",
        epilog="exit status: 0 all builds succeeded, 1 a build failed or errored,\n"
        "2 a spec could not be read or was refused, 3 amberd unreachable",
    )
    sub.add_argument("specs", nargs="+", metavar="SPEC", help="a spec file")
    sub.add_argument(
        "--retry-failed",
        action="store_true",
        help="rerun cached failures instead of failing at once",
    )
    sub.add_argument(
        "--on-error",
        choices=("quit", "continue"),
        default="quit",
        help="after a failed build, stop (quit, the default) or build the next SPEC",
    )
    sub.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per build on stdout (progress goes to stderr)",
    )
    sub.add_argument("--pin", metavar="NAME", help="pin the result as NAME, cache hit or not")
    sub.add_argument(
        "--out-link",
        metavar="PATH",
        help="check the result out at PATH; GC keeps it while PATH exists",
    )
    sub.add_argument(
        "--out-link-privileged",
        action="store_true",
        help="root only: let the out-link keep setuid/setgid bits, file capabilities "
        "(security.* xattrs) and device nodes, which are otherwise left out",
    )
    sub.add_argument("--detach", action="store_true", help="start the build and return at once")
    sub.add_argument(
        "--export-on-failure",
        choices=("oci", "docker-archive", "registry", "engine"),
        help="export the frozen state as soon as a step fails (engine: load it into "
        "Docker or podman, see amber export --to-engine)",
    )
    sub.add_argument("--engine-socket", metavar="PATH", help="the engine's socket (engine)")
    where = sub.add_mutually_exclusive_group()
    where.add_argument(
        "--export-path", metavar="FILE", help="file to export to (oci, docker-archive)"
    )
    where.add_argument(
        "--export-ref",
        metavar="REF",
        help="image reference to push to (registry), or the loaded image's NAME:TAG (engine)",
    )


def _add_following(commands: _Commands) -> None:
    sub = commands.add("ps", cmd_ps, "builds running or queued now", json=True)
    _add_quiet(sub)
    sub = commands.add(
        "builds", cmd_builds, "past builds, newest first; frozen failures marked", json=True
    )
    _add_quiet(sub)
    sub.add_argument(
        "--limit", type=int, default=20, metavar="N", help="show N builds (default 20)"
    )
    sub.add_argument(
        "--all", action="store_true", help="every user's builds, not only yours (adds USER)"
    )
    _add_show(commands)
    sub = commands.add(
        "log",
        cmd_log,
        "a build's output, as it ran",
        "Print a build's output. With -f, follow a running build until it ends\n"
        "(then exit 0 if it succeeded, 1 if not); Ctrl-C stops following, not the build.",
    )
    sub.add_argument("build", metavar="BUILD", help="a build id (see amber builds)")
    sub.add_argument("--step", metavar="NAME", help="only this step's output")
    sub.add_argument(
        "-f", "--follow", action="store_true", help="keep printing while the build runs"
    )
    sub = commands.add(
        "cancel", cmd_cancel, "stop a running build (it ends errored; nothing is cached)", json=True
    )
    sub.add_argument("build", metavar="BUILD")
    commands.add("status", cmd_status, "amberd's version, uptime, builds and store size", json=True)


_SHELL_EPILOG = """\
exit status:
  N    CMD's own status, whatever it is (128+N if signal N killed it);
       the interactive shell's status without CMD
  127  CMD is not found in the build's tree (nor on its PATH)
  126  CMD is there but cannot be executed (no x bit, a directory)
  125  amber's own failure, never CMD's: a usage error, no such build, a build
       that is not yours, amberd unreachable (the message on stderr says which)"""


def _add_frozen(commands: _Commands) -> None:
    sub = commands.add(
        "shell",
        cmd_shell,
        "enter a build's state with a shell",
        "Open a shell in a build's state, on a fresh writable layer (the frozen\n"
        "state never changes), in the step's directory and environment.\n"
        "Default: the state at the failure. With -- CMD, run CMD instead (no\n"
        "terminal needed) and exit with its status.",
        usage="amber shell [-h] [--before] [--step NAME] BUILD [-- CMD ...]",
        epilog=_SHELL_EPILOG,
    )
    sub.add_argument("build", metavar="BUILD")
    sub.add_argument("--before", action="store_true", help="the state before the failing step")
    sub.add_argument(
        "--step", metavar="NAME", help="the state after step NAME (with --before: before it)"
    )
    sub = commands.add(
        "diff",
        cmd_diff,
        "what a step added, modified and deleted",
        "List what a step changed: A added, M modified, D deleted (a trailing /\n"
        "marks a directory, @ a symlink). Default: the failing step.",
        json=True,
    )
    sub.add_argument("build", metavar="BUILD")
    sub.add_argument("--step", metavar="NAME", help="this step instead of the failing one")
    sub.add_argument("--stat", action="store_true", help="sizes and totals")
    sub = commands.add(
        "export",
        cmd_export,
        "export a build's state as an OCI image",
        "Export a build's state as an image: the base and one layer per step,\n"
        "loadable with podman load and docker load, or pushed to a registry.",
        json=True,
    )
    sub.add_argument("build", metavar="BUILD")
    which = sub.add_mutually_exclusive_group()
    which.add_argument("--before", action="store_true", help="the state before the failing step")
    which.add_argument("--step", metavar="NAME", help="the state after step NAME")
    dest = sub.add_mutually_exclusive_group(required=True)
    dest.add_argument("-o", "--output", metavar="FILE", help="write an image archive to FILE")
    dest.add_argument("--push", metavar="REF", help="push to a registry, e.g. localhost:5000/dbg:1")
    dest.add_argument(
        "--to-engine",
        action="store_true",
        help="load into Docker or podman through its API socket, opened with your permissions",
    )
    sub.add_argument(
        "--engine-socket",
        metavar="PATH",
        help="the engine's socket (default: $DOCKER_HOST if unix://, else "
        "/var/run/docker.sock, else /run/podman/podman.sock)",
    )
    sub.add_argument(
        "--tag",
        metavar="NAME:TAG",
        help="the loaded image's name (default localhost/amber/BUILD:STEP)",
    )
    sub.add_argument(
        "--format",
        choices=("oci", "docker-archive"),
        help="archive format for -o (default oci: an OCI layout with manifest.json, which both load)",
    )
    sub.add_argument("--insecure", action="store_true", help="push over plain HTTP")
    sub = commands.add(
        "import", cmd_import, "turn an exported image into a frozen build here", json=True
    )
    sub.add_argument("source", metavar="FILE|REF")
    sub.add_argument("--insecure", action="store_true", help="pull over plain HTTP")
    sub = commands.add(
        "verify",
        cmd_verify,
        "check a spec or a build without building",
        "Check SPEC (a file) or BUILD (an id). Exit 1 if problems were found.",
        json=True,
    )
    sub.add_argument("target", metavar="SPEC|BUILD")
    sub = commands.add("delete", cmd_delete, "forget a build and release what it held", json=True)
    sub.add_argument("build", metavar="BUILD")


def _add_store(commands: _Commands) -> None:
    images = commands.group_of("image", "named base images: import, ls, rm")
    sub = images.add(
        "import",
        cmd_image_import,
        "import a root filesystem as a named base",
        'Import SOURCE into the store as NAME, for base = "NAME" in specs.\n'
        "SOURCE: a directory (dir:PATH) or an OCI archive or layout (oci:PATH).",
        json=True,
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("source", metavar="SOURCE")
    images.add("ls", cmd_image_ls, "list named images", json=True)
    sub = images.add(
        "rm",
        cmd_image_rm,
        "forget a named image",
        "Forget image NAME (its tree stays until gc finds nothing uses it).\n"
        "Refused while a pin or a running build uses it: the message names which.",
        json=True,
    )
    sub.add_argument("name", metavar="NAME")

    pins = commands.group_of("pin", "named GC roots: add, rm, ls")
    sub = pins.add(
        "add",
        cmd_pin_add,
        "pin a result so GC keeps it",
        "Pin TARGET as NAME: GC keeps everything it needs. TARGET: a build,\n"
        "BUILD:STEP, a result key or a tree digest. Adding an existing NAME moves it.",
        json=True,
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("target", metavar="TARGET")
    sub = pins.add("rm", cmd_pin_rm, "remove a pin", json=True)
    sub.add_argument("name", metavar="NAME")
    pins.add("ls", cmd_pin_ls, "list pins", json=True)

    sub = commands.add(
        "gc",
        cmd_gc,
        "delete what nothing needs any more",
        "Collect garbage: keep what pins, out-links, running builds, shells and\n"
        "exports use, and recent frozen failures; delete the rest.",
        json=True,
    )
    sub.add_argument(
        "--max-freed", type=_size, metavar="SIZE", help="stop after freeing SIZE (e.g. 10G, 500M)"
    )
    sub.add_argument(
        "--keep-failed",
        type=float,
        metavar="DAYS",
        help="keep frozen failures of the last DAYS days",
    )
    sub.add_argument(
        "--dry-run", action="store_true", help="say what would be freed; delete nothing"
    )

    store = commands.group_of("store", "store maintenance: fsck")
    sub = store.add(
        "fsck",
        cmd_fsck,
        "check every object in the store",
        "Check every blob's digest. Results that need a missing or corrupt object\n"
        "become cache misses. Exit 1 if anything was wrong.",
        json=True,
    )
    sub.add_argument("--repair", action="store_true", help="drop what is broken, so it is rebuilt")


class _Parser(argparse.ArgumentParser):
    """argparse, naming the nearest command for a mistyped one (``amber biuld``)."""

    def error(self, message: str) -> NoReturn:
        super().error(suggest_choice(message, self.prog))


def suggest_choice(message: str, prog: str = "amber") -> str:
    """argparse's "invalid choice" message, saying "did you mean 'build'?" as git does."""
    import re

    found = re.search(
        r"^argument (\S+): invalid choice: (['\"])(.*?)\2 \(choose from (.*)\)$", message
    )
    if found is None:
        return message
    import difflib

    what, word = found.group(1), found.group(3)
    choices = [c.strip().strip("'\"") for c in found.group(4).split(",")]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if what != "COMMAND":  # an option's value: argparse's message lists them all
        return f"{message}; did you mean {close[0]!r}?" if close else message
    text = f"{word!r} is not an {prog} command"
    if close:
        text += f"; did you mean {close[0]!r}?"
    return f"{text} (`{prog} --help` lists them)"


def _add_quiet(sub: Any) -> None:
    sub.add_argument(
        "-q", "--quiet", action="store_true", help="print only build ids, one per line"
    )


def _add_show(commands: _Commands) -> None:
    sub = commands.add(
        "show",
        cmd_show,
        "one build: owner, base, host, and every step with a timeline",
        "Show a build: its spec name, owner, base, host and status, and per step\n"
        "its status, exit code, time, key, before/after trees and log size, then\n"
        "a timeline (bars as long as each step took; cache hits marked).\n"
        "--trace FILE writes the build as a Chrome trace (Trace Event Format) for\n"
        "https://ui.perfetto.dev or chrome://tracing; - writes it to stdout.",
        json=True,
    )
    sub.add_argument("build", metavar="BUILD")
    sub.add_argument("--trace", metavar="FILE", help="write a Chrome trace-event JSON file")


def _group_help(ctx: Context, ns: argparse.Namespace) -> int:
    """A command group given without a subcommand (or no command at all): show its help."""
    ns.group_parser.print_help(ctx.err)
    return EXIT_USAGE


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
