"""A step's own network namespace, connected to the host's network by pasta.

A step with ``network = true`` gets a network namespace of its own like
every other step, not the host's: abstract unix sockets (D-Bus, X11, ...)
are per network namespace, and the host's would otherwise be reachable
from any step. pasta (Debian package ``passt``) gives the namespace
user-mode networking: a tap interface with the host's addresses and routes,
whose TCP, UDP and ICMP traffic pasta replays through ordinary sockets of
the host. So DNS and outgoing connections work as on the host; the host's
loopback is reached at the gateway address (pasta's ``map-gw``), not at
127.0.0.1, which is the namespace's own. No port of the namespace is
forwarded to the host, nor any of the host's into the namespace.

How pasta reaches the namespace
    The namespace is made by ``unshare --net`` before bwrap starts, so it
    belongs to the host's user namespace: root inside the step has no
    CAP_NET_ADMIN over it (no routes, no netfilter of its own), and bwrap
    does not configure it (its loopback set-up would clash with pasta's).
    Opening another uid's ``/proc/PID/ns/net`` needs CAP_SYS_PTRACE, which
    amberd's unit takes away, so the daemon opens bwrap's with bwrap's own
    uid as filesystem uid (same ids, same user namespace: no capability
    needed). pasta, run as root because ``/dev/net/tun`` may be root's only
    and the namespace is the host user namespace's (so amberd keeps
    CAP_NET_ADMIN, and its unit allows the tun device), joins the namespace
    through that descriptor (``--netns /proc/self/fd/N``). Before it handles
    traffic it drops every capability but CAP_SYS_ADMIN and
    CAP_NET_BIND_SERVICE, pivots into an empty mount namespace and confines
    itself with its own seccomp filter; as a non-root uid it could not
    enter the namespace at all.

pasta writes its pid file once the namespace's interface is configured: a
pipe as pid file tells the daemon when the step may start. pasta does not
notice the namespace ending; the sandbox kills it once its processes are
gone (and a keeper, `_keeper`, if the daemon dies), and with pasta the last
reference to the namespace goes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from contextlib import suppress

import trio

from .fsidentity import filesystem_identity
from .sandboxerror import SandboxError

__all__ = ["Pasta", "check_pasta", "has_default_route", "open_netns", "start_pasta"]

# No port forwarding either way.
_OPTIONS = ("--runas", "0", "--foreground", "--quiet", "--config-net")
_OPTIONS += ("-t", "none", "-u", "none", "-T", "none", "-U", "none")


def check_pasta() -> str:
    """The path of pasta, or a clear error for a step that wants the network."""
    path = shutil.which("pasta")
    if path is None:
        raise SandboxError(
            "tool-missing",
            "a step with network = true needs pasta, which is not installed "
            "(Debian package passt); steps never share the host's network namespace",
        )
    return path


def has_default_route() -> bool:
    """Whether the host has a way out (an IPv4 or IPv6 default route).

    pasta copies the host's default route and will not start without one: on
    an offline host a network = true step gets what the host has, a loopback.
    """
    try:
        with open("/proc/net/route") as f:
            if any(line.split()[1:2] == ["00000000"] for line in f.readlines()[1:]):
                return True
        with open("/proc/net/ipv6_route") as f:
            for line in f:
                fields = line.split()
                if fields[:2] == ["0" * 32, "00"] and fields[9:] != ["lo"]:
                    return True
    except OSError:
        pass
    return False


def open_netns(pid: int, uid: int, gid: int) -> int:
    """A descriptor of process ``pid``'s network namespace; the process runs
    as host ``uid``/``gid``, as whom the file is opened (see the module notes)."""
    try:
        with filesystem_identity(uid, gid):
            return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(
            "setup-failed", f"cannot open the step's network namespace: {exc}"
        ) from exc


class Pasta:
    """A running pasta serving one sandbox's network namespace, under its
    keeper (see `start_pasta`)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._init: int | None = None  # pidfd of the keeper's pid namespace's init

    def watch_init(self) -> None:
        """Hold the pid namespace's init, whose end is the end of pasta."""
        path = f"/proc/{self._popen.pid}/task/{self._popen.pid}/children"
        try:
            with open(path) as f:
                self._init = os.pidfd_open(int(f.read().split()[0]))
        except (OSError, ValueError, IndexError) as exc:
            raise SandboxError("setup-failed", f"cannot watch pasta: {exc}") from exc

    async def stop(self) -> None:
        """Kill pasta and return once it is gone, and with it the namespace."""
        with suppress(ProcessLookupError):
            if self._init is not None:
                signal.pidfd_send_signal(self._init, signal.SIGKILL)
            self._popen.send_signal(signal.SIGKILL)
        if self._init is not None:
            # An init exits only after every process of its namespace.
            await trio.lowlevel.wait_readable(self._init)
            trio.lowlevel.notify_closing(self._init)
            os.close(self._init)
            self._init = None
        self._popen.wait()  # the keeper exits as its child does


def _keeper(pasta_argv: list[str]) -> list[str]:
    """pasta in a pid namespace of its own, whose init (a shell waiting for
    it) is killed when its parent dies, and that parent when the daemon dies.

    pasta clears its own parent-death signal (it re-executes itself as root),
    so it cannot be tied to the daemon directly: without this a daemon that
    crashed would leave pasta, and the network namespace it holds, behind.
    """
    tools = [shutil.which(name) for name in ("setpriv", "unshare", "sh")]
    if None in tools:
        raise SandboxError("tool-missing", "setpriv, unshare and sh are needed to run pasta")
    setpriv, unshare, sh = tools
    assert setpriv and unshare and sh
    return [setpriv, "--pdeathsig", "KILL", "--", unshare, "--pid", "--fork",
            "--kill-child=KILL", "--", sh, "-c", '"$@" & wait', "sh", *pasta_argv]  # fmt: skip


async def start_pasta(netns_fd: int) -> Pasta:
    """Start pasta on the namespace ``netns_fd`` names; return once it is configured.

    Takes ownership of ``netns_fd``.
    """
    ready_r, ready_w = os.pipe()
    pasta_argv = [check_pasta(), *_OPTIONS, "--pid", f"/dev/fd/{ready_w}"]
    pasta_argv += ["--netns", f"/proc/self/fd/{netns_fd}"]
    try:
        popen = subprocess.Popen(
            _keeper(pasta_argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # a pipe nobody reads would stall it
            pass_fds=(ready_w, netns_fd),
            cwd="/",
        )
    except OSError as exc:
        os.close(ready_r)
        raise SandboxError("tool-missing", f"cannot start pasta: {exc}") from exc
    finally:
        for fd in (ready_w, netns_fd):
            os.close(fd)
    pasta = Pasta(popen)
    try:
        # The pid file, once the namespace is configured; EOF if pasta failed.
        async with trio.lowlevel.FdStream(ready_r) as stream:
            ready = await stream.receive_some(64)
        if not ready:
            raise SandboxError("setup-failed", "pasta could not connect the step to the network")
        pasta.watch_init()
    except BaseException:
        with trio.CancelScope(shield=True):
            await pasta.stop()
        raise
    return pasta
