"""A second, unprivileged user (uid 4242, no groups) driving the real ``amber``
against a real amberd whose socket it may reach: the attacker of the
security tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from amberd_process import BIN, Daemon

MAL = 4242
AS_MAL = ["setpriv", f"--reuid={MAL}", f"--regid={MAL}", "--clear-groups"]
#: A guard against a hang on a broken amberd, not a bound on how fast it is.
HANG = 600


class Mal:
    """uid 4242 with a home of its own."""

    def __init__(self, daemon: Daemon, home: Path):
        self.daemon = daemon
        self.home = home

    def _env(self) -> dict[str, str]:
        return dict(self.daemon.env, HOME=str(self.home))

    def run(self, *argv: str | Path, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run([*AS_MAL, *map(str, argv)], capture_output=True, env=self._env(),
                              cwd=self.home, timeout=HANG)  # fmt: skip
        if check:
            assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        return proc

    def amber(self, *args: str | Path) -> subprocess.CompletedProcess:
        return self.run(BIN / "amber", *args)

    def popen(self, *args: str | Path) -> subprocess.Popen:
        """``amber ARGS`` running in the background, stderr joined to stdout."""
        argv = [*AS_MAL, str(BIN / "amber"), *map(str, args)]
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
        os.chown(path, MAL, MAL)
        return path


@contextlib.contextmanager
def mal_daemon(root: Path, config: str = "") -> Iterator[Mal]:
    """An amberd with a world-reachable socket (and ``config``), and uid 4242's home."""
    path = root / "amberd.toml"
    path.write_text("socket-mode = 0o666\n" + config)
    daemon = Daemon(root).start("--config", str(path))
    home = root / "home-mal"
    home.mkdir(mode=0o755)
    os.chown(home, MAL, MAL)
    try:
        yield Mal(daemon, home)
    finally:
        assert daemon.stop() == 0
