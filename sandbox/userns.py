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


#: The id the kernel shows for an id a namespace cannot map ("nobody").
OVERFLOW_ID = 65534


@dataclass(frozen=True)
class IdMap:
    """Sandbox ids ``0 .. count-1`` are host ids ``host_base .. host_base + count - 1``.

    Trees record ids as the sandbox sees them: importing a step's output maps
    host ids back (``to_tree``), and the filesystem serving a step's root
    presents a tree's ids shifted (``to_host``).
    """

    host_base: int = 100_000
    count: int = 65_536

    def __post_init__(self) -> None:
        if self.host_base < 0:
            raise ValueError(f"host_base must not be negative, not {self.host_base}")
        if self.count < 1:
            raise ValueError(f"count must be at least 1, not {self.count}")
        if self.host_base + self.count - 1 > _MAX_ID:
            raise ValueError("host_base + count exceeds the 32-bit id space")

    def host_id(self, sandbox_id: int) -> int:
        """The host id of ``sandbox_id``, which must be mapped.

        Raises:
            ValueError: the id is outside the mapped range.
        """
        if not 0 <= sandbox_id < self.count:
            raise ValueError(f"id {sandbox_id} is outside the mapped range 0..{self.count - 1}")
        return self.host_base + sandbox_id

    def to_host(self, tree_id: int) -> int:
        """The host id a tree's id is presented with; unmapped ids show as the overflow id."""
        if 0 <= tree_id < self.count:
            return self.host_base + tree_id
        return self.host_base + OVERFLOW_ID if self.count > OVERFLOW_ID else self.host_base

    def to_tree(self, host_id: int) -> int:
        """The id a tree records for a host id; ids the sandbox cannot see become the overflow id."""
        offset = host_id - self.host_base
        return offset if 0 <= offset < self.count else OVERFLOW_ID

    def map_line(self) -> str:
        """The line for /proc/PID/uid_map and gid_map."""
        return f"0 {self.host_base} {self.count}\n"


#: Host ids as they are: imports and checkouts outside any sandbox.
IDENTITY = IdMap(0, _MAX_ID + 1)


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
    if id_map.host_base < 1:
        # Sandbox root would be host root: the one thing the namespace is for.
        raise ValueError("a sandbox's ids must not map onto host root (host_base 0)")
    line = id_map.map_line().encode()
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            # One write(2): the kernel accepts a map only in a single write.
            if os.write(fd, line) != len(line):
                raise OSError(f"short write to /proc/{pid}/{name}")
        finally:
            os.close(fd)
