"""What amberd speaks of systemd: socket activation, sd_notify, the journal's stream.

Each is a few lines of the documented wire format; no libsystemd needed.
The variables are taken out of the environment as they are read, so that
nothing amberd starts (filesystem processes, sandboxes) sees them.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def listen_fds() -> list[socket.socket]:
    """Sockets passed by systemd (LISTEN_FDS), if they are meant for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


class Notifier:
    """sd_notify(3): tells the service manager ``READY=1``, ``STATUS=...``, ``STOPPING=1``.

    Does nothing when amberd was not started with ``NOTIFY_SOCKET`` (no
    systemd, or not ``Type=notify``). Sending never fails: a manager that
    went away must not take builds down with it.
    """

    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address or None

    @classmethod
    def from_environment(cls) -> Notifier:
        """The manager named by ``NOTIFY_SOCKET``, which is removed from the environment."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if there is no manager to tell."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(message, self.address)
            except OSError:
                return False
        return True

    def status(self, text: str) -> bool:
        """The one line ``systemctl status`` shows under the unit."""
        return self.send(f"STATUS={_one_line(text)}")

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def stopping(self, status: str, *, needs: float) -> bool:
        """``STOPPING=1``, asking for ``needs`` seconds (beyond TimeoutStopSec if need be)."""
        return self.send(
            "STOPPING=1",
            f"STATUS={_one_line(status)}",
            f"EXTEND_TIMEOUT_USEC={int(needs * 1_000_000)}",
        )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def journal_stream() -> bool:
    """Whether stderr is connected to the journal (so lines may carry ``<N>`` levels).

    ``JOURNAL_STREAM`` names the device and inode of the journal's stream;
    it counts only when stderr is still that stream, not when a child of a
    service redirected its output somewhere else.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False
