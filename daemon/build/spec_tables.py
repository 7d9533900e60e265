"""Reading a spec's TOML tables: typed reads that refuse unknown keys, and line numbers.

Every check in spec_fields.py reads through ``_Table`` and reports through
``_Doc.error``, so each message names the file, the line and the key path.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amber.daemon.build.spec_model import SpecError, _frozen_env

# --------------------------------------------------------------------------- reading tables


@dataclass(frozen=True)
class _Where:
    """Which table a value lives in: ``step`` number 2 is ``_Where("step", 2)``."""

    table: str | None
    index: int | None = None

    def key_path(self, key: str | None) -> str | None:
        """The dotted name used in messages, e.g. ``step[2].timeout``."""
        head = self.table if self.index is None else f"{self.table}[{self.index}]"
        parts = [part for part in (head, key) if part]
        return ".".join(parts) or None


def _stat_mode(path: Path) -> int:
    return os.stat(path).st_mode


@dataclass(frozen=True)
class _Doc:
    """What every check needs to report an error or resolve a local path."""

    filename: str
    base_dir: Path
    lines: _Lines
    #: The st_mode of a local source (OSError if it cannot be had): amberd asks the user's helper.
    mode_of: Callable[[Path], int] = _stat_mode

    def error(self, where: _Where, key: str | None, problem: str) -> SpecError:
        keys = key.split(".") if key else []
        line = self.lines.find(where.table, where.index, keys)
        return SpecError(self.filename, where.key_path(key), problem, line)


class _Table:
    """One TOML table being read: unknown keys are refused up front, reads are typed."""

    def __init__(self, doc: _Doc, data: Any, where: _Where, allowed: set[str]) -> None:
        if not isinstance(data, Mapping):
            raise doc.error(where, None, f"expected a table, got {_show(data)}")
        self.doc, self.data, self.where = doc, data, where
        for key in data:
            if key not in allowed:  # str(): a document off the wire may have other keys
                raise self.error(str(key), f"unknown key{_did_you_mean(str(key), allowed)}")

    def error(self, key: str | None, problem: str) -> SpecError:
        return self.doc.error(self.where, key, problem)

    def value(self, key: str, expected: type | tuple[type, ...], what: str) -> Any:
        """The value at ``key`` if present (else None), checked against ``expected``."""
        value = self.data.get(key)
        if value is None:
            return None
        # bool is a subclass of int: `timeout = true` must not mean one second.
        wrong_bool = isinstance(value, bool) and bool not in _as_tuple(expected)
        if wrong_bool or not isinstance(value, expected):
            raise self.error(key, f"expected {what}, got {_show(value)}")
        return value

    def string(self, key: str, *, required: bool = False, default: str | None = None) -> Any:
        """A string without NUL bytes (they cannot reach argv, env or paths)."""
        value = self.value(key, str, "a string")
        if value is None:
            if required:
                raise self.error(key, "missing required key")
            return default
        if "\0" in value:
            raise self.error(key, "contains a NUL byte")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.value(key, bool, "a boolean (true or false)")
        return default if value is None else value

    def env(self, key: str) -> Mapping[str, str]:
        """A table of environment variables, name to string value."""
        table = self.value(key, Mapping, "a table of strings")
        if table is None:
            return _frozen_env({})
        for name, value in table.items():
            where = f"{key}.{name}"
            if not isinstance(value, str):
                raise self.error(where, f"expected a string, got {_show(value)}")
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                raise self.error(where, "not a valid environment variable name")
            if "\0" in value:
                raise self.error(where, "contains a NUL byte")
        return _frozen_env(table)

    def table(self, key: str, *, required: bool = False) -> Any:
        value = self.value(key, Mapping, "a table")
        if value is None and required:
            raise self.error(key, f"missing required table [{key}]")
        return value

    def array(self, key: str) -> list[_Located]:
        """An array of tables such as ``[[step]]``, each with its 1-based position."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of tables ([[{key}]]), got {_show(value)}")
        return [_Located(item, _Where(key, number)) for number, item in enumerate(value, 1)]


@dataclass(frozen=True)
class _Located:
    """A raw table from an array, with where it sits."""

    data: Any
    where: _Where


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML, or its kind when that would be long."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def _did_you_mean(key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


# --------------------------------------------------------------------------- line numbers

_KEY = r"(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*\]\]?\s*(?:#.*)?")


class _Lines:
    """Best-effort line numbers for keys, which tomllib does not report.

    It scans for table headers and ``key =`` lines, skipping multi-line
    strings (so a shell script's ``[ -f x ]`` is not a header). Inline
    arrays of tables (``step = [{...}]``) get the line of the key at best.
    """

    def __init__(self, text: str) -> None:
        self.lines = _mask_multiline_strings(text.splitlines())
        self.headers: list[tuple[int, bool, str]] = []
        for number, line in enumerate(self.lines):
            match = _HEADER.fullmatch(line)
            if match:
                name = re.sub(r"\s*\.\s*", ".", match.group(2)).replace('"', "").replace("'", "")
                self.headers.append((number, match.group(1) == "[[", name))

    def find(self, table: str | None, index: int | None, keys: list[str]) -> int | None:
        """1-based line of the innermost of ``keys`` found in the table, else its header."""
        section = self._section(table, index)
        if section is None:
            return None
        start, end, header = section
        prefix = f"{table}." if table else ""
        for key in reversed(keys):
            pattern = re.compile(
                rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*[.=]"
            )
            for number in range(start, end):
                if pattern.match(self.lines[number]):
                    return number + 1
            for number, _, name in self.headers:
                # A top-level key may be a table of its own, anywhere in the file.
                if table is None and (name == key or name.startswith(f"{key}.")):
                    return number + 1
                if start <= number < end and name == prefix + key:
                    return number + 1
        return None if header is None else header + 1

    def _section(self, table: str | None, index: int | None) -> tuple[int, int, int | None] | None:
        """(first line, end line, header line) of a table's body, 0-based."""
        if table is None:
            end = self.headers[0][0] if self.headers else len(self.lines)
            return 0, end, None
        matches = [h for h in self.headers if h[2] == table and h[1] == (index is not None)]
        position = (index or 1) - 1
        if position >= len(matches):
            return None
        header = matches[position][0]
        end = len(self.lines)
        for number, is_array, name in self.headers:
            inside = not is_array and name.startswith(f"{table}.")
            if number > header and not inside:
                end = number
                break
        return header, end, header


def _mask_multiline_strings(lines: list[str]) -> list[str]:
    """Blank out lines inside ``\"\"\"`` or ``'''`` strings, keeping numbering."""
    out: list[str] = []
    open_quote: str | None = None
    for line in lines:
        out.append("" if open_quote else line)
        for quote in ('"""', "'''"):
            if open_quote in (None, quote) and line.count(quote) % 2:
                open_quote = None if open_quote else quote
    return out
