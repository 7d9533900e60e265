"""FUSE requests by opcode, from the kernel's ``fuse`` tracepoints (fs.py, pipeline.py).

The ``fuse:fuse_request_send``/``_end`` tracepoints fire in the kernel for
every request a FUSE mount sends and every reply, with the connection (the
mount's anonymous device minor), a request number and the opcode. Reading
them from a private tracefs instance touches no amber code and costs far less
than the requests themselves. The time of a request is from the kernel sending
it to the reply: what the calling process waited.

Two ways to choose the mounts: a ``connection`` known before the trace starts
(fs.py mounts first, then traces), or everything, parsed later for the
``connections`` found while it ran (pipeline.py: amberd mounts during the
build, and other mounts on the machine must not count). The instance uses the
``mono`` clock, so a request's time compares with ``time.monotonic()``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("fuse_request_send", "fuse_request_end")

TRACE_LINE = re.compile(
    rb" (\d+\.\d+): fuse_request_(send|end): connection (\d+) req (\d+)(?: opcode \d+ \((\w+)\))?"
)


@dataclass
class OpCost:
    requests: int = 0
    wait_seconds: float = 0.0  # summed over requests, send to reply


def ensure_tracefs() -> str | None:
    """Mount tracefs at its usual place if nothing is there; why not, if it cannot be had."""
    if (TRACEFS / "instances").is_dir():
        return None
    try:
        from amber.sandbox.mounts import mount

        mount("nodev", TRACEFS, "tracefs", "")
    except OSError as exc:
        return f"no tracefs at {TRACEFS} ({exc})"
    if not (TRACEFS / "events/fuse").is_dir():
        return "this kernel has no fuse tracepoints"
    return None


class FuseTrace:
    """The fuse tracepoints of one private tracefs instance, while the block runs."""

    def __init__(self, name: str, connection: int | None = None, buffer_kb: int = 8192):
        self.dir = TRACEFS / "instances" / name
        self.connection = connection
        self.buffer_kb = buffer_kb
        self.available = False
        self.phases: dict[str, dict[str, OpCost]] = {}

    def __enter__(self) -> FuseTrace:
        why = ensure_tracefs()
        try:
            if why is not None:
                raise OSError(why)
            self.dir.mkdir()
        except OSError as exc:
            print(f"no FUSE request trace ({exc})", file=sys.stderr)
            return self
        self.available = True
        (self.dir / "buffer_size_kb").write_text(f"{self.buffer_kb}\n")
        (self.dir / "trace_clock").write_text("mono\n")
        for event in EVENTS:
            where = self.dir / "events/fuse" / event
            if self.connection is not None:
                (where / "filter").write_text(f"connection == {self.connection}\n")
            (where / "enable").write_text("1\n")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.available:
            return
        (self.dir / "events/fuse/enable").write_text("0\n")
        if self.overruns():
            print("the FUSE trace lost events; its counts are low", file=sys.stderr)
        self.dir.rmdir()

    def overruns(self) -> int:
        if not self.available:
            return 0
        return sum(
            int(line.split()[1])
            for cpu in (self.dir / "per_cpu").iterdir()
            for line in (cpu / "stats").read_text().splitlines()
            if line.startswith("overrun:")
        )

    def take(self) -> bytes:
        """What was traced since the last take, and clear it."""
        if not self.available:
            return b""
        text = (self.dir / "trace").read_bytes()
        (self.dir / "trace").write_text("")  # clears the buffer
        return text

    def collect(self, phase: str) -> None:
        """Attribute the requests traced so far to ``phase``, then clear."""
        if self.available:
            self.phases[phase] = parse_fuse_trace(self.take())


@dataclass
class Request:
    op: str
    sent: float  # the trace clock (mono): comparable with time.monotonic()
    seconds: float


def requests(text: bytes, connections: Iterable[int] | None = None) -> list[Request]:
    """Every answered request in ``text`` (of ``connections`` only, when given)."""
    wanted = None if connections is None else {str(c).encode() for c in connections}
    out: list[Request] = []
    sent: dict[tuple[bytes, bytes], tuple[str, float]] = {}
    for match in TRACE_LINE.finditer(text):
        stamp, kind, conn, unique, opcode = match.groups()
        if wanted is not None and conn not in wanted:
            continue
        if kind == b"send" and opcode is not None:
            sent[conn, unique] = (opcode.decode().removeprefix("FUSE_"), float(stamp))
        elif (conn, unique) in sent:
            op, start = sent.pop((conn, unique))
            out.append(Request(op, start, float(stamp) - start))
    return out


def by_opcode(found: Iterable[Request]) -> dict[str, OpCost]:
    costs: dict[str, OpCost] = {}
    for request in found:
        cost = costs.setdefault(request.op, OpCost())
        cost.requests += 1
        cost.wait_seconds += request.seconds
    return costs


def parse_fuse_trace(text: bytes, connections: Iterable[int] | None = None) -> dict[str, OpCost]:
    return by_opcode(requests(text, connections))


def fuse_connections(pid: int, under: Path) -> set[int]:
    """The connections of FUSE mounts below ``under`` as process ``pid`` sees them."""
    prefix = os.path.realpath(under).rstrip("/") + "/"
    found = set()
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1].startswith("fuse") and fields[4].startswith(prefix):
                found.add(int(fields[2].split(":")[1]))
    return found
