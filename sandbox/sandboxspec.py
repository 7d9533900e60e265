"""What one sandbox is (who runs in it, what it sees) and the bwrap command line
that makes it."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .sandboxerror import SandboxError
from .userns import IdMap

__all__ = [
    "BUILD_GID",
    "BUILD_UID",
    "DEFAULT_PATH",
    "HOMES",
    "Bind",
    "SandboxSpec",
    "User",
    "host_ids",
    "launch_argv",
    "make_spec",
    "sandbox_environment",
]

User = Literal["build", "root"]

BUILD_UID = 1000
BUILD_GID = 1000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The build user's home is the private /tmp: dotfiles and caches written there
# stay out of the snapshot, and no /etc/passwd entry is needed.
HOMES: Mapping[str, str] = {"root": "/root", "build": "/tmp"}
HOSTNAME = "amber"
# Root inside a step gets Docker's default set, namespaced: enough to install
# packages and chown, without CAP_SYS_ADMIN's kernel surface (mounts, more
# namespaces). The build user gets none.
ROOT_CAPS = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)


@dataclass(frozen=True)
class Bind:
    """A host path shown inside the sandbox (read-only unless ``writable``)."""

    source: Path
    dest: str
    writable: bool = False


@dataclass(frozen=True)
class SandboxSpec:
    """Everything bwrap needs to know about one sandbox."""

    root: Path
    command: tuple[str, ...]
    cwd: str
    user: User
    network: bool
    new_session: bool
    controlling_tty: bool
    private_tmp: bool
    binds: tuple[Bind, ...]


def make_spec(
    root: Path,
    command: tuple[str, ...],
    *,
    cwd: str,
    user: User,
    network: bool,
    new_session: bool,
    private_tmp: bool,
    binds: Sequence[Bind],
) -> SandboxSpec:
    """Check the caller's arguments and bundle them."""
    if user not in HOMES:
        raise ValueError(f"user must be 'build' or 'root', not {user!r}")
    if not cwd.startswith("/"):
        raise ValueError(f"cwd must be absolute: {cwd!r}")
    for bind in binds:
        if not bind.dest.startswith("/"):
            raise ValueError(f"bind destination must be absolute: {bind.dest!r}")
    return SandboxSpec(
        root=Path(root),
        command=command,
        cwd=cwd,
        user=user,
        network=network,
        new_session=new_session,
        controlling_tty=not new_session,
        private_tmp=private_tmp,
        binds=tuple(binds),
    )


def sandbox_environment(user: User, env: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a sandboxed command: nothing of the host's."""
    result = {"PATH": DEFAULT_PATH, "HOME": HOMES[user], "TMPDIR": "/tmp"}
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"not a valid environment variable: {name!r}")
        result[name] = value
    return result


def _tool(name: str) -> str:
    """The absolute path of a host program the sandbox needs."""
    path = shutil.which(name)
    if path is None:
        raise SandboxError("tool-missing", f"{name} is not installed (looked in PATH)")
    return path


def host_ids(spec: SandboxSpec, id_map: IdMap) -> tuple[int, int]:
    """The host uid and gid bwrap runs as: its user namespace's owner."""
    uid, gid = (0, 0) if spec.user == "root" else (BUILD_UID, BUILD_GID)
    return id_map.host_id(uid), id_map.host_id(gid)


def launch_argv(
    spec: SandboxSpec,
    id_map: IdMap,
    *,
    info_fd: int,
    block_fd: int,
    status_fd: int,
    seccomp_fd: int | None = None,
) -> list[str]:
    """The command line that starts bwrap as the sandbox user's host uid."""
    uid, gid = host_ids(spec, id_map)
    # A network = true step's namespace, the host's user namespace's (pasta.py).
    argv = [_tool("unshare"), "--net", "--"] if spec.network else []
    argv += [
        _tool("setpriv"),
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--",
    ]
    if spec.controlling_tty:
        # setsid(2), then TIOCSCTTY on stdin: the pty becomes the session's
        # controlling terminal, and bwrap runs without --new-session.
        argv += [_tool("setsid"), "--ctty", "--wait", "--"]
    argv.append(_tool("bwrap"))
    argv += _bwrap_options(spec, info_fd=info_fd, block_fd=block_fd, status_fd=status_fd)
    if seccomp_fd is not None:  # no nested user namespaces (seccomp.py)
        argv += ["--seccomp", str(seccomp_fd)]
    return [*argv, "--", *spec.command]


def _bwrap_options(spec: SandboxSpec, *, info_fd: int, block_fd: int, status_fd: int) -> list[str]:
    """bwrap's options for ``spec``, with the fds of the start-up handshake."""
    options = ["--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-uts"]
    options += ["--unshare-cgroup-try"]
    if not spec.network:
        options.append("--unshare-net")
    options += ["--userns-block-fd", str(block_fd), "--info-fd", str(info_fd)]
    options += ["--json-status-fd", str(status_fd), "--die-with-parent"]
    if spec.new_session:
        options.append("--new-session")  # no controlling terminal, so no TIOCSTI
    options += ["--hostname", HOSTNAME, "--bind", str(spec.root), "/"]
    options += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
    if spec.private_tmp:
        options += ["--perms", "1777", "--tmpfs", "/tmp"]
    for bind in spec.binds:
        options += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.dest]
    options += ["--chdir", spec.cwd]
    if spec.user == "root":
        for cap in ROOT_CAPS:
            options += ["--cap-add", cap]
    else:
        options += ["--cap-drop", "ALL"]
    return options
