"""Shell completion and the man page, both generated from ``amber``'s argparse parser.

So they never fall behind the commands: ``amber completion bash|zsh|fish``
prints the script for the parser of this very ``amber``, and
``scripts/setup`` installs the same scripts and ``amber.1`` with
``python -m amber.client.completion --write DIR``.

bash and zsh come from shtab, which reads an argparse parser as it is. shtab
does not do fish, and no kept library does it from argparse, so fish's
script is generated here: fish completion is one declarative ``complete``
line per command and option, little enough to own. The man page comes from
argparse-manpage (only ``--write`` needs it).

Only ``amber completion`` imports this module (and shtab): the other
commands' start-up does not pay for it.
"""

from __future__ import annotations

import argparse
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

SHELLS = ("bash", "zsh", "fish")
#: arguments whose values are paths, completed as files
_FILE_DESTS = frozenset(
    {"specs", "output", "out_link", "export_path", "engine_socket", "socket", "source"}
)
_BASH_FILES = "_shtab_compgen_files"  # what shtab.FILE names, for each shell
_ZSH_FILES = "_files"


def full_parser() -> argparse.ArgumentParser:
    """Every command's parser (``amber`` itself declares only the one it runs)."""
    from .parser import build_parser

    parser = build_parser(None)
    for _path, sub in walk(parser):
        for action in sub._actions:
            if action.dest in _FILE_DESTS:
                action.complete = {"bash": _BASH_FILES, "zsh": _ZSH_FILES}  # type: ignore[attr-defined]
    return parser


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Each parser with its command path: (), ("build",), ("image", "import"), ..."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def script(shell: str) -> str:
    """The completion script for ``shell``."""
    parser = full_parser()
    if shell == "fish":
        return fish_script(parser)
    import shtab

    return shtab.complete(parser, shell=shell)


def fish_script(parser: argparse.ArgumentParser) -> str:
    """``complete`` lines for fish: each command's subcommands and options, where they apply."""
    prog = parser.prog
    commands = [" ".join(path) for path, _ in walk(parser) if path]
    out = [
        f"# fish completion for {prog}, generated from its argument parser",
        f"complete -c {prog} -f",  # arguments are not files unless said so below
        f"set -g __{prog}_commands {' '.join(_q(c) for c in commands)}",
        f"function __{prog}_at --argument-names want",
        "    # the command path typed so far (`image import`), options left out",
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    set -l path ''",
        "    set -l skip 0",
        "    for w in $words",
        "        if test $skip = 1",
        "            set skip 0",
        "            continue",
        "        end",
        "        switch $w",
        "            case --socket",
        "                set skip 1",
        "                continue",
        "            case '-*'",
        "                continue",
        "        end",
        '        set -l next (string trim -- "$path $w")',
        f"        contains -- $next $__{prog}_commands; or break",
        "        set path $next",
        "    end",
        '    test "$path" = "$want"',
        "end",
    ]
    for path, sub in walk(parser):
        condition = f"__{prog}_at {_q(' '.join(path))}"
        at = f"-n {_q(condition)}"
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                for name in action.choices:
                    out.append(
                        f"complete -c {prog} {at} -a {_q(name)} -d {_q(helps.get(name, ''))}"
                    )
            elif action.help == argparse.SUPPRESS:
                continue
            elif action.option_strings:
                out.append(f"complete -c {prog} {at} {_fish_option(action)}")
            elif action.dest in _FILE_DESTS:
                out.append(f"complete -c {prog} {at} -F")
    return "\n".join(out) + "\n"


def _fish_option(action: argparse.Action) -> str:
    parts = []
    for opt in action.option_strings:
        parts.append(f"-l {opt[2:]}" if opt.startswith("--") else f"-s {opt[1:]}")
    if action.nargs != 0:
        if action.choices:
            parts.append(f"-x -a {_q(' '.join(str(c) for c in action.choices))}")
        elif action.dest in _FILE_DESTS:
            parts.append("-r -F")
        else:
            parts.append("-x")
    if action.help:
        parts.append(f"-d {_q(action.help % {'default': action.default, 'prog': ''})}")
    return " ".join(parts)


def _q(text: str) -> str:
    """A fish single-quoted word."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def manpage() -> str:
    """``amber.1``: the synopsis, every command and its options."""
    from argparse_manpage.manpage import Manpage

    from . import __version__

    data = {
        "project_name": "amber",
        "version": __version__,
        "manual_section": 1,
        "manual_title": "amber manual",
        "description": "run builds in sandboxes through amberd; enter, diff and export failures",
        "url": "",
    }
    return str(Manpage(full_parser(), format="pretty", _data=data))


def write_all(directory: str) -> list[str]:
    """The files scripts/setup installs, written into ``directory``."""
    files = {"amber.bash": script("bash"), "_amber": script("zsh"), "amber.fish": script("fish")}
    files["amber.1"] = manpage()
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m amber.client.completion",
        description="Write amber's completion scripts and man page into DIR (for scripts/setup).",
    )
    parser.add_argument("--write", metavar="DIR", required=True)
    ns = parser.parse_args(argv)
    for name in write_all(ns.write):
        print(os.path.join(ns.write, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
