"""The push queue's worker: a child process of amberd at idle CPU and I/O priority.

It was a thread of amberd's first. A thread at ``SCHED_IDLE`` that the
kernel preempts while it holds the GIL stalls amberd's loop until it runs
again, which on a busy machine is whenever nothing else wants the CPU: a
priority inversion (``amber status`` 13% slower during a push with three
CPU hogs). A process has its own GIL.

What it may do is narrow: it reads the store (never writes it), the
signing key and amberd's registry logins, and talks to registries. Its
only input is the socketpair amberd made (``pushproc.py``): amberd's own
jobs, built from amberd's database, never a user's bytes. It dies with
amberd (``PR_SET_PDEATHSIG``), gains no privilege by exec
(``PR_SET_NO_NEW_PRIVS``), runs as ``nobody`` with of root's capabilities
only reading files (``CAP_DAC_READ_SEARCH``: the store, the key, the
logins), and runs one job at a time, answering each with its result or
the class of its error.

Run as ``python -I -m amber.daemon.remote.pusher FD PARENT_PID``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amber.daemon.oci.auth import credentials_for
from amber.daemon.oci.errors import RegistryRefused
from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OciError
from amber.daemon.remote import pins, pull, push
from amber.daemon.remote.config import Remote
from amber.daemon.remote.credentials import load_auth_file
from amber.daemon.remote.idle import make_idle, name_thread
from amber.daemon.remote.layout import LayoutError
from amber.daemon.remote.trust import load_signing_key
from amber.daemon.storage.db import Result
from amber.sandbox.store import Store, StoreError

log = logging.getLogger("amber.remote")
NAME = "amber-push"
#: A job or an answer, at most (a job is a result record and a few URLs).
MAX_MESSAGE = 64 * 1024
#: An error's text in an answer, at most: a registry writes what it likes in its errors.
MAX_ERROR_TEXT = 2000


class NoResult(LookupError):
    """The job names what is not there (no signing key, a result no longer recorded)."""


#: The errors a job may end with, most specific first: amberd raises the same class again.
#: Only these: any other (a KeyError of a bug here) goes back as "os", a failed attempt.
ERRORS: tuple[tuple[str, type[Exception]], ...] = (
    ("refused", RegistryRefused),
    ("layout", LayoutError),
    ("miss", pull.Miss),
    ("lookup", NoResult),
    ("oci", OciError),
    ("store", StoreError),
    ("os", OSError),
)
_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
#: Who it runs as: not root, so that it owns no root file, writes no /proc/sys, and is
#: not uid 0 to amberd's socket or to the processes of amberd it could signal.
NOBODY = 65534
_CAP_DAC_READ_SEARCH = 2  # read any file: the store's, whoever's they were; the key
_CAP_LAST = 63
_CAPS_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


@dataclass
class Setup:
    """What amberd tells its pusher once, at start: where things are."""

    state_dir: str
    signing_key: str | None  # None: it tags pins, pushes nothing
    auth_file: str | None
    version: str


class Worker:
    """Does one job at a time: a queued push, or a pin's tag (pins.py)."""

    def __init__(self, setup: Setup):
        self.store = Store(setup.state_dir)  # not Store.open: nothing here creates or writes
        self.key = load_signing_key(Path(setup.signing_key)) if setup.signing_key else None
        self.credentials = load_auth_file(Path(setup.auth_file) if setup.auth_file else None)
        self.version = setup.version

    def client(self, url: str, timeout: float) -> RegistryClient:
        remote = Remote(url)
        return RegistryClient(remote.registry, insecure=remote.insecure, timeout=timeout,
                              credentials=credentials_for(self.credentials, remote.registry))  # fmt: skip

    def answer(self, job: dict[str, Any]) -> dict[str, Any]:
        """``{"ok": value}``, or ``{"error": kind, "message": ...}`` with a kind of ``ERRORS``."""
        try:
            if job.get("op") == "push":
                return {"ok": self.push(job["url"], Result(**job["result"]), job["mount_from"])}
            if job.get("op") == "pin":
                return {"ok": self.pin(job["row"], job["result"])}
            raise NoResult(f"no such job: {job.get('op')!r}")
        except Exception as exc:
            kind = _kind(exc)
            if kind is None:
                log.exception("pusher: a job failed")
                kind = "os"  # a bug here: retried, as the registry being down would be
            return {"error": kind, "message": str(exc)[:MAX_ERROR_TEXT]}

    def push(self, url: str, result: Result, mount_from: list[str]) -> int:
        if self.key is None:
            raise NoResult("this amberd has no signing key")
        client = self.client(url, timeout=60)
        try:
            repo = Remote(url).repository
            return push.push_result(self.store, client, repo, result, self.key, self.version,
                                    mount_from=mount_from)  # fmt: skip
        finally:
            client.close()

    def pin(self, row: dict[str, Any], result: dict | None) -> str:
        client = self.client(row["url"], timeout=30)
        try:
            repo = Remote(row["url"]).repository
            if row["state"] == "untag":
                return pins.untag(client, repo, row["tag"], row["digest"])
            if result is None:
                raise NoResult("its result is no longer recorded here")
            return pins.tag_result(client, repo, Result(**result), row["tag"])
        finally:
            client.close()


def _kind(exc: Exception) -> str | None:
    """``exc``'s name in ``ERRORS``: pins.py's LookupErrors are a missing result too."""
    if type(exc) is LookupError:
        return "lookup"
    return next((k for k, cls in ERRORS if isinstance(exc, cls)), None)


def _lower(parent: int) -> None:
    """Die with amberd, gain nothing by exec, and go last in line for the CPU and disk."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # amberd died before the line above
        raise SystemExit(1)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SystemExit("pusher: PR_SET_NO_NEW_PRIVS failed")
    try:  # threads started later inherit all three
        make_idle(threading.get_native_id())
    except OSError as exc:  # a kernel or container without it: still a process apart
        log.warning("%s: cannot lower its priority: %s", NAME, exc)
    _keep_only_reading(libc)
    # Again: a change of the effective uid clears the parent-death signal (prctl(2)).
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(1)
    name_thread(NAME)  # named once lowered: who finds it by name finds it idle


def _keep_only_reading(libc: ctypes.CDLL) -> None:
    """Every capability gone but reading files, as ``nobody``: it writes no file that is
    not world-writable, signals only ``nobody``'s processes, mounts or traces nothing, and
    an exec gains nothing back."""
    for cap in range(_CAP_LAST + 1):
        if cap == _CAP_DAC_READ_SEARCH or libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
            continue
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: past this kernel's last one
            raise SystemExit(f"pusher: cannot drop capability {cap}")
    if libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:  # permitted kept across setresuid
        raise SystemExit("pusher: PR_SET_KEEPCAPS failed")
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << _CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(_CapHeader(_CAPS_V3, 0)), data) != 0:
        raise SystemExit(f"pusher: capset: {os.strerror(ctypes.get_errno())}")


def serve(sock: socket.socket) -> int:
    """Answer amberd's jobs until it closes the socket."""
    setup = Setup(**json.loads(sock.recv(MAX_MESSAGE)))
    worker = Worker(setup)
    while data := sock.recv(MAX_MESSAGE):
        sock.send(json.dumps(worker.answer(json.loads(data))).encode())
    return 0


def main(argv: list[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    _lower(parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s amber-push: %(message)s")
    with socket.socket(fileno=fd) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
