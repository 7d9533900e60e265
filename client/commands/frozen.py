"""Frozen builds: ``amber shell``, ``diff``, ``export``, ``import``, ``verify`` and ``delete``."""

from __future__ import annotations

import os

from ..cli import EXIT_FAILED, EXIT_OK, EXIT_SHELL_ERROR, UsageError
from ..registry_auth import auth_for
from ..render import describe_item, render_diff, to_json
from . import absolute, print_result, printed_json, terminal_size
from .build import base_auth, read_spec

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from ..cli import Context


def cmd_shell(ctx: Context, ns: argparse.Namespace) -> int:
    """Enter a build's state with this terminal; exit with the shell's (or CMD's) status."""
    command = ns.passthrough or None
    rows, cols = terminal_size()
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
    return print_result(ctx, ns, result, lambda r: render_diff(r, ns.stat))


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
        "output": absolute(ns.output),
        "format": ns.format or "oci",
        "push": ns.push,
        "insecure": ns.insecure,
    }
    auth = auth_for(ns.push)
    if auth:  # only then: older daemons refuse arguments they lack
        args["auth"] = auth
    if ns.output:
        from ..userfiles import output_file

        with output_file(args["output"]) as fd:  # opened by us, the user: amberd writes to it
            result = ctx.call("export", args, fds=[fd])
    else:
        result = ctx.call("export", args)
    if printed_json(ctx, ns, {"build": ns.build, **result}):
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
    from ..engine import export_to_engine as stream_into

    args = {"build": build, "before": before, "step": step, "tag": tag}
    result = stream_into(ctx.connect(), args, socket, ctx.say)
    if printed_json(ctx, ctx.ns, {"build": build, **result}):
        return EXIT_OK
    name = ", ".join(result.get("loaded") or []) or result.get("name", "?")
    ctx.print(
        f"loaded build {build} into the engine at {result['socket']} as {name} "
        f"({result.get('layers', '?')} layers, image id {result.get('digest', '?')})"
    )
    return EXIT_OK


def cmd_import(ctx: Context, ns: argparse.Namespace) -> int:
    source = os.path.abspath(ns.source) if os.path.exists(ns.source) else ns.source
    args = {"source": source, "insecure": ns.insecure}
    auth = None if os.path.exists(ns.source) else auth_for(source)
    if auth:
        args["auth"] = auth
    result = ctx.call("import", args)
    if printed_json(ctx, ns, result):
        return EXIT_OK
    bid = result.get("build")
    ctx.print(f"imported as build {bid}: `amber shell {bid}`, `amber diff {bid}`")
    return EXIT_OK


def cmd_verify(ctx: Context, ns: argparse.Namespace) -> int:
    """Check a spec (a file that exists, or a name ending in .toml) or a build; exit 1 on problems."""
    if os.path.exists(ns.target) or ns.target.endswith(".toml"):
        path, text = read_spec(ns.target)
        args = {"spec_text": text, "spec_path": path}
        auth = base_auth(text)
        result = ctx.call("verify", {**args, "auth": auth} if auth else args)
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
    if printed_json(ctx, ns, ctx.call("delete", {"build": ns.build})):
        return EXIT_OK
    ctx.print(f"deleted build {ns.build}")
    return EXIT_OK


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
