"""Sizes and durations, read and written with one grammar everywhere.

The ``amber`` command (``gc --max-freed 10G``), amberd's config file
(``max-frame = "16M"``, ``stop-grace = "30s"``) and build specs
(``timeout = "10min"``) all read their values here, so a string one of
them accepts the others accept too. The daemon imports this module; it
imports nothing, so it stays cheap for the client to load.

Sizes: a number (``1.5`` allowed) and an optional binary unit, any case:
``B``, ``K``/``KB``/``KiB``, ``M``..., ``G``, ``T``, ``P`` (``512KiB``,
``10G``, ``1P``, ``4096``). Units are powers of 1024, as ``du -h`` prints.

Durations: one or more number+unit parts, largest unit first, each unit at
most once: ``d``, ``h``, ``m``/``min``, ``s`` (``90s``, ``10min``,
``1h30m``, ``1.5h``). A bare number in a string is refused, so ``"10"`` is
never silently ten seconds; TOML numbers are seconds.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "format_duration",
    "format_size",
    "human_bytes",
    "human_seconds",
    "parse_duration",
    "parse_size",
]

_SIZE_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgtp])(?:i?b)?|b)?", re.IGNORECASE)
_DURATION_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0))
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(d|h|min|m|s)")
SIZE_HINT = "a size like 512K, 10G or 1.5T"
DURATION_HINT = "a duration like 90s, 10min or 1h30m"


def parse_size(text: str | int) -> int:
    """``"10G"``, ``"512KiB"``, ``"1P"``, ``"4096"`` (or an int) -> bytes.

    Raises:
        ValueError: with a message fit for the user.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected {SIZE_HINT}")
    number, unit = match.group(1), (match.group(2) or "").lower()
    return int(float(number) * 1024 ** _SIZE_UNITS[unit])


def parse_duration(text: str | int | float) -> float:
    """``"90s"``, ``"10min"``, ``"1h30m"`` -> seconds; a number is seconds already.

    Raises:
        ValueError: with a message fit for the user.
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        if not (math.isfinite(text) and text >= 0):
            raise ValueError(f"invalid duration {text!r}: expected {DURATION_HINT}")
        return float(text)
    s = str(text).strip()
    total, pos, last = 0.0, 0, -1
    while pos < len(s):
        match = _DURATION_PART.match(s, pos)
        order = _unit_order(match.group(2)) if match else -1
        if match is None or order <= last:
            raise ValueError(f"invalid duration {str(text)!r}: expected {DURATION_HINT}")
        total += float(match.group(1)) * _DURATION_UNITS[order][1]
        pos, last = match.end(), order
    if last < 0:
        raise ValueError(f"invalid duration {str(text)!r}: expected {DURATION_HINT}")
    return total


def _unit_order(unit: str) -> int:
    unit = "m" if unit == "min" else unit
    return next(i for i, (name, _) in enumerate(_DURATION_UNITS) if name == unit)


def format_size(n: int) -> str:
    """Bytes as ``parse_size`` reads them back exactly: ``"16M"``, ``"1536K"``, ``"100"``."""
    for unit in "PTGMK":
        scale = 1024 ** _SIZE_UNITS[unit.lower()]
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def format_duration(seconds: float) -> str:
    """Seconds as ``parse_duration`` reads them back exactly: ``"1h30m"``, ``"90s"``, ``"2.5s"``."""
    if seconds != int(seconds) or seconds == 0:
        return f"{seconds:g}s"
    rest, parts = int(seconds), []
    for name, scale in _DURATION_UNITS:
        count, rest = divmod(rest, int(scale))
        if count:
            parts.append(f"{count}{name}")
    return "".join(parts)


def human_bytes(n: int | float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``: for people, binary units as ``parse_size`` reads them."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float | None) -> str:
    """``75.2`` -> ``"1m15s"``: short, for tables and step lines."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
