"""Shell completion and the man page, checked with the real shells and groff/man."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from amberd_process import BIN
from tools import need, run

TOP_COMMANDS = ["build", "ps", "builds", "show", "log", "cancel", "status", "shell", "diff", "export",
                "import", "verify", "delete", "image", "pin", "gc", "store", "push", "pull", "daemon", "key",
                "completion"]  # fmt: skip
NESTED = [
    "image import",
    "image ls",
    "image rm",
    "pin add",
    "pin rm",
    "pin ls",
    "store fsck",
    "key generate",
    "key trust",
]


def amber(*args: str) -> str:
    return run([str(BIN / "amber"), *args]).stdout


def test_every_command_is_in_the_parser_walk():
    """The lists above are the parser's: a new command must be completed and documented."""
    from amber.client.completion import full_parser, walk

    paths = [" ".join(p) for p, _ in walk(full_parser()) if p]
    expected = []
    for command in TOP_COMMANDS:
        expected += [command, *(n for n in NESTED if n.split()[0] == command)]
    assert paths == expected


def _bash_complete(script: Path, words: list[str]) -> list[str]:
    """What bash offers for the last word of ``words``, through the function `complete` registered."""
    line = " ".join(words)
    program = (
        f"source {script}\n"
        "spec=$(complete -p amber) || exit 9\n"
        'func=$(sed -n "s/.* -F \\([^ ]*\\) .*/\\1/p" <<<"$spec")\n'
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={line!r}; COMP_POINT={len(line)}\n"
        '"$func" amber "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completes_commands_subcommands_and_options(tmp_path: Path):
    script = tmp_path / "amber.bash"
    script.write_text(amber("completion", "bash"))
    registered = run(["bash", "--norc", "-c", f"source {script}; complete -p amber"]).stdout
    assert registered.startswith("complete ") and registered.rstrip().endswith(" amber")
    assert _bash_complete(script, ["amber", ""]) == TOP_COMMANDS
    assert _bash_complete(script, ["amber", "bu"]) == ["build", "builds"]
    assert _bash_complete(script, ["amber", "image", ""]) == ["import", "ls", "rm"]
    assert "--to-engine" in _bash_complete(script, ["amber", "export", "b1", "--"])
    offered = _bash_complete(script, ["amber", "build", "--export-on-failure", ""])
    assert offered == ["oci", "docker-archive", "registry", "engine"]


def test_zsh_script_parses_and_defines_its_function(tmp_path: Path):
    need("zsh")
    script = tmp_path / "_amber"
    script.write_text(amber("completion", "zsh"))
    run(["zsh", "-n", str(script)])
    defined = run(["zsh", "-fc", f"autoload -U compinit; compinit -u -D; source {script}; "
                   "whence -w _shtab_amber"])  # fmt: skip
    assert "function" in defined.stdout


def test_fish_completes_commands_subcommands_and_options(tmp_path: Path):
    need("fish")
    script = tmp_path / "amber.fish"
    script.write_text(amber("completion", "fish"))
    run(["fish", "-n", str(script)])

    def offered(line: str) -> list[str]:
        done = run(["fish", "--no-config", "-c", f"source {script}; complete -C {line!r}"])
        return [row.split("\t")[0] for row in done.stdout.splitlines()]

    assert sorted(offered("amber ")) == sorted(TOP_COMMANDS)
    assert sorted(offered("amber bu")) == ["build", "builds"]
    assert sorted(offered("amber image ")) == ["import", "ls", "rm"]
    assert sorted(offered("amber pin ")) == ["add", "ls", "rm"]
    assert "--to-engine" in offered("amber export b1 --")
    assert "--to-engine" not in offered("amber build --")  # options are the command's own
    assert sorted(offered("amber build --export-on-failure ")) == [
        "docker-archive", "engine", "oci", "registry"]  # fmt: skip
    assert "--repair" in offered("amber store fsck --")


def test_the_man_page_renders_cleanly_and_names_every_command(tmp_path: Path):
    out = tmp_path / "gen"
    done = subprocess.run(
        [sys.executable, "-m", "amber.client.completion", "--write", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["_amber", "amber.1", "amber.bash", "amber.fish"]
    page = out / "amber.1"
    groff = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                           capture_output=True, text=True)  # fmt: skip
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                           env=dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING="0"))  # fmt: skip
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    text = re.sub(r".\x08", "", shown.stdout)  # no overstrike, whatever man decided
    for command in TOP_COMMANDS + NESTED:
        assert re.search(rf"^\s+amber {command}\s*$", text, re.M), command
    assert "--to-engine" in text and "--export-on-failure" in text


@pytest.mark.parametrize("argv", [["--version"], ["status", "--help"], ["build", "--help"]])
def test_other_commands_do_not_import_shtab(argv: list[str]):
    probe = (
        "import sys\nfrom amber.client import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('LOADED' if {'shtab', 'argparse_manpage', 'amber.client.completion'} "
        "& set(sys.modules) else 'CLEAN')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stderr.endswith("CLEAN"), done.stderr
