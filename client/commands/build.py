"""``amber build``: send specs to amberd and show each build as it runs."""

from __future__ import annotations

import contextlib
import os

from ..cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BuildInterrupted, UsageError, set_timeout
from ..errors import AmberError, ErrorCode
from ..render import PlainBuildView, build_json, to_json
from . import absolute

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, TextIO

    from ..cli import Context
    from ..connection import Connection, Stream


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
        "out_link": absolute(ns.out_link),
        "detach": ns.detach,
    }
    for name in ("cache_from", "cache_to"):
        if getattr(ns, name, None):
            args[name] = getattr(ns, name)
    if getattr(ns, "no_remote", False):
        args["no_remote"] = True
    if ns.out_link_privileged:  # only when asked: older daemons refuse arguments they lack
        args["out_link_privileged"] = True
    if ns.export_on_failure and ns.export_on_failure != "engine":  # engine: see build_one
        args["export_on_failure"] = ns.export_on_failure
        args["export_path"] = absolute(ns.export_path)
        args["export_ref"] = ns.export_ref
    auth = base_auth(text)
    if auth:  # only when there is some: older daemons refuse arguments they lack
        args["auth"] = auth
    return args


def base_auth(text: str) -> dict[str, Any] | None:
    """Our credentials for the registry of the spec's ``docker://`` base, if any."""
    base = registry_base(text)
    if base is None:
        return None
    from ..registry_auth import auth_for

    return auth_for(base)


def registry_base(text: str) -> str | None:
    """The spec's ``docker://`` base, whose registry our credentials are sent for (else None).

    The daemon parses and checks the spec; this only looks for the one field.
    """
    if "docker://" not in text:
        return None
    import tomllib

    try:
        base = tomllib.loads(text).get("build", {}).get("base")
    except (tomllib.TOMLDecodeError, AttributeError):
        return None
    return base if isinstance(base, str) and base.startswith("docker://") else None


def build_one(ctx: Context, ns: argparse.Namespace, path: str, text: str) -> int:
    """Run one build, showing it as it goes; return its exit code."""
    human = ctx.err if ns.json else ctx.out  # with --json, stdout carries JSON only
    view = make_build_view(human, path)
    args = build_args(ns, path, text)
    fds = _request_dirs(args, path)
    try:
        conn = ctx.connect()
        result = follow(conn, conn.request("build", args, fds=fds), view)
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
    finally:
        for fd in fds:
            os.close(fd)
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


def _request_dirs(args: dict[str, Any], spec_path: str) -> list[int]:
    """The directories amberd writes below, opened by us, the user: it never resolves a path."""
    from ..userfiles import parent_directory

    fds: list[int] = []
    try:
        if args["out_link"]:
            fds.append(parent_directory(args["out_link"]))
        if args.get("export_on_failure") in ("oci", "docker-archive"):
            # No --export-path: amberd names the file amber-BUILD.tar, next to the spec.
            fds.append(
                parent_directory(
                    args["export_path"]
                    or os.path.join(os.path.dirname(spec_path), "amber-BUILD.tar")
                )
            )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _export_failure_to_engine(ctx: Context, ns: argparse.Namespace, build: str) -> None:
    """``--export-on-failure engine``: the client, not amberd, connects to the engine (see engine.py)."""
    from .frozen import export_to_engine

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
        from ..live import LiveBuildView  # only terminals pay for it

        return LiveBuildView(out, spec_path)
    return PlainBuildView(out, spec_path)


def follow(conn: Connection, stream: Stream, view: Any) -> dict[str, Any]:
    """Feed a build's events to ``view`` until its result; tick the view while nothing comes."""
    interval = view.tick_interval
    set_timeout(conn, interval)
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
        set_timeout(conn, None)
