"""A second, unprivileged user (uid 4242, no groups) driving the real ``amber``
against a real amberd whose socket it may reach: the attacker of the
security tests. A third (uid 4243, "bob") owns what the attacker goes after
when the victim should not be root."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from amberd_process import BIN, Daemon

MAL = 4242
BOB = 4243
AS_MAL = ["setpriv", f"--reuid={MAL}", f"--regid={MAL}", "--clear-groups"]


def as_uid(uid: int, groups: tuple[int, ...] = ()) -> list[str]:
    """``setpriv`` becoming ``uid`` (and the group of that number), with ``groups`` only."""
    ids = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", *ids]


#: A guard against a hang on a broken amberd, not a bound on how fast it is.
HANG = 600


class Mal:
    """uid 4242 (or ``uid``) with a home of its own; ``groups``: its supplementary groups."""

    def __init__(self, daemon: Daemon, home: Path, uid: int = MAL, groups: tuple[int, ...] = ()):
        self.daemon = daemon
        self.home = home
        self.uid = uid
        self.groups = groups

    def _env(self) -> dict[str, str]:
        return dict(self.daemon.env, HOME=str(self.home))

    def run(self, *argv: str | Path, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run([*as_uid(self.uid, self.groups), *map(str, argv)], capture_output=True, env=self._env(),
                              cwd=self.home, timeout=HANG)  # fmt: skip
        if check:
            assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        return proc

    def amber(self, *args: str | Path) -> subprocess.CompletedProcess:
        return self.run(BIN / "amber", *args)

    def popen(self, *args: str | Path) -> subprocess.Popen:
        """``amber ARGS`` running in the background, stderr joined to stdout."""
        argv = [*as_uid(self.uid, self.groups), str(BIN / "amber"), *map(str, args)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self._env(), cwd=self.home)  # fmt: skip

    def said(self, *args: str | Path) -> tuple[int, str]:
        """``amber ARGS``: its exit status and what it printed, both streams together."""
        proc = self.popen(*args)
        out, _ = proc.communicate(timeout=HANG)
        return proc.returncode, out.decode(errors="replace")

    def write(self, name: str, data: str | bytes) -> Path:
        """A file of this user's, in its home."""
        path = self.home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chown(path, self.uid, self.uid)
        return path


@contextlib.contextmanager
def mal_daemon(root: Path, config: str = "") -> Iterator[Mal]:
    """An amberd with a world-reachable socket (and ``config``), and uid 4242's home."""
    path = root / "amberd.toml"
    path.write_text("socket-mode = 0o666\n" + config)
    daemon = Daemon(root).start("--config", str(path))
    try:
        yield user_of(daemon, MAL)
    finally:
        assert daemon.stop() == 0


def user_of(daemon: Daemon, uid: int, groups: tuple[int, ...] = ()) -> Mal:
    """User ``uid`` of ``daemon``, with a home of its own (made the first time)."""
    home = daemon.root / ("home-mal" if uid == MAL else f"home-{uid}")
    if not home.exists():
        home.mkdir(mode=0o755)
        os.chown(home, uid, uid)
    return Mal(daemon, home, uid, groups)


def amberd_children(daemon: Daemon) -> list[str]:
    """The pids of ``daemon``'s child processes, whichever of its threads started them."""
    assert daemon.process is not None
    pid = daemon.process.pid
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
            children += f.read().split()
    return children
