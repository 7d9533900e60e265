"""Plain-text and JSON output of the ``amber`` command, with no terminal control.

Everything here turns daemon results and build events into lines, so it is
tested without a terminal or a daemon. The live terminal view (``live.py``)
shares ``BuildState`` and the summary lines with the plain build view, so
both say the same things.
"""

from __future__ import annotations

import codecs
import time
from collections import deque

from .units import human_bytes, human_seconds

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from typing import Any, TextIO

#: Step statuses after which a step is over, whatever its outcome.
FINISHED = frozenset({"ran", "cached", "cached-failure", "failed", "errored", "skipped"})
#: Step statuses that make the build fail.
FAILING = frozenset({"cached-failure", "failed", "errored"})


def format_time(value: object) -> str:
    """An epoch time (what amberd stores) as local ``YYYY-MM-DD HH:MM``; strings as given."""
    if value is None:
        return "-"
    number = _number(value)
    if number is not None:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(number))
    return str(value)


def format_exit(code: object) -> str:
    """An exit status as a user reads it: negative values are signals."""
    if isinstance(code, int) and code < 0:
        return f"signal {-code}"
    return f"exit {code}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def short(digest: object, n: int = 12) -> str:
    """A digest cut to a length people can read and still tell apart."""
    return str(digest)[:n] if digest else "-"


# --- logs ------------------------------------------------------------------------


class LineSplitter:
    """Turns a step's raw output, in chunks cut anywhere, into text lines.

    Decodes UTF-8 incrementally (a character split between two chunks stays
    whole) and keeps what a terminal would show of a line rewritten with
    carriage returns (progress meters), so plain logs stay readable.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""

    def feed(self, data: bytes | str) -> list[str]:
        """The lines this chunk completes."""
        text = data if isinstance(data, str) else self._decoder.decode(data)
        *lines, self._partial = (self._partial + text).split("\n")
        return [_last_rewrite(line) for line in lines]

    def flush(self) -> str | None:
        """The unterminated last line, if any: call when the step is over."""
        line = _last_rewrite(self._partial + self._decoder.decode(b"", final=True))
        self._partial = ""
        return line or None


def _last_rewrite(line: str) -> str:
    return line.rstrip("\r").rsplit("\r", 1)[-1]


# --- builds ----------------------------------------------------------------------


class StepState:
    """One step as a view shows it."""

    __slots__ = ("exit_code", "name", "note", "seconds", "splitter", "started", "status", "tail")

    def __init__(self, name: str, tail: int = 20) -> None:
        self.name = name
        self.status = "pending"
        self.exit_code: int | None = None
        self.seconds: float | None = None
        self.note: str | None = None
        self.started: float | None = None  # monotonic, while running
        self.splitter = LineSplitter()
        self.tail: deque[str] = deque(maxlen=tail)  # the last lines, for failures

    def elapsed(self, now: float | None = None) -> float | None:
        """Seconds so far for a running step, else the daemon's figure."""
        if self.status == "running" and self.started is not None:
            return (time.monotonic() if now is None else now) - self.started
        return self.seconds


class BuildState:
    """What is known about one build, fed with its events; shared by the views.

    Unknown events and fields are ignored, so a newer daemon can add some
    without breaking an older client.
    """

    def __init__(self, spec_path: str, tail: int = 20) -> None:
        self.spec_path = spec_path
        self.label = _stem(spec_path)  # until the daemon names the build
        self.build: str | None = None
        self.base: str | None = None
        self.steps: list[StepState] = []
        self.started = time.monotonic()
        self._tail = tail

    def on_build(self, data: Mapping[str, Any]) -> None:
        self.build = _str_or(data.get("build"), self.build)
        self.label = _str_or(data.get("name"), self.label)
        self.base = _str_or(data.get("base"), self.base)
        names = data.get("steps")
        if isinstance(names, list):
            self.steps = [StepState(str(n), self._tail) for n in names]

    def on_step(self, data: Mapping[str, Any]) -> StepState:
        step = self.step(data.get("index"), data.get("name"))
        status = str(data.get("status", step.status))
        if status == "running" and step.status != "running":
            step.started = time.monotonic()
        step.status = status
        for key in ("exit_code", "seconds", "note"):
            if data.get(key) is not None:
                setattr(step, key, data[key])
        return step

    def on_log(self, data: Mapping[str, Any]) -> tuple[StepState, list[str]]:
        """The step a log chunk belongs to, and the whole lines it completes."""
        ref = data.get("step")
        step = self.step(
            ref if isinstance(ref, int) else None, ref if isinstance(ref, str) else None
        )
        lines = step.splitter.feed(data.get("data") or b"")
        step.tail.extend(lines)
        return step, lines

    def find(self, name: str) -> StepState | None:
        """The step named so, if the build has one."""
        return next((step for step in self.steps if step.name == name), None)

    def step(self, index: object = None, name: object = None) -> StepState:
        """The step named or numbered so; the running one if neither is given."""
        if isinstance(name, str):
            found = self.find(name)
            if found is None:
                found = StepState(name, self._tail)
                self.steps.append(found)
            return found
        if isinstance(index, int) and 0 <= index < len(self.steps):
            return self.steps[index]
        for step in self.steps:
            if step.status == "running":
                return step
        self.steps.append(StepState(f"step {len(self.steps) + 1}", self._tail))
        return self.steps[-1]

    def apply_result(self, result: Mapping[str, Any]) -> None:
        """Take the final word on every step from the build's result."""
        self.build = _str_or(result.get("build"), self.build)
        self.label = _str_or(result.get("name"), self.label)
        for entry in result.get("steps") or []:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                step = self.step(name=entry["name"])
                step.status = str(entry.get("status", step.status))
                step.exit_code = entry.get("exit_code", step.exit_code)
                step.seconds = entry.get("seconds", step.seconds)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.status] = counts.get(step.status, 0) + 1
        return counts


def step_line(step: StepState) -> str:
    """``extract: cached``, ``build: failed (exit 2) after 3.1s``: one step's outcome."""
    status, seconds = step.status, step.seconds
    if status == "ran":
        text = f"ran in {human_seconds(seconds)}" if seconds is not None else "ran"
    elif status == "failed":
        text = f"failed ({format_exit(step.exit_code)})"
        if seconds is not None:
            text += f" after {human_seconds(seconds)}"
    elif status == "cached-failure":
        text = f"cached failure ({format_exit(step.exit_code)})"
    elif status == "errored" and seconds is not None:
        text = f"errored after {human_seconds(seconds)}"
    else:
        text = status
    if step.note:
        text += f" - {step.note}"
    return f"{step.name}: {text}"


def summary_lines(state: BuildState, result: Mapping[str, Any]) -> list[str]:
    """What to tell the user when a build is over, with the commands to go on from there."""
    bid = result.get("build") or state.build or "?"
    status = result.get("status")
    if status == "success":
        counts = state.counts()
        done = ", ".join(f"{counts[s]} {s}" for s in ("ran", "cached") if counts.get(s))
        took = human_seconds(time.monotonic() - state.started)
        return [f"success: build {bid}" + (f" ({done})" if done else "") + f" in {took}"]
    if status in ("queued", "running"):
        head = f"build {bid} is {status} in the background"
        return [
            head,
            *_hints([(f"amber log -f {bid}", "follow it"), (f"amber cancel {bid}", "stop it")]),
        ]
    failed = result.get("failed_step")
    error = result.get("error")
    head = f"{status}" + (f" at step {failed}" if failed else "") + f": build {bid}"
    head += " is frozen" if result.get("frozen") else ""
    head += f" ({error})" if error else ""
    hints: list[tuple[str, str]] = []
    if result.get("frozen"):
        step = f"step {failed}" if failed else "the failing step"
        hints += [
            (f"amber shell {bid}", "enter the state at the failure"),
            (f"amber shell --before {bid}", f"enter the state before {step}"),
            (f"amber diff {bid}", f"see what {step} changed"),
        ]
    if failed:
        hints.append((f"amber log {bid} --step {failed}", "its whole log"))
    failed_state = state.find(failed) if isinstance(failed, str) else None
    if failed_state is not None and failed_state.status == "cached-failure":
        hints.append((f"amber build --retry-failed {state.spec_path}", "run it again"))
    lines = [head, *_hints(hints)]
    if status == "errored":
        lines.append("  nothing was cached for that step: build again to retry")
    return lines


def _hints(pairs: list[tuple[str, str]]) -> list[str]:
    """Commands with what they do, aligned."""
    width = max((len(cmd) for cmd, _ in pairs), default=0)
    return [f"  {cmd.ljust(width)}   {what}" for cmd, what in pairs]


def build_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--json`` object for one build: the documented keys, steps normalised."""
    steps = [
        {k: s.get(k) for k in ("name", "status", "exit_code", "seconds", "snapshot_seconds")}
        for s in result.get("steps") or []
        if isinstance(s, dict)
    ]
    out = {"build": result.get("build"), "name": result.get("name"), "status": result.get("status")}
    out |= {k: result.get(k) for k in ("frozen", "failed_step", "error", "created", "finished")}
    out["steps"] = steps
    return out


class PlainBuildView:
    """Build progress as plain lines, for logs and pipes: ``[zlib] step extract: cached``.

    The live view (``live.py``) has the same methods: ``event``, ``tick``,
    ``finish`` and ``abort``; ``tick_interval`` None means no ticks wanted.
    """

    tick_interval: float | None = None

    def __init__(self, out: TextIO, spec_path: str) -> None:
        self.out = out
        self.state = BuildState(spec_path)

    def event(self, ev: Mapping[str, Any]) -> None:
        name, data = ev.get("event"), ev.get("data") or {}
        st = self.state
        if name == "build":
            st.on_build(data)
            self._say(f"build {st.build}: {len(st.steps)} steps on base {st.base}")
        elif name == "step":
            step = st.on_step(data)
            if step.status in FINISHED:
                self._flush_log(step)
            self._say(f"step {step_line(step)}")
        elif name == "log":
            step, lines = st.on_log(data)
            for line in lines:
                self._say(f"{step.name} | {line}")
        elif name == "note":
            self._say(f"note: {data.get('message', '')}")
        self.out.flush()

    def tick(self) -> None:
        """Plain lines do not move."""

    def finish(self, result: Mapping[str, Any]) -> None:
        for step in self.state.steps:
            self._flush_log(step)
        self.state.apply_result(result)
        for line in summary_lines(self.state, result):
            self._say(line)
        self.out.flush()

    def abort(self) -> None:
        for step in self.state.steps:
            self._flush_log(step)
        self.out.flush()

    def _flush_log(self, step: StepState) -> None:
        rest = step.splitter.flush()
        if rest is not None:
            step.tail.append(rest)
            self._say(f"{step.name} | {rest}")

    def _say(self, text: str) -> None:
        self.out.write(f"[{self.state.label}] {text}\n")


# --- other commands ----------------------------------------------------------------


def render_ps(result: Mapping[str, Any]) -> str:
    builds = result.get("builds") or []
    if not builds:
        return "no builds running or queued"
    rows = [
        (
            b.get("id"),
            b.get("name"),
            user_name(b.get("uid")),
            b.get("status"),
            b.get("step"),
            human_seconds(b.get("elapsed")),
        )
        for b in builds
    ]
    return table(("BUILD", "NAME", "USER", "STATUS", "STEP", "ELAPSED"), rows)


def render_builds(result: Mapping[str, Any], users: bool = False) -> str:
    """The build history; ``users`` adds a USER column (``amber builds --all``)."""
    builds = result.get("builds") or []
    if not builds:
        return "no builds yet"
    rows = []
    for b in builds:
        status = str(b.get("status"))
        if b.get("frozen"):
            status = f"{status.upper()} (frozen)"
        created, finished = b.get("created"), b.get("finished")
        took = finished - created if _numbers(created, finished) else None
        who = (user_name(b.get("uid")),) if users else ()
        rows.append(
            (
                b.get("id"),
                b.get("name"),
                *who,
                status,
                b.get("failed_step"),
                format_time(created),
                human_seconds(took),
            )
        )
    headers = ("BUILD", "NAME", *(("USER",) if users else ()), "STATUS", "FAILED STEP")
    text = table((*headers, "STARTED", "TOOK"), rows)
    frozen = next((b.get("id") for b in builds if b.get("frozen")), None)
    if frozen is not None:
        text += f"\nfrozen builds keep their failure: amber shell {frozen}, amber diff {frozen}"
    return text


def render_status(result: Mapping[str, Any], socket_path: str) -> str:
    last_gc = result.get("last_gc")
    rows = [
        ("amberd", f"{result.get('version', '?')} at {socket_path}"),
        ("uptime", human_seconds(result.get("uptime"))),
        ("builds", f"{result.get('running', 0)} running, {result.get('queued', 0)} queued"),
        ("store", human_bytes(result.get("store_bytes"))),
        ("free", human_bytes(result.get("free_bytes"))),
        ("last gc", "never" if last_gc in (None, "") else format_time(last_gc)),
        ("state", result.get("state_dir", "-")),
    ]
    if result.get("fs_mode"):
        rows.append(("fs mode", f"{result['fs_mode']} ({result.get('fs_mode_reason') or '-'})"))
    return "\n".join(f"{k + ':':<8} {v}" for k, v in rows)


def render_images(result: Mapping[str, Any]) -> str:
    images = result.get("images") or []
    if not images:
        return "no images (add one with: amber image import NAME SOURCE)"
    rows = [
        (
            i.get("name"),
            "shared" if i.get("uid") == 0 else user_name(i.get("uid")),
            short(i.get("tree")),
            i.get("source"),
            format_time(i.get("created")),
        )
        for i in images
    ]
    return table(("NAME", "OWNER", "TREE", "SOURCE", "CREATED"), rows)


def render_pins(result: Mapping[str, Any]) -> str:
    pins = result.get("pins") or []
    if not pins:
        return "no pins"
    rows = []
    for p in pins:
        if isinstance(p, dict):
            rows.append((p.get("name"), p.get("target"), format_time(p.get("created")),
                         _pin_places(p)))  # fmt: skip
        else:
            rows.append((p, None, None, None))
    return table(("NAME", "TARGET", "CREATED", "WHERE"), rows)


def _pin_places(pin: Mapping[str, Any]) -> str:
    """``local`` and each remote the pin is tagged in (or being tagged in, or failed)."""
    places = ["local"]
    for remote in pin.get("remotes") or []:
        if not isinstance(remote, dict):
            continue
        states = {str(s).split(":", 1)[0] for s in remote.get("states") or []}
        state = "" if states == {"tagged"} else f" ({', '.join(sorted(states))})"
        places.append(f"{remote.get('url')}{state}")
    return ", ".join(places)


_KIND_MARKS = {"added": "A", "modified": "M", "deleted": "D", "replaced": "R"}
_TYPE_SUFFIX = {"dir": "/", "directory": "/", "symlink": "@", "link": "@"}


def render_diff(result: Mapping[str, Any], stat: bool) -> str:
    """``A path``, ``M path``, ``D path`` lines (``git status --short`` style)."""
    changes = [c for c in result.get("changes") or [] if isinstance(c, dict)]
    if not changes:
        return "no changes"
    lines = []
    totals: dict[str, int] = {}
    for c in changes:
        kind = str(c.get("kind", "?"))
        totals[kind] = totals.get(kind, 0) + 1
        mark = _KIND_MARKS.get(kind, kind[:1].upper() or "?")
        path = f"{c.get('path')}{_TYPE_SUFFIX.get(str(c.get('type')), '')}"
        if stat:
            lines.append(f"{mark} {human_bytes(c.get('size')):>10}  {path}")
        else:
            lines.append(f"{mark} {path}")
    if stat:
        lines.append(", ".join(f"{n} {kind}" for kind, n in totals.items()))
    return "\n".join(lines)


def render_mapping(result: Mapping[str, Any]) -> str:
    """Any result as ``key: value`` lines; ``*_bytes`` in binary units, lists counted."""
    lines = []
    for key, value in result.items():
        label = key.removesuffix("_bytes").replace("_", " ")
        if key.endswith("_bytes") and _number(value) is not None:
            lines.append(f"{label}: {human_bytes(value)}")
        elif isinstance(value, list):
            lines.append(f"{label}: {len(value)}")
            lines += [f"  {describe_item(item)}" for item in value]
        elif isinstance(value, dict):
            lines.append(f"{label}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{label}: {'-' if value is None else value}")
    return "\n".join(lines)


def render_gc(result: Mapping[str, Any], dry_run: bool) -> str:
    verb = "would free" if dry_run else "freed"
    rest = {k: v for k, v in result.items() if k not in ("freed_bytes", "objects")}
    head = (
        f"{verb} {human_bytes(result.get('freed_bytes', 0))} in {result.get('objects', 0)} objects"
    )
    return "\n".join([head, render_mapping(rest)]) if rest else head


def describe_item(item: object) -> str:
    """One entry of a list of problems or objects, as one line."""
    if isinstance(item, dict):
        message = item.get("message")
        rest = ", ".join(f"{k}={v}" for k, v in item.items() if k != "message")
        return f"{message} ({rest})" if message and rest else str(message or rest)
    return str(item)


#: Keys whose values are points in time: epoch seconds on the wire, RFC 3339 in JSON output.
TIME_KEYS = frozenset({"created", "finished", "started", "last_gc"})


def to_json(value: object) -> str:
    """One line of JSON; bytes (log data) become text, times RFC 3339 (see ``TIME_KEYS``).

    Every ``--json`` output goes through here, so scripts get one time
    format everywhere, whichever command printed it.
    """
    import json  # ~2 ms; only the commands that print JSON pay for it

    return json.dumps(json_times(value), default=_json_default, ensure_ascii=False)


def json_times(value: object) -> object:
    """A copy of ``value`` with the epoch times under ``TIME_KEYS`` as RFC 3339 strings."""
    if isinstance(value, dict):
        return {
            k: rfc3339(v) if k in TIME_KEYS and _number(v) is not None else json_times(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [json_times(v) for v in value]
    return value


def rfc3339(value: object) -> str | None:
    """Epoch seconds as ``2026-12-02T14:24:06Z`` (UTC, whole seconds); None stays None."""
    number = _number(value)
    if number is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(number))


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def user_name(uid: object) -> str:
    """A uid as a name when this machine knows it."""
    if not isinstance(uid, int):
        return "-" if uid is None else str(uid)
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _numbers(*values: object) -> bool:
    return all(_number(v) is not None for v in values)


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _str_or(value: object, default: str | None) -> str | None:
    return value if isinstance(value, str) and value else default


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".toml") or name
