"""A mistyped command or choice: the nearest right one, as git names it."""

from __future__ import annotations


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
