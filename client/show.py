"""``amber show``: one build as a table, a per-step timeline and a Chrome trace.

Imported by ``cli.py`` only when ``amber show`` runs. Everything here is pure:
it turns the daemon's ``show`` result into text or trace events, so it is
tested without a terminal or a daemon.

The trace is the Trace Event Format that Perfetto and ``chrome://tracing``
open: the build is one complete event (``"ph": "X"``) and each step that ran
another inside it on the same thread, so the viewer stacks the steps under
the build; cache hits take no time and are instant events (``"ph": "i"``).
Times are microseconds from the build's start.
"""

from __future__ import annotations

import time

from .render import human_bytes, human_seconds, short, table, to_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

#: The eighths of a cell, for bars drawn finer than one column.
_EIGHTHS = " ▏▎▍▌▋▊▉"
#: How each step status is drawn: (unicode, ascii) bar cell, or a mark for steps without time.
_BAR = {
    "ran": ("█", "#"),
    "failed": ("▓", "X"),
    "errored": ("░", "!"),
    "running": ("▒", ">"),
}
_MARK = {"cached": ("○", "o"), "cached-failure": ("●", "x")}
_CACHED = frozenset(_MARK)


def unicode_ok(out: Any, environ: Mapping[str, str]) -> bool:
    """Whether ``out`` is a terminal that shows UTF-8: block characters, else plain ASCII.

    The locale decides (the first of LC_ALL, LC_CTYPE, LANG that is set), as
    it does for every other program on that terminal.
    """
    try:
        if not out.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    if environ.get("TERM", "dumb") == "dumb":
        return False
    for name in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = environ.get(name)
        if value:
            return value.lower().replace("-", "").endswith("utf8")
    return False


# --- the text view ------------------------------------------------------------------


def render_show(result: Mapping[str, Any], *, unicode: bool, width: int = 80) -> str:
    """The build's summary, its steps as a table and a timeline of them."""
    steps = [s for s in result.get("steps") or [] if isinstance(s, dict)]
    lines = _header(result)
    if not steps:
        return "\n".join([*lines, "", "no steps"])
    rows = [
        (
            s.get("name"),
            s.get("status"),
            "-" if s.get("exit_code") is None else s.get("exit_code"),
            human_seconds(s.get("seconds")),
            human_bytes(s.get("log_bytes")),
            short(s.get("key")),
            short(s.get("before_tree")),
            short(s.get("after_tree")),
        )
        for s in steps
    ]
    lines += ["", table(("STEP", "STATUS", "EXIT", "TIME", "LOG", "KEY", "BEFORE", "AFTER"), rows)]
    lines += ["", *timeline(result, unicode=unicode, width=width)]
    return "\n".join(lines)


def _header(result: Mapping[str, Any]) -> list[str]:
    bid, status = result.get("build"), result.get("status")
    user = result.get("user") or "?"
    head = f"build {bid} ({result.get('name')}): {status}"
    if result.get("failed_step"):
        head += f" at step {result['failed_step']}"
    if result.get("frozen"):
        head += ", frozen"
    lines = [
        head,
        f"  owner  {user} (uid {result.get('uid')})",
        f"  base   {result.get('base')}"
        + (f" ({result['base_digest']})" if result.get("base_digest") else ""),
        f"  host   {result.get('host')}",
        f"  spec   {result.get('spec_path')}",
    ]
    created, finished = _number(result.get("created")), _number(result.get("finished"))
    if created is not None:
        took = f", took {human_seconds(finished - created)}" if finished is not None else ""
        lines.append(
            f"  start  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(created))}{took}"
        )
    if result.get("imported_from"):
        lines.append(f"  from   build {result['imported_from']} (imported)")
    if result.get("error"):
        lines.append(f"  error  {result['error']}")
    return lines


def timeline(
    result: Mapping[str, Any], *, unicode: bool, width: int = 80, now: float | None = None
) -> list[str]:
    """One line per step: a bar placed at its start, as long as it took; cache hits a mark.

    The scale is the whole build, so bars show where the time went and how
    the steps followed each other.
    """
    steps = [s for s in result.get("steps") or [] if isinstance(s, dict)]
    now = time.time() if now is None else now
    t0 = _number(result.get("created"))
    spans = [_span(s, now) for s in steps]
    starts = [span[0] for span in spans if span is not None]
    if t0 is None:
        t0 = min(starts, default=0.0)
    end = max((a + b for a, b in (sp for sp in spans if sp is not None)), default=t0)
    end = max(end, _number(result.get("finished")) or t0)
    total = max(end - t0, 1e-9)
    name_width = min(max(len(str(s.get("name"))) for s in steps), 24)
    bar_width = max(10, width - name_width - 16)
    lines = [
        f"timeline ({human_seconds(end - t0)} in all, one column = {_fine(total / bar_width)})"
    ]
    for step, span in zip(steps, spans, strict=True):
        name = str(step.get("name"))[:name_width].ljust(name_width)
        status = str(step.get("status"))
        if span is None:
            lines.append(f"{name}  {'':{bar_width}}  {status}")
            continue
        offset = (span[0] - t0) / total * bar_width
        if status in _CACHED:
            mark = _MARK[status][0 if unicode else 1]
            col = min(int(offset), bar_width - 1)
            bar = " " * col + mark
            label = "cached" if status == "cached" else "cached failure"
        else:
            bar = _bar(offset, span[1] / total * bar_width, _BAR.get(status, ("█", "#")), unicode)
            label = human_seconds(span[1]) + ("" if status == "ran" else f" {status}")
        lines.append(f"{name}  {bar[:bar_width]:{bar_width}}  {label}")
    lines.append(_legend(unicode))
    return lines


def _fine(seconds: float) -> str:
    """A short duration, milliseconds below a second (a column's worth of time)."""
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else human_seconds(seconds)


def _bar(offset: float, length: float, cells: tuple[str, str], unicode: bool) -> str:
    """Spaces up to ``offset`` columns, then ``length`` columns of bar (at least a sliver)."""
    lead = int(offset)
    if not unicode:
        return " " * lead + cells[1] * max(1, round(length))
    full = cells[0]
    if full != "█":  # shaded bars have no eighths: whole cells only
        return " " * lead + full * max(1, round(length))
    eighths = max(1, round(length * 8))
    return " " * lead + "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _legend(unicode: bool) -> str:
    i = 0 if unicode else 1
    return (
        f"{_BAR['ran'][i]} ran  {_BAR['failed'][i]} failed  {_BAR['errored'][i]} errored  "
        f"{_MARK['cached'][i]} cached  {_MARK['cached-failure'][i]} cached failure"
    )


def _span(step: Mapping[str, Any], now: float) -> tuple[float, float] | None:
    """(start, seconds) of a step in this build; None when it never started here."""
    started = _number(step.get("started"))
    if started is None:
        return None
    if step.get("status") in _CACHED:
        return started, 0.0
    seconds = _number(step.get("seconds"))
    if seconds is None:
        seconds = max(0.0, now - started) if step.get("status") == "running" else 0.0
    return started, seconds


# --- the trace ----------------------------------------------------------------------

PID, TID = 1, 1


def trace_events(result: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """The build as a Trace Event Format object (``{"traceEvents": [...]}``)."""
    now = time.time() if now is None else now
    steps = [s for s in result.get("steps") or [] if isinstance(s, dict)]
    spans = [_span(s, now) for s in steps]
    t0 = _number(result.get("created"))
    if t0 is None:
        t0 = min((sp[0] for sp in spans if sp is not None), default=now)
    finished = _number(result.get("finished"))
    end = max([finished if finished is not None else now]
              + [a + b for a, b in (sp for sp in spans if sp is not None)])  # fmt: skip
    bid = str(result.get("build"))

    def us(t: float) -> float:
        return round(max(0.0, t - t0) * 1e6, 3)

    events: list[dict[str, Any]] = [
        _meta("process_name", {"name": f"amber build {bid} ({result.get('name')})"}),
        _meta("thread_name", {"name": "steps"}),
        {
            "name": f"build {bid}", "cat": "build", "ph": "X", "ts": 0.0, "dur": us(end),
            "pid": PID, "tid": TID,
            "args": {k: result.get(k) for k in ("status", "base", "host", "user", "uid", "failed_step")},
        },
    ]  # fmt: skip
    for step, span in zip(steps, spans, strict=True):
        if span is None:
            continue
        args = {k: step.get(k) for k in ("status", "exit_code", "key", "before_tree",
                                         "after_tree", "log_bytes", "cached_from", "note")}  # fmt: skip
        event: dict[str, Any] = {
            "name": str(step.get("name")), "cat": str(step.get("status")), "ts": us(span[0]),
            "pid": PID, "tid": TID, "args": {k: v for k, v in args.items() if v is not None},
        }  # fmt: skip
        if step.get("status") in _CACHED:
            event |= {"ph": "i", "s": "t"}  # a cache hit takes no time: a mark on the thread
        else:
            event |= {"ph": "X", "dur": round(span[1] * 1e6, 3)}
        events.append(event)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"build": bid, "started": result.get("created")},
    }


def _meta(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "ts": 0, "pid": PID, "tid": TID, "args": args}


def trace_json(result: Mapping[str, Any], now: float | None = None) -> str:
    """The trace as JSON text (times in ``otherData`` as RFC 3339, like all amber JSON)."""
    return to_json(trace_events(result, now))


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
