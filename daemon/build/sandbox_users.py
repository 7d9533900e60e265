"""The sandbox's /etc/passwd and /etc/group on the ``host`` base.

The host base binds the host's /etc, whose passwd names uid 1000 after
whoever the host gave it to (or nobody): ``id -un`` in a step printed the
host's name, and a prompt in ``amber shell`` showed it. The sandbox's own
users are root (0) and build (1000), so the host base gets generated files
bound over /etc/passwd and /etc/group: root and build first, then the host's
other entries (system users and groups that files under /usr and /etc refer
to), minus whatever held uid/gid 0 or 1000 or the names root and build.

Other bases keep their own files: a root filesystem's /etc/passwd is part
of the tree the build owns (a root step may add users to it, and that change
belongs in the snapshot), so amber leaves it as the image made it.

The files live in ``STATE/sandbox-etc``: bwrap binds them as the sandbox's
host uid, which can reach the state directory (the preflight makes sure),
and they are rewritten only when the host's files change.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from amber.sandbox.sandboxspec import BUILD_GID, BUILD_UID, HOMES

DIRECTORY = "sandbox-etc"
_OWN_NAMES = ("root", "build")


def sandbox_passwd(host: str, shell: str = "/bin/sh") -> str:
    """root and build, then the host's entries that name neither them nor their uids."""
    lines = [
        f"root:x:0:0:root:{HOMES['root']}:{shell}",
        f"build:x:{BUILD_UID}:{BUILD_GID}:amber build user:{HOMES['build']}:{shell}",
    ]
    for line in host.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or fields[0] in _OWN_NAMES or fields[2] in ("0", str(BUILD_UID)):
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def sandbox_group(host: str, dropped_users: set[str]) -> str:
    """root and build, then the host's groups, without members the sandbox does not have."""
    lines = ["root:x:0:", f"build:x:{BUILD_GID}:"]
    for line in host.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or fields[0] in _OWN_NAMES or fields[2] in ("0", str(BUILD_GID)):
            continue
        members = [m for m in fields[3].split(",") if m and m not in dropped_users]
        lines.append(":".join([*fields[:3], ",".join(members)]))
    return "\n".join(lines) + "\n"


def _dropped_users(host_passwd: str) -> set[str]:
    """Host user names the sandbox's passwd leaves out (uid 0 and 1000 under other names)."""
    dropped = set()
    for line in host_passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[2] in ("0", str(BUILD_UID)) and fields[0] not in _OWN_NAMES:
            dropped.add(fields[0])
    return dropped


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def identity_binds(state_dir: Path) -> list[tuple[str, str]]:
    """(host path, sandbox path) pairs binding the generated files over the host's.

    Blocking (small reads and writes): call from a worker thread.
    """
    host_passwd = _read("/etc/passwd")
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    contents = {
        "passwd": sandbox_passwd(host_passwd, shell),
        "group": sandbox_group(_read("/etc/group"), _dropped_users(host_passwd)),
    }
    directory = state_dir / DIRECTORY
    directory.mkdir(mode=0o755, exist_ok=True)
    os.chmod(directory, 0o755)
    binds = []
    for name, text in contents.items():
        path = directory / name
        _write_if_changed(path, text.encode("utf-8", errors="surrogateescape"))
        binds.append((str(path), f"/etc/{name}"))
    return binds


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomically: a sandbox starting meanwhile binds the old file or the new one."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
