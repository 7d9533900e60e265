"""``amber``'s command line: every command's arguments and help, declared with argparse.

Each command names its function as ``"module.name"`` in ``commands/``; that
module is imported only when the command runs, so ``amber --version`` and
``amber build`` do not pay for the code of twenty other commands.
"""

from __future__ import annotations

import argparse

from . import __version__
from .parser_format import Formatter as _Formatter
from .parser_format import translate_once as _translate_once
from .parser_remote import add_keys, add_remote
from .units import parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    from .cli import Context


def _lazy(ref: str) -> Callable[[Context, argparse.Namespace], int]:
    """The command ``module.name`` of ``commands/``, imported when it runs, not before."""
    module, name = ref.split(".")

    def run(ctx: Context, ns: argparse.Namespace) -> int:
        from importlib import import_module

        return getattr(import_module(f".commands.{module}", __package__), name)(ctx, ns)

    return run


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


VERSION_ONLY = "--version"
"""``build_parser``'s ``command`` for ``amber --version``: no command is declared."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, with help at every level.

    Given the ``command`` about to run, only its arguments are declared: all
    twenty subparsers take ~10 ms to build, a tenth of a cached build's budget.
    Given ``VERSION_ONLY``, none is.
    """
    _translate_once()
    parser = _Parser(
        prog="amber",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=_Formatter,
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
    only = command if command in _COMMAND_NAMES or command == VERSION_ONLY else None
    commands = _Commands(group, only=only)
    _add_build(commands)
    _add_following(commands)
    _add_frozen(commands)
    _add_store(commands)
    add_remote(commands)
    _add_local(commands)
    return parser


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
        "key",
        "completion",
        "push",
        "pull",
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
        self.common = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
        # SUPPRESS: when absent here, the value given before the command stays.
        self.common.add_argument(
            "--socket", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )

    def add(
        self,
        name: str,
        func: str | Callable[[Context, argparse.Namespace], int],
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
            formatter_class=_Formatter,
            **kw,
        )
        if isinstance(func, str):  # "module.name" in commands/
            func = _lazy(func)
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
        "build.cmd_build",
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
        "--cache-from",
        metavar="URL",
        help="ask this remote cache (http(s)://REGISTRY/REPOSITORY) instead of amberd's "
        "[[cache.remote]] list (one of that list; any other URL: root and admin-group only)",
    )
    sub.add_argument(
        "--cache-to", metavar="URL", help="push this build's results to this remote cache only"
    )
    sub.add_argument(
        "--no-remote", action="store_true", help="use no remote cache: neither ask nor push"
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
    _add_export_on_failure(sub)


def _add_export_on_failure(sub: Any) -> None:
    """``amber build``'s options that export the frozen state as soon as a step fails."""
    sub.add_argument(
        "--export-on-failure",
        choices=("oci", "docker-archive", "registry", "engine"),
        help="export the frozen state as soon as a step fails (engine: load it into "
        "Docker or podman, see amber export --to-engine)",
    )
    _add_engine_socket(sub)
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
    sub = commands.add("ps", "following.cmd_ps", "builds running or queued now", json=True)
    _add_quiet(sub)
    sub = commands.add(
        "builds",
        "following.cmd_builds",
        "past builds, newest first; frozen failures marked",
        json=True,
    )
    _add_quiet(sub)
    sub.add_argument(
        "--limit", type=int, default=20, metavar="N", help="show N builds (default 20)"
    )
    sub.add_argument(
        "--all",
        action="store_true",
        help="every user's builds if you are root (adds USER); others see only their own",
    )
    _add_show(commands)
    sub = commands.add(
        "log",
        "following.cmd_log",
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
        "cancel",
        "following.cmd_cancel",
        "stop a running build (it ends errored; nothing is cached)",
        json=True,
    )
    sub.add_argument("build", metavar="BUILD")
    commands.add(
        "status",
        "following.cmd_status",
        "amberd's version, uptime, builds and store size",
        json=True,
    )


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
        "frozen.cmd_shell",
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
        "frozen.cmd_diff",
        "what a step added, modified and deleted",
        "List what a step changed: A added, M modified, D deleted (a trailing /\n"
        "marks a directory, @ a symlink). Default: the failing step.",
        json=True,
    )
    sub.add_argument("build", metavar="BUILD")
    sub.add_argument("--step", metavar="NAME", help="this step instead of the failing one")
    sub.add_argument("--stat", action="store_true", help="sizes and totals")
    _add_export(commands)
    sub = commands.add(
        "import", "frozen.cmd_import", "turn an exported image into a frozen build here", json=True
    )
    sub.add_argument("source", metavar="FILE|REF")
    sub.add_argument("--insecure", action="store_true", help="pull over plain HTTP")
    sub = commands.add(
        "verify",
        "frozen.cmd_verify",
        "check a spec or a build without building",
        "Check SPEC (a file) or BUILD (an id). Exit 1 if problems were found.",
        json=True,
    )
    sub.add_argument("target", metavar="SPEC|BUILD")
    sub = commands.add(
        "delete", "frozen.cmd_delete", "forget a build and release what it held", json=True
    )
    sub.add_argument("build", metavar="BUILD")


def _add_store(commands: _Commands) -> None:
    images = commands.group_of("image", "named base images: import, ls, rm")
    sub = images.add(
        "import",
        "store.cmd_image_import",
        "import a root filesystem as a named base",
        'Import SOURCE into the store as NAME, for base = "NAME" in specs.\n'
        "SOURCE: a directory (dir:PATH), an OCI archive or layout (oci:PATH), or an\n"
        "image in a registry (docker://REGISTRY/REPO:TAG or @sha256:DIGEST), pulled\n"
        "with your credentials (podman login / docker login files) for this\n"
        "machine's platform; NAME then means the digest the tag had.\n"
        "Each user has their own names; root's are the shared ones. A spec's\n"
        "NAME is your own image, else the shared one, never another user's.",
        json=True,
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("source", metavar="SOURCE")
    sub.add_argument(
        "--shared",
        action="store_true",
        help="into the shared names every user sees (root and the admin-group)",
    )
    sub.add_argument("--insecure", action="store_true", help="a docker:// registry over plain HTTP")
    ls = "List your images and the shared (root's) ones, with owners; root sees everyone's."
    images.add("ls", "store.cmd_image_ls", "list named images", ls, json=True)
    sub = images.add(
        "rm",
        "store.cmd_image_rm",
        "forget a named image",
        "Forget your image NAME (its tree stays until gc finds nothing uses it).\n"
        "Refused while a pin or a running build uses it: the message names which.",
        json=True,
    )
    sub.add_argument("name", metavar="NAME")
    who = sub.add_mutually_exclusive_group()
    who.add_argument(
        "--shared", action="store_true", help="the shared (root's) one (root and the admin-group)"
    )
    who.add_argument("--user", type=int, metavar="UID", help="user UID's one (root only)")

    pins = commands.group_of("pin", "named GC roots: add, rm, ls")
    sub = pins.add(
        "add",
        "store.cmd_pin_add",
        "pin a result so GC keeps it",
        "Pin TARGET as NAME: GC keeps everything it needs. TARGET: a build,\n"
        "BUILD:STEP, a result key or a tree digest. Adding an existing NAME moves it.",
        json=True,
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("target", metavar="TARGET")
    sub = pins.add("rm", "store.cmd_pin_rm", "remove a pin", json=True)
    sub.add_argument("name", metavar="NAME")
    pins.add("ls", "store.cmd_pin_ls", "list pins", json=True)

    _add_gc(commands)


def _add_export(commands: _Commands) -> None:
    sub = commands.add(
        "export",
        "frozen.cmd_export",
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
    _add_engine_socket(sub)
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


def _add_gc(commands: _Commands) -> None:
    """GC and store maintenance."""
    sub = commands.add(
        "gc",
        "store.cmd_gc",
        "delete what nothing needs any more",
        "Collect garbage: keep what pins, out-links, running builds, shells and\n"
        "exports use, and recent frozen failures; delete the rest. Root and the\n"
        "admin-group of amberd.toml only; anyone may --dry-run.",
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
        "store.cmd_fsck",
        "check every object in the store",
        "Check every blob's digest. Results that need a missing or corrupt object\n"
        "become cache misses. Exit 1 if anything was wrong.",
        json=True,
    )
    sub.add_argument(
        "--repair",
        action="store_true",
        help="drop what is broken, so it is rebuilt (root and the admin-group only)",
    )


def _add_local(commands: _Commands) -> None:
    """Commands that run here, not in amberd: daemon, key, completion."""
    commands.add(
        "daemon",
        "local.cmd_daemon",
        "run amberd in the foreground (arguments go to amberd)",
        "Run amberd in this terminal; every argument goes to it (see `amber daemon --help`).",
        add_help=False,
    )
    add_keys(commands)
    sub = commands.add(
        "completion",
        "local.cmd_completion",
        "print a shell completion script",
        "Print the completion script for SHELL, e.g. for bash:\n"
        "  amber completion bash > ~/.local/share/bash-completion/completions/amber\n"
        "(scripts/setup installs them for all users, and the man page amber(1)).",
    )
    sub.add_argument(
        "shell", choices=("bash", "zsh", "fish"), metavar="SHELL", help="bash, zsh or fish"
    )


def _add_engine_socket(sub: Any) -> None:
    sub.add_argument(
        "--engine-socket",
        metavar="PATH",
        help="the engine's socket (default: $DOCKER_HOST if unix://, else "
        "/var/run/docker.sock, else /run/podman/podman.sock)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, naming the nearest command for a mistyped one (``amber biuld``)."""

    def error(self, message: str) -> NoReturn:
        from .suggest import suggest_choice  # only when there is an error to show

        super().error(suggest_choice(message, self.prog))


def _add_quiet(sub: Any) -> None:
    sub.add_argument(
        "-q", "--quiet", action="store_true", help="print only build ids, one per line"
    )


def _add_show(commands: _Commands) -> None:
    sub = commands.add(
        "show",
        "following.cmd_show",
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
    from .cli import EXIT_USAGE  # loaded already: cli imports this module

    ns.group_parser.print_help(ctx.err)
    return EXIT_USAGE


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
