"""The helper process of ``asuser``: the user for real, opening what the daemon asks.

Run by ``asuser`` as ``python3 -I -S -c <this file's text> FD [root] [hold]`` after
``subprocess`` has made it the user (setgroups, setresgid, setresuid before
exec), so it imports nothing but the standard library and needs no file of
amber's to be readable by the user. It makes sure it has no capability left
and cannot gain one (``PR_SET_NO_NEW_PRIVS``), then serves requests on the
SOCK_SEQPACKET descriptor FD, one JSON message each:

- ``{"op": "open", "paths": [[path, follow, allow_dir], ...]}``: one reply
  with a result per path (``{"ok": 1}`` or ``{"errno": N}``) and the opened
  descriptors, in order, as SCM_RIGHTS;
- ``{"op": "walk", "path": path, "follow": bool}``: the directory's whole
  tree, depth first in byte order of names, in batches of records with the
  regular files' descriptors; the daemon answers each batch with ``b"n"``
  (so at most one batch of descriptors is ever in flight).

Everything it sends is the user's word: the daemon checks each descriptor
it receives (``fstat``) and parses each message with bounds.
"""

import array
import ctypes
import os
import stat
import sys
from _socket import SCM_RIGHTS, SOL_SOCKET
from _socket import socket as Socket

try:  # json's C half alone: json itself imports re, which made a third of the start-up
    import _json

    def _refuse(obj: object) -> None:
        raise TypeError(f"{type(obj).__name__} is not JSON")

    class _Decoding:
        """What ``_json``'s scanner reads off a ``json.JSONDecoder``: its defaults."""

        strict = True
        object_hook = object_pairs_hook = None
        parse_float, parse_int = float, int
        parse_constant = {"-Infinity": -float("inf"), "Infinity": float("inf"),
                          "NaN": float("nan")}.__getitem__  # fmt: skip

    _encode = _json.make_encoder(None, _refuse, _json.encode_basestring_ascii, None, ": ", ", ",
                                 False, False, True)  # fmt: skip
    _scan = _json.make_scanner(_Decoding())

    def dumps(obj: object) -> str:
        """``json.dumps(obj)``, byte for byte."""
        return "".join(_encode(obj, 0))

    def loads(data: bytes) -> object:
        """``json.loads(data)`` of what the daemon sends (one value, no padding)."""
        text = data.decode()
        obj, end = _scan(text, 0)
        if end != len(text):
            raise ValueError("not one JSON value")
        return obj
except (
    ImportError,
    AttributeError,
    TypeError,
):  # a Python without it (or another _json): the same bytes, a slower start
    from json import dumps, loads

MAX_FDS = 64  # descriptors per message
MAX_BYTES = 96 * 1024  # records per message, roughly, in JSON bytes
MAX_DEPTH = 400
_OPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


class WrongKind(Exception):
    """Opened, but neither a regular file nor an allowed directory: its mode."""


class Refused(Exception):
    """A path of the walk that cannot be read: its errno and where."""

    def __init__(self, err: int, where: str):
        super().__init__(err, where)
        self.err = err
        self.where = where


def drop_everything(root: bool) -> None:
    """No new privileges, death with the daemon, and proof that no capability is
    left (unless it serves root, who reads as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SystemExit("PR_SET_NO_NEW_PRIVS failed")
    libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if root:
        return
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    for name in ("CapEff", "CapPrm", "CapAmb"):
        if int(caps.get(name, "1"), 16) != 0:
            raise SystemExit(f"the helper still has capabilities ({name} {caps.get(name)})")
    if 0 in os.getresuid() or 0 in os.getresgid():
        raise SystemExit("the helper is still root")


def send(sock: Socket, message: dict, fds: list) -> None:
    sock.sendmsg([dumps(message).encode()], [(SOL_SOCKET, SCM_RIGHTS, array.array("i", fds))])
    for fd in fds:
        os.close(fd)


def open_one(path: str, follow: bool, allow_dir: bool) -> int:
    fd = os.open(path, _OPEN if follow else _OPEN | os.O_NOFOLLOW)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or (allow_dir and stat.S_ISDIR(mode))):
        os.close(fd)
        raise WrongKind(mode)
    return fd


def serve_open(sock: Socket, paths: list) -> None:
    results, fds = [], []
    for path, follow, allow_dir in paths[:MAX_FDS]:
        try:
            fds.append(open_one(path, follow, allow_dir))
            results.append({"ok": 1})
        except WrongKind as exc:
            results.append({"mode": exc.args[0]})
        except OSError as exc:
            results.append({"errno": exc.errno or 0})
    send(sock, {"results": results}, fds)


class Walk:
    """The depth-first walk of one directory, batched to the daemon."""

    def __init__(self, sock: Socket):
        self.sock = sock
        self.records: list = []
        self.fds: list = []
        self.size = 0

    def add(self, record: list, fd: int | None = None) -> None:
        self.records.append(record)
        self.size += len(dumps(record))
        if fd is not None:
            self.fds.append(fd)
        if len(self.fds) >= MAX_FDS or self.size >= MAX_BYTES:
            self.flush(more=True)

    def flush(self, *, more: bool) -> None:
        send(self.sock, {"records": self.records, "more": more}, self.fds)
        self.records, self.fds, self.size = [], [], 0
        if more and self.sock.recv(1) != b"n":
            raise SystemExit(0)  # the daemon gave up

    def directory(self, dfd: int, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Refused(40, where)  # ELOOP: deeper than any tree amber takes
        with os.scandir(dfd) as it:
            names = sorted((e.name for e in it), key=os.fsencode)
        for name in names:
            path = f"{where}/{name}" if where else name
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the listing
            except OSError as exc:
                raise Refused(exc.errno or 0, path) from None
            xattrs = self.xattrs(dfd, name)
            meta = [st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, st.st_rdev]
            if stat.S_ISDIR(st.st_mode):
                child = self.open_at(dfd, name, path, os.O_DIRECTORY)
                try:
                    self.add(["d", name, meta, xattrs])
                    self.directory(child, path, depth + 1)
                finally:
                    os.close(child)
                self.add(["u"])
            elif stat.S_ISREG(st.st_mode):
                self.add(["f", name, meta, xattrs], self.open_at(dfd, name, path, 0))
            elif stat.S_ISLNK(st.st_mode):
                self.add(["l", name, meta, xattrs, os.readlink(name, dir_fd=dfd)])
            else:
                self.add(["o", name, meta, xattrs])

    @staticmethod
    def open_at(dfd: int, name: str, path: str, flags: int) -> int:
        try:
            return os.open(name, _OPEN | os.O_NOFOLLOW | flags, dir_fd=dfd)
        except OSError as exc:
            raise Refused(exc.errno or 0, path) from None

    @staticmethod
    def xattrs(dfd: int, name: str) -> list:
        where = f"/proc/self/fd/{dfd}/{name}"
        try:
            names = os.listxattr(where, follow_symlinks=False)
        except OSError:
            return []
        out = []
        for key in names:
            try:
                out.append([key, os.getxattr(where, key, follow_symlinks=False).hex()])
            except OSError:
                continue
        return out


def serve_walk(sock: Socket, path: str, follow: bool) -> None:
    walk = Walk(sock)
    try:
        top = os.open(path, _OPEN | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        send(sock, {"errno": exc.errno or 0, "where": ""}, [])
        return
    try:
        walk.directory(top, "", 0)
    except Refused as exc:
        send(sock, {"errno": exc.err, "where": exc.where}, [])
        return
    finally:
        os.close(top)
    walk.flush(more=False)


def main() -> None:
    sock = Socket(fileno=int(sys.argv[1]))
    drop_everything("root" in sys.argv[2:])
    if "hold" in sys.argv[2:]:  # a test's: as the user stopping their new helper may
        import signal  # here: the module's start-up stays small (see above)

        os.kill(os.getpid(), signal.SIGSTOP)
    send(sock, {"ready": [os.getuid(), os.getgid(), sorted(os.getgroups())]}, [])
    while data := sock.recv(1 << 16):
        request = loads(data)
        if request.get("op") == "open":
            serve_open(sock, request["paths"])
        elif request.get("op") == "walk":
            serve_walk(sock, request["path"], bool(request.get("follow")))
        else:
            raise SystemExit(f"unknown request {request.get('op')!r}")


if __name__ == "__main__":
    main()
