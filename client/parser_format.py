"""How ``amber``'s parsers format help, and what argparse costs when they are built.

A parser is built at every start of ``amber`` (parser.py), so what argparse
does per argument counts: see ``Formatter`` and ``translate_once``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the terminal's width instead of asking ``shutil``.

    argparse makes a formatter for every ``add_argument`` (to check the
    metavar); each would import ``shutil`` (and with it bz2, lzma, zlib) and
    ``_columns`` asks the way ``shutil`` does.
    """

    def __init__(self, prog: str, **kw: Any) -> None:
        kw.setdefault("width", _columns() - 2)
        super().__init__(prog, **kw)


def _columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else stdout's terminal, else 80."""
    columns = 0
    with contextlib.suppress(ValueError):
        columns = int(os.environ.get("COLUMNS", "0"))
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def translate_once() -> None:
    """Look argparse's own messages' translation up once, not once per message.

    argparse calls ``gettext.gettext`` for each of its strings as parsers are
    built, and every call searches the locale directories for a catalogue
    anew: a third of the time ``amber build`` spends on its parser. The
    catalogue found (none, on Debian's Python) is the same each time.
    """
    if getattr(argparse, "_amber_translated", False):
        return
    import gettext

    catalogue = gettext.translation("messages", gettext.bindtextdomain("messages"), fallback=True)
    argparse._ = catalogue.gettext  # type: ignore[attr-defined]
    argparse.ngettext = catalogue.ngettext  # type: ignore[attr-defined]
    argparse._amber_translated = True  # type: ignore[attr-defined]
