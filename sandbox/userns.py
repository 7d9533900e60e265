"""How the ids a sandbox sees map onto host ids.

A step runs in its own user namespace so that root inside is not root on the
host: sandbox ids ``0 .. count-1`` are host ids ``host_base .. host_base +
count - 1``. Files a step creates therefore appear on the host owned by
``host_base + uid``; a filesystem serving the sandbox's root has to present its
files with the same shift for the sandbox to see them as its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The kernel's id type is 32 bits wide and (uid_t)-1 means "no id".
_MAX_ID = 2**32 - 2


@dataclass(frozen=True)
class IdMap:
    """Sandbox ids ``0 .. count-1`` shown as host ids ``host_base ..``."""

    host_base: int = 100_000
    count: int = 65_536

    def __post_init__(self) -> None:
        # A base of 0 would make sandbox root host root: the one thing this
        # class exists to prevent.
        if self.host_base < 1:
            raise ValueError(f"host_base must be at least 1, not {self.host_base}")
        if self.count < 1:
            raise ValueError(f"count must be at least 1, not {self.count}")
        if self.host_base + self.count - 1 > _MAX_ID:
            raise ValueError("host_base + count exceeds the 32-bit id space")

    def to_host(self, sandbox_id: int) -> int:
        """The host id of ``sandbox_id``.

        Raises:
            ValueError: the id is outside the mapped range.
        """
        if not 0 <= sandbox_id < self.count:
            raise ValueError(f"id {sandbox_id} is outside the mapped range 0..{self.count - 1}")
        return self.host_base + sandbox_id

    def to_sandbox(self, host_id: int) -> int | None:
        """The sandbox id of ``host_id``, or None when the sandbox cannot see it."""
        offset = host_id - self.host_base
        return offset if 0 <= offset < self.count else None

    def map_line(self) -> str:
        """The line for /proc/PID/uid_map and gid_map."""
        return f"0 {self.host_base} {self.count}\n"


def write_id_maps(pid: int, id_map: IdMap) -> None:
    """Give the user namespace of process ``pid`` its uid and gid maps.

    The maps of a namespace can be written once, by a process holding
    CAP_SETUID and CAP_SETGID over its parent namespace: here, the daemon as
    host root. Writing the gid map as a privileged process leaves setgroups(2)
    allowed inside, which package managers need when they drop privileges.

    Raises:
        OSError: the process is gone, the maps were already written, or the
            caller lacks the capabilities.
    """
    line = id_map.map_line().encode()
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            # One write(2): the kernel accepts a map only in a single write.
            if os.write(fd, line) != len(line):
                raise OSError(f"short write to /proc/{pid}/{name}")
        finally:
            os.close(fd)
