"""How the ids a sandbox sees map onto host ids.

A step runs in its own user namespace so that root inside is not root on the
host: sandbox ids ``0 .. count-1`` are host ids ``host_base .. host_base +
count - 1``. Files a step creates therefore appear on the host owned by
``host_base + uid``; a filesystem serving the sandbox's root has to present its
files with the same shift for the sandbox to see them as its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# The kernel's id type is 32 bits wide and (uid_t)-1 means "no id".
_MAX_ID = 2**32 - 2


#: The id the kernel shows for an id a namespace cannot map ("nobody").
OVERFLOW_ID = 65534

#: Where sandbox id ranges start by default: 0x70000000, the first id of the
#: block systemd's UIDS-GIDS.md leaves unused (1879048192..2147352575). It is
#: above shadow's default /etc/subuid allocations (SUB_UID_MIN 100000 ..
#: SUB_UID_MAX 600100000, what Debian's useradd hands out), above the range
#: systemd-nspawn picks container ranges from (524288..1879048191), below
#: systemd's "foreign" range (0x7FFE0000) and below 2^31 (ids that look
#: negative to signed code). Room for 4094 ranges of 65536 ids.
DEFAULT_ID_BASE = 0x7000_0000
RANGE_SIZE = 65_536


@dataclass(frozen=True)
class IdMap:
    """Sandbox ids ``0 .. count-1`` are host ids ``host_base .. host_base + count - 1``.

    Trees record ids as the sandbox sees them: importing a step's output maps
    host ids back (``to_tree``), and the filesystem serving a step's root
    presents a tree's ids shifted (``to_host``).
    """

    host_base: int = DEFAULT_ID_BASE
    count: int = RANGE_SIZE

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


class IdPoolExhausted(Exception):
    """Every range of the pool is held by a running build or shell."""


class IdPool:
    """``ranges`` disjoint id ranges of ``count`` ids from ``base``; one per running sandbox user.

    Every running build and every shell holds its own range for as long as
    it runs, so no two users' steps ever share a host uid: one cannot signal,
    ptrace or write files of another. Trees record sandbox-view ids
    (``IdMap.to_tree``), so which range a build ran in changes no digest.
    Thread-safe: shells and builds take ranges from the trio loop and threads.
    """

    def __init__(self, base: int = DEFAULT_ID_BASE, count: int = RANGE_SIZE, ranges: int = 256):
        if ranges < 1:
            raise ValueError(f"an id pool needs at least one range, not {ranges}")
        IdMap(base, count * ranges)  # the whole span must be a valid map
        self.base, self.count, self.ranges = base, count, ranges
        self._free = set(range(ranges))
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        """One past the last host id of the pool."""
        return self.base + self.count * self.ranges

    def acquire(self) -> IdMap:
        """The lowest free range (raises `IdPoolExhausted` when none is)."""
        with self._lock:
            if not self._free:
                raise IdPoolExhausted(
                    f"all {self.ranges} sandbox id ranges are in use by running builds and "
                    "shells (raise 'id-ranges' in the config, or wait)"
                )
            index = min(self._free)
            self._free.remove(index)
        return IdMap(self.base + index * self.count, self.count)

    def release(self, ids: IdMap) -> None:
        index, rest = divmod(ids.host_base - self.base, self.count)
        if rest or not 0 <= index < self.ranges or ids.count != self.count:
            raise ValueError(f"{ids} is not a range of this pool")
        with self._lock:
            self._free.add(index)

    @contextmanager
    def hold(self) -> Iterator[IdMap]:
        """A range for the duration of the block."""
        ids = self.acquire()
        try:
            yield ids
        finally:
            self.release(ids)


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
