"""Finding amberd, and starting one when root runs ``amber`` with none listening.

The quick start is one command: on a machine without a system daemon, root's
first ``amber build`` starts ``amberd`` in the background on the default
socket. Anything explicit (``--socket``, ``AMBER_SOCKET``) means the user
manages that daemon, so it is never started behind their back; neither is
one for a non-root user, who could not run builds with it anyway: they use
the system daemon, like docker's and podman's clients, and when it cannot be
reached they are told what they can do about it.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from .connection import SYSTEM_SOCKET, Connection, default_socket_path, system_socket_path
from .errors import DaemonUnreachable

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Mapping, Sequence

GROUP = "amber"  # the group scripts/install-systemd gives the socket
LOG_PATH = "/var/log/amber/amberd.log"
START_WAIT = 15.0  # a first start imports the host base into the store
RESTART_GRACE = 2.0  # a socket file nobody accepts on: maybe a daemon restarting


def socket_path(
    explicit: str | None, environ: Mapping[str, str] | None = None, euid: int | None = None
) -> str:
    """``--socket``, else ``$AMBER_SOCKET``, else the system daemon's (see ``default_socket_path``)."""
    return explicit or default_socket_path(environ, euid)


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
    path = socket_path(explicit, environ, euid)
    # A present socket file that refuses may be a daemon restarting; a missing
    # one fails at once, so `amber ps` with no daemon does not hang.
    grace = RESTART_GRACE if os.path.exists(path) else 0.0
    try:
        return Connection.open(path, timeout, retry_for=grace)
    except DaemonUnreachable as exc:
        if not may_autostart(explicit, environ, euid):
            hint = unreachable_hint(exc, explicit=explicit, environ=environ, euid=euid)
            raise DaemonUnreachable(
                f"{exc.message}\n{hint}", path=exc.path, errno=exc.errno
            ) from None
    argv = list(daemon_argv or autostart_argv(path))
    proc = start_daemon(argv, log_path)
    (say or _say)(f"amber: no amberd was running; started one (pid {proc.pid}, log {log_path})")
    return wait_for_daemon(proc, path, timeout, log_path)


def autostart_argv(path: str) -> list[str]:
    """amberd's command line for serving on ``path``, the default socket for root."""
    argv = [sys.executable, "-m", "amber.daemon.main"]
    if path != SYSTEM_SOCKET:  # AMBER_SYSTEM_SOCKET moved it: the daemon must follow
        argv += ["--socket", path]
    return argv


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
                    f"amberd exited with status {code} as it started to serve {path}; "
                    f"see {log_path}"
                ) from None
        if time.monotonic() >= deadline:
            raise DaemonUnreachable(
                f"started amberd (pid {proc.pid}) but it did not answer on {path} "
                f"within {wait:.0f} s; see {log_path}"
            )


def unreachable_hint(
    exc: DaemonUnreachable,
    *,
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
    euid: int | None = None,
) -> str:
    """What this user can do about a socket nobody answered on, one indented line each.

    The advice depends on how connecting failed (``exc.errno``), on whose
    socket it was (one the user named, or the system daemon's) and on who
    asks: root can start a daemon, other users can ask for one or for the
    group that may use it.
    """
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    path = exc.path or ""
    named = explicit or env.get("AMBER_SOCKET")
    lines: list[str] = []
    if exc.errno in (errno.EACCES, errno.EPERM):
        lines += _permission_hint(path, uid)
    elif named:
        source = "--socket" if explicit else "AMBER_SOCKET"
        lines.append(f"that socket comes from {source}: check the path, or that amberd runs there")
        if uid == 0:
            lines.append(f"start one there with `amberd --socket {path}`")
        lines.append(f"without {source}, amber uses the system daemon's {system_socket_path(env)}")
    else:
        if exc.errno == errno.ECONNREFUSED:
            lines.append("the socket file is there but nothing accepts on it: amberd stopped")
        elif exc.errno == errno.ENOENT:
            lines.append("the system daemon is not running (no socket there)")
        if uid == 0:
            lines.append("start one with `amberd` (or `amber daemon`) and leave it running,")
            lines.append("or start the system daemon: `systemctl start amberd.socket`")
            if env.get("AMBER_NO_AUTOSTART"):
                lines.append("(AMBER_NO_AUTOSTART is set, so amber did not start one itself)")
        else:
            lines.append(
                "ask an administrator to start it: `systemctl start amberd.socket` "
                "(units from scripts/install-systemd)"
            )
            group = _socket_group(path)
            if not _in_session_group(group):
                lines.append(f"its users are root and group {group}: {_join_advice(group, uid)}")
        lines.append("or point amber at a running amberd with AMBER_SOCKET=PATH or --socket PATH")
    return "\n".join("  " + line for line in lines)


def _permission_hint(path: str, uid: int) -> list[str]:
    """Connecting was refused by the socket's (or its directory's) permissions."""
    group = _socket_group(path)
    if uid == 0:
        return [f"even root may not connect to {path}: check its permissions"]
    if _in_session_group(group):
        return [
            f"you are in group {group} but may still not connect: "
            "ask an administrator to check the socket's mode (0660, group amber)"
        ]
    if _member_of(group, uid):
        return [
            f"you were added to group {group} after this session began: "
            f"log in again (or run `newgrp {group}`)"
        ]
    return [
        f"you are not in group {group}, whose members may use amberd: {_join_advice(group, uid)}"
    ]


def _join_advice(group: str, uid: int) -> str:
    return f"ask an administrator for `usermod -aG {group} {_user_name(uid)}`, then log in again"


def _socket_group(path: str) -> str:
    """The group of the socket, or of the nearest directory above it we may see."""
    import grp

    here = path
    while here:
        try:
            gid = os.stat(here).st_gid
        except OSError:
            parent = os.path.dirname(here)
            if parent == here:
                break
            here = parent
            continue
        if gid == 0:
            break  # root's group says nothing about who may connect
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return GROUP


def _in_session_group(group: str) -> bool:
    """Whether this process already has ``group`` (a new membership needs a new login)."""
    gid = _gid_of(group)
    return gid is not None and (gid in os.getgroups() or gid == os.getegid())


def _member_of(group: str, uid: int) -> bool:
    """Whether the group database lists the user in ``group``."""
    import grp
    import pwd

    try:
        entry = grp.getgrnam(group)
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user.pw_name in entry.gr_mem or user.pw_gid == entry.gr_gid


def _gid_of(group: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return int(group) if group.isdigit() else None


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "USER"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
