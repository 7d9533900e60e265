"""The README tells the truth: the files it names exist, every flag it shows
exists, and every flag the commands take is shown."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from amber.client.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def code_lines() -> list[str]:
    """Lines of the README's fenced code blocks."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README, re.S | re.M)
    return [line for block in blocks for line in block.splitlines()]


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command of ``amber`` by its words (``("image", "ls")``), with its parser."""
    out = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(commands(sub, (*path, name)))
    return out


def shown_options(parser: argparse.ArgumentParser) -> list[list[str]]:
    """The options a command declares and shows in its --help, each with its aliases."""
    return [
        action.option_strings
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        and action.option_strings
        and "--help" not in action.option_strings
    ]


def shown_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for aliases in shown_options(parser) for opt in aliases}


def mentioned(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def usage_lines() -> dict[tuple[str, ...], str]:
    """The README's ``amber ...`` lines, joined per command (continuation lines
    are indented under the one they continue)."""
    known = commands(build_parser())
    out: dict[tuple[str, ...], str] = {}
    current: tuple[str, ...] | None = None
    lines: list[str] = []
    for line in code_lines():  # "amber pin add NAME | pin rm NAME": one command a part
        parts = line.split("#", 1)[0].split(" | ")
        lines.append(parts[0])
        for part in parts[1:]:
            words = part.split()
            if words and (words[0],) in known:
                lines.append(f"amber {part}")
            else:
                lines[-1] += " | " + part
    for line in lines:
        words = line.split()
        if words[:1] == ["amber"]:
            path: tuple[str, ...] = ()
            for word in words[1:]:
                if (*path, word) in known:
                    path = (*path, word)
                else:
                    break
            current = path
            out[path] = out.get(path, "") + " " + line
        elif current is not None and line.startswith(" ") and words and words[0].startswith("["):
            out[current] += " " + line
        else:
            current = None
    return out


def _in_repository(name: str) -> bool:
    """A file or folder, or a module named without its .py (``sandbox/runner``,
    ``sandbox/fscontrol.open_overlay``)."""
    name = name.rstrip(".")
    module = name.split(".", 1)[0]
    return any((REPO / n).exists() for n in (name, name + ".py", module + ".py"))


def test_every_file_the_readme_names_exists() -> None:
    linked = re.findall(r"\]\(([^)#]+)\)", README)
    named = re.findall(
        r"(?<![\w/.-])((?:scripts|systemd|examples|tests|client|daemon|sandbox)/[\w./-]+)", README
    )
    missing = sorted({p for p in linked + named if "://" not in p and not _in_repository(p)})
    assert not missing, f"the README names files that are not in the repository: {missing}"


def test_every_flag_shown_exists_and_every_flag_is_shown() -> None:
    known = commands(build_parser())
    lines = usage_lines()
    wrong = []
    for path, text in lines.items():
        declared = shown_flags(known[path]) | shown_flags(known[()])
        for flag in FLAG.findall(text):
            if flag not in declared:
                wrong.append(f"README shows `amber {' '.join(path)} {flag}`: no such flag")
    for path, parser in known.items():
        if not path or path == ("daemon",):
            continue  # the top level's flags are in prose; `amber daemon` passes amberd's
        has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        if has_subcommands:
            continue
        if path not in lines:
            wrong.append(f"`amber {' '.join(path)}` is not in the README's usage")
            continue
        for aliases in shown_options(parser):
            if not any(mentioned(option, lines[path]) for option in aliases):
                wrong.append(f"`amber {' '.join(path)} {aliases[-1]}` is not in the README's usage")
    assert not wrong, "\n".join(wrong)


def test_every_amberd_flag_is_in_the_readme() -> None:
    helptext = subprocess.run(
        [str(BIN / "amberd"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    flags = set(FLAG.findall(helptext)) - {"--help"}
    missing = sorted(f for f in flags if f not in README)
    assert not missing, f"amberd flags the README never mentions: {missing}"
