"""Finding amberd, and starting one when root runs ``amber`` with none listening.

The quick start is one command: on a machine without a system daemon, root's
first ``amber build`` starts ``amberd`` in the background on the default
socket. Anything explicit (``--socket``, ``AMBER_SOCKET``) means the user
manages that daemon, so it is never started behind their back; neither is
one for a non-root user, who could not run builds with it anyway.
"""

from __future__ import annotations

import os
import sys
import time

from .connection import Connection, default_socket_path
from .errors import DaemonUnreachable

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Mapping, Sequence

LOG_PATH = "/var/log/amber/amberd.log"
START_WAIT = 15.0  # a first start imports the host base into the store
RESTART_GRACE = 2.0  # a socket file nobody accepts on: maybe a daemon restarting


def socket_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``--socket``, else ``$AMBER_SOCKET``, else the default for this user."""
    return explicit or default_socket_path(environ)


def may_autostart(
    explicit: str | None, environ: Mapping[str, str] | None = None, euid: int | None = None
) -> bool:
    """Whether amber may start a daemon itself: default socket, root, not disabled."""
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    return (
        explicit is None
        and not env.get("AMBER_SOCKET")
        and uid == 0
        and not env.get("AMBER_NO_AUTOSTART")
    )


def open_connection(
    explicit: str | None,
    *,
    timeout: float | None,
    environ: Mapping[str, str] | None = None,
    euid: int | None = None,
    say: Callable[[str], None] | None = None,
    daemon_argv: Sequence[str] | None = None,
    log_path: str = LOG_PATH,
) -> Connection:
    """Connect to amberd, starting it first if allowed (see ``may_autostart``).

    Raises:
        DaemonUnreachable: with a message that says how to start a daemon.
    """
    path = socket_path(explicit, environ)
    # A present socket file that refuses may be a daemon restarting; a missing
    # one fails at once, so `amber ps` with no daemon does not hang.
    grace = RESTART_GRACE if os.path.exists(path) else 0.0
    try:
        return Connection.open(path, timeout, retry_for=grace)
    except DaemonUnreachable as exc:
        if not may_autostart(explicit, environ, euid):
            raise DaemonUnreachable(
                f"{exc.message}\n{unreachable_hint(exc.message, environ, euid)}"
            ) from None
    argv = list(daemon_argv or [sys.executable, "-m", "amber.daemon.main"])
    proc = start_daemon(argv, log_path)
    (say or _say)(f"amber: no amberd was running; started one (pid {proc.pid}, log {log_path})")
    return wait_for_daemon(proc, path, timeout, log_path)


def start_daemon(argv: Sequence[str], log_path: str) -> subprocess.Popen[bytes]:
    """Start amberd detached from this terminal: own session, output appended to ``log_path``.

    Raises:
        DaemonUnreachable: the log directory or the daemon could not be created.
    """
    import subprocess  # ~10 ms; only this rare path needs it

    try:
        os.makedirs(os.path.dirname(log_path), mode=0o755, exist_ok=True)
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in this terminal must not reach it
                cwd="/",  # and it must not keep the user's directory busy
            )
    except OSError as exc:
        raise DaemonUnreachable(f"could not start amberd: {exc}") from None


def wait_for_daemon(
    proc: subprocess.Popen[bytes],
    path: str,
    timeout: float | None,
    log_path: str,
    wait: float = START_WAIT,
) -> Connection:
    """Connect once the daemon just started listens; give up early if it died.

    A daemon that exits may have lost a race with another amber starting one
    at the same moment, so one last attempt follows its exit.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            return Connection.open(path, timeout, retry_for=0.25)
        except DaemonUnreachable:
            pass
        code = proc.poll()
        if code is not None:
            try:
                return Connection.open(path, timeout)
            except DaemonUnreachable:
                raise DaemonUnreachable(
                    f"amberd exited with status {code} as it started; see {log_path}"
                ) from None
        if time.monotonic() >= deadline:
            raise DaemonUnreachable(
                f"started amberd (pid {proc.pid}) but it did not answer on {path} "
                f"within {wait:.0f} s; see {log_path}"
            )


def unreachable_hint(
    message: str, environ: Mapping[str, str] | None = None, euid: int | None = None
) -> str:
    """How to get a daemon, given why the connection failed."""
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    if "ermission denied" in message:
        return "amberd's socket is for root and the amber group: add yourself with `usermod -aG amber USER`"
    hint = (
        "start one with `amberd` (or `amber daemon`) and leave it running, "
        "or point amber at a running one with --socket PATH or AMBER_SOCKET"
    )
    if uid == 0 and env.get("AMBER_NO_AUTOSTART"):
        hint += " (AMBER_NO_AUTOSTART is set, so amber did not start one itself)"
    return hint


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
