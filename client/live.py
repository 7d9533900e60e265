"""The live build view on a terminal: steps, their state and timers, the running step's last lines.

Hand-rolled with a few ANSI sequences rather than ``rich``: rich would be a
new dependency whose import (tens of milliseconds) eats into the 0.15 s a
fully cached build may take end to end on a terminal too, and the view needs
only "redraw these N lines in place". The
view owns a block of lines at the bottom of the terminal: each redraw moves
the cursor back to its top and rewrites it; messages that must stay (notes,
the summary, a failed step's log) are written above the block.

Only imported when the output is a terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import time

from .render import (
    FAILING,
    FINISHED,
    BuildState,
    StepState,
    human_seconds,
    step_line,
    summary_lines,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TextIO

# CSI and OSC sequences and lone control characters: a build's colours or
# cursor movements would break the block's line count.
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.|[\x00-\x08\x0b-\x1f\x7f]"
)
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_COLORS = {"ok": "32", "cached": "2;32", "bad": "31", "run": "33", "dim": "2", "bold": "1"}
_STATUS_STYLE = {
    "ran": "ok",
    "cached": "cached",
    "running": "run",
    "pending": "dim",
    "skipped": "dim",
}


class LiveBuildView:
    """Same methods as ``render.PlainBuildView``, drawn as a block that updates in place."""

    tick_interval: float | None = 0.2
    log_lines = 5  # of the running step, under it
    failure_lines = 20  # of a failed step, kept on screen when the build ends

    def __init__(self, out: TextIO, spec_path: str, *, color: bool | None = None) -> None:
        self.out = out
        self.state = BuildState(spec_path, tail=self.failure_lines)
        # no-color.org: only a non-empty NO_COLOR turns colour off.
        self.color = not os.environ.get("NO_COLOR") if color is None else color
        encoding = (getattr(out, "encoding", None) or "ascii").lower().replace("-", "")
        self.fancy = encoding == "utf8"
        self._drawn = 0  # lines of the block now on screen
        self._last_draw = 0.0

    # --- the view's interface ---------------------------------------------

    def event(self, ev: Mapping[str, Any]) -> None:
        name, data = ev.get("event"), ev.get("data") or {}
        st = self.state
        if name == "build":
            st.on_build(data)
        elif name == "step":
            st.on_step(data)
        elif name == "log":
            st.on_log(data)  # kept in the step's tail, shown while it runs or if it failed
            self._draw(throttle=True)
            return
        elif name == "note":
            self._above([self._paint("dim", f"note: {data.get('message', '')}")])
            return
        self._draw()

    def tick(self) -> None:
        self._draw()

    def finish(self, result: Mapping[str, Any]) -> None:
        st = self.state
        st.apply_result(result)
        for step in st.steps:
            rest = step.splitter.flush()
            if rest is not None:
                step.tail.append(rest)
        self._draw(final=True)
        self._drawn = 0  # the block stays as the record of the build
        lines: list[str] = []
        for step in st.steps:
            if step.status in FAILING and step.tail:
                lines.append(self._paint("bold", f"last lines of {step.name}:"))
                lines += [
                    self._paint("dim", "  │ " if self.fancy else "  | ") + self._clean(t)
                    for t in step.tail
                ]
        status = result.get("status")
        style = "ok" if status == "success" else "run" if status in ("queued", "running") else "bad"
        summary = summary_lines(st, result)
        lines.append(self._paint(style, summary[0]))
        lines += summary[1:]
        self._write("".join(line + "\n" for line in lines) + "\x1b[?25h")

    def abort(self) -> None:
        """Leave the block as it is and give the cursor back (Ctrl-C, lost daemon)."""
        self._drawn = 0
        self._write("\x1b[?25h")

    # --- drawing ------------------------------------------------------------

    def _draw(self, *, throttle: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if throttle and now - self._last_draw < 0.05:
            return
        self._last_draw = now
        size = shutil.get_terminal_size()
        lines = self._fit(self._block(now, final), max(3, size.lines - 1))
        self._write(
            self._rewind()
            + "".join(f"\x1b[2K{_cut(line, size.columns - 1)}\n" for line in lines)
            + "\x1b[J"
        )
        self._drawn = len(lines)

    def _block(self, now: float, final: bool) -> list[str]:
        st = self.state
        head = f"{st.label}"
        if st.build:
            head += f"  build {st.build}"
        if st.base:
            head += f"  on {st.base}"
        lines = [
            self._paint("bold", head) + self._paint("dim", f"  {human_seconds(now - st.started)}")
        ]
        width = max((len(s.name) for s in st.steps), default=0)
        for step in st.steps:
            lines.append(self._step(step, width, now))
            if step.status == "running" and not final:
                bar = "│ " if self.fancy else "| "
                lines += [
                    self._paint("dim", f"      {bar}{self._clean(t)}")
                    for t in list(step.tail)[-self.log_lines :]
                ]
        return lines

    def _step(self, step: StepState, width: int, now: float) -> str:
        status = step.status
        if status == "running":
            text = f"running {human_seconds(step.elapsed(now))}"
        else:
            text = step_line(step).split(": ", 1)[1]
        style = (
            "bad"
            if status in FAILING
            else _STATUS_STYLE.get(status, "ok" if status in FINISHED else "dim")
        )
        return f"  {self._mark(status)} {step.name.ljust(width)}  " + self._paint(style, text)

    def _mark(self, status: str) -> str:
        if status == "running":
            spin = _SPINNER if self.fancy else "|/-\\"
            return self._paint("run", spin[int(time.monotonic() * 10) % len(spin)])
        if status in FAILING:
            return self._paint("bad", "✘" if self.fancy else "x")
        if status in ("ran", "cached"):
            return self._paint("ok", "✔" if self.fancy else "+")
        return self._paint("dim", "·" if self.fancy else ".")

    def _fit(self, lines: list[str], height: int) -> list[str]:
        """Drop the oldest step lines when the block would not fit on the screen."""
        if len(lines) <= height:
            return lines
        hidden = len(lines) - height + 1
        return [lines[0], self._paint("dim", f"  ... {hidden} lines above"), *lines[1 + hidden :]]

    def _above(self, lines: list[str]) -> None:
        """Write lines that stay, then the block again under them."""
        self._write(self._rewind() + "\x1b[J" + "".join(f"{line}\n" for line in lines))
        self._drawn = 0
        self._draw()

    def _rewind(self) -> str:
        # Hide the cursor while drawing; \x1b[nF goes to the start of the line n lines up.
        return "\x1b[?25l" + (f"\x1b[{self._drawn}F" if self._drawn else "\r")

    def _paint(self, style: str, text: str) -> str:
        if not self.color:
            return text
        return f"\x1b[{_COLORS[style]}m{text}\x1b[0m"

    def _clean(self, text: str) -> str:
        return _CONTROL.sub("", text.expandtabs(8))

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _cut(line: str, width: int) -> str:
    """Cut a line to ``width`` visible characters, keeping its colour codes whole."""
    visible = 0
    out = []
    for part in re.split(r"(\x1b\[[0-9;]*m)", line):
        if part.startswith("\x1b["):
            out.append(part)
            continue
        room = width - visible
        if room <= 0:
            continue
        out.append(part[:room])
        visible += min(len(part), room)
    text = "".join(out)
    return text + "\x1b[0m" if visible >= width and "\x1b[" in text else text
