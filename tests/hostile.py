"""Hostile amber clients: frames and connections meant to hurt amberd.

Used by tests/test_hostile.py and scripts/bench/hostile.py, and run as a
program so that the attack comes from another uid::

    setpriv --reuid 4242 ... python tests/hostile.py SOCKET frames|idle N|fds|silent

``frames [N]`` sends every frame of ``FRAMES`` (N times) on a connection of
its own each and prints one line per frame: ``NAME replied CODE`` or ``NAME
closed`` (comma-separated when they differ).
``storm N`` sends N of those frames and the attacks below in turn and
prints ``survived S of N``. ``idle N`` opens N connections, says hello on each, prints ``accepted A
refused R`` and holds them until stdin closes. ``fds`` starts a frame with
descriptors and sends more descriptors in its middle; ``fds-stall`` only
starts it; both print ``sent`` and, once amberd hangs up, ``closed``, then
wait for stdin to close. ``fds-unasked`` passes two descriptors with a ``status`` request, prints
``replied CODE`` and holds the connection until stdin closes. ``silent``
connects, says nothing, and prints
``closed CODE`` when amberd hangs up.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys

import msgpack

MIB = 1 << 20


def frame(body: bytes, length: int | None = None) -> bytes:
    """A frame: a 4-byte length (``length`` if given: a lie) and the body."""
    return struct.pack(">I", len(body) if length is None else length) + body


def _array(count: int) -> bytes:
    return b"\xdd" + struct.pack(">I", count)


def _request(args_body: bytes) -> bytes:
    """A request map whose ``args`` value is ``args_body`` (raw msgpack)."""
    return (
        b"\x83"
        + msgpack.packb("op")
        + msgpack.packb("status")
        + msgpack.packb("id")
        + b"\x01"
        + msgpack.packb("args")
        + args_body
    )


def _empty_maps(size: int) -> bytes:
    n = size - 5
    return _array(n) + b"\x80" * n


def _nested_maps(size: int) -> bytes:
    """Arrays of 60,000 empty maps each, so no one container is large."""
    inner = b"\xdc" + struct.pack(">H", 60_000) + b"\x80" * 60_000
    count = size // len(inner)
    return b"\xdc" + struct.pack(">H", count) + inner * count


def _big_ints(size: int) -> bytes:
    n = (size - 5) // 5
    return _array(n) + (b"\xce" + struct.pack(">I", 1 << 31)) * n


FRAMES: dict[str, bytes] = {
    "empty-maps-16M": frame(_empty_maps(16 * MIB)),
    "empty-maps-1M": frame(_empty_maps(MIB - 64)),
    "nested-maps-16M": frame(_nested_maps(16 * MIB)),
    "nested-maps-1M-in-args": frame(_request(_nested_maps(MIB - 64))),
    "big-ints-16M": frame(_big_ints(16 * MIB)),
    "deep-nesting": frame(_request(b"\x91" * 100_000 + b"\x80")),
    "deep-maps": frame(_request((b"\x81" + msgpack.packb("k")) * 2000 + b"\x80")),
    "huge-map-header": frame(b"\xdf" + struct.pack(">I", 0xFFFFFFFF)),
    "huge-str-header": frame(b"\xdb" + struct.pack(">I", 0xFFFFFFFF)),
    "length-4G": frame(b"", length=0xFFFFFFFF),
    "not-msgpack": frame(b"\xc1" * 64),
    "not-a-map": frame(msgpack.packb([1, 2, 3])),
    "ext-type": frame(msgpack.packb(msgpack.ExtType(5, b"x"))),
    "trailing-bytes": frame(msgpack.packb({"op": "status", "id": 1}) + b"\x00"),
    "empty-frame": frame(b""),
}


def connect(path: str, timeout: float = 30) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def hello(sock: socket.socket) -> dict:
    """Say hello; amberd's answer (``{"ok": False, ...}`` when it refuses)."""
    # A refusal may come before the hello is out: it is still there to read.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(frame(msgpack.packb({"op": "hello", "id": 0, "versions": [1]})))
    return read_message(sock)


def read_message(sock: socket.socket) -> dict:
    """The next message, or ``{}`` when amberd hung up."""
    header = _read(sock, 4)
    if len(header) < 4:
        return {}
    body = _read(sock, struct.unpack(">I", header)[0])
    return msgpack.unpackb(body, raw=False)


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def send_frame(path: str, data: bytes, greet: bool = True) -> str:
    """Send ``data`` after a hello; what amberd did: ``replied CODE`` or ``closed``."""
    with connect(path) as sock:
        if greet:
            hello(sock)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        answer = read_message(sock)
    if not answer:
        return "closed"
    return f"replied {answer.get('error', {}).get('code', 'ok')}"


def idle_connections(path: str, count: int) -> tuple[list[socket.socket], int]:
    """``count`` connections that said hello and then nothing: those accepted, and refused."""
    held, refused = [], 0
    for _ in range(count):
        sock = connect(path)
        if hello(sock).get("ok"):
            held.append(sock)
        else:
            refused += 1
            sock.close()
    return held, refused


def fds_in_partial_frame(path: str, more: bool) -> socket.socket:
    """Start a request frame with 16 descriptors; with ``more``, send 50 x 16 more mid-frame."""
    sock = connect(path)
    hello(sock)
    r, w = os.pipe()
    fds = [r] * 8 + [w] * 8
    try:
        socket.send_fds(sock, [frame(b"\x83", length=1000)], fds)
        for _ in range(50 if more else 0):
            socket.send_fds(sock, [b"\xa0"], fds)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        os.close(r)
        os.close(w)
    return sock


def _survived(outcome: str) -> bool:
    """amberd refused the attack: an error reply or a hang-up, never a success."""
    return outcome == "closed" or (outcome.startswith("replied ") and outcome != "replied ok")


def _fds_mid_frame(path: str) -> str:
    with fds_in_partial_frame(path, more=True) as sock:
        answer = read_message(sock)
        while read_message(sock):
            pass
    return f"replied {answer['error']['code']}" if answer else "closed"


def storm(path: str, count: int) -> int:
    """``count`` attacks, each kind in turn on a connection of its own; how many amberd refused."""
    kinds = [*FRAMES, "fds-mid-frame", "no-hello"]
    no_hello = frame(msgpack.packb({"op": "status", "id": 1, "args": {}}))
    survived = 0
    for i in range(count):
        kind = kinds[i % len(kinds)]
        try:
            if kind == "fds-mid-frame":
                outcome = _fds_mid_frame(path)
            elif kind == "no-hello":
                outcome = send_frame(path, no_hello, greet=False)
            else:
                outcome = send_frame(path, FRAMES[kind])
        except OSError as exc:  # amberd gone, or silent past the timeout
            outcome = f"error {exc}"
        survived += _survived(outcome)
    return survived


def main(argv: list[str]) -> None:
    path, mode = argv[0], argv[1]
    if mode == "frames":
        repeat = int(argv[2]) if len(argv) > 2 else 1
        for name, data in FRAMES.items():
            outcomes = {send_frame(path, data) for _ in range(repeat)}
            print(name, ",".join(sorted(outcomes)), flush=True)
    elif mode == "storm":
        print(f"survived {storm(path, int(argv[2]))} of {argv[2]}", flush=True)
    elif mode == "idle":
        held, refused = idle_connections(path, int(argv[2]))
        print(f"accepted {len(held)} refused {refused}", flush=True)
        sys.stdin.read()
    elif mode in ("fds", "fds-stall"):
        sock = fds_in_partial_frame(path, more=mode == "fds")
        print("sent", flush=True)
        sock.settimeout(None)
        while read_message(sock):  # until amberd hangs up (its error, then EOF)
            pass
        print("closed", flush=True)
        sys.stdin.read()
    elif mode == "fds-unasked":
        with connect(path) as sock:
            hello(sock)
            r, w = os.pipe()
            request = {"op": "status", "id": 1, "args": {}, "fds": 2}
            socket.send_fds(sock, [frame(msgpack.packb(request))], [r, w])
            os.close(r)
            os.close(w)
            answer = read_message(sock)
            print("replied", answer.get("error", {}).get("code", "ok"), flush=True)
            sys.stdin.read()
    elif mode == "silent":
        with connect(path, timeout=None) as sock:
            answer = read_message(sock)
            print("closed", answer.get("error", {}).get("code", "-"), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
