"""A real amberd on a private socket and state directory, driven by the real amber command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amber.client.connection import Connection
from amber.sandbox.mounts import mounts_under, unmount_all_under

BIN = Path(sys.executable).parent

#: Every daemon started, so that cleanup_root stops those a failing test left.
_STARTED: list[Daemon] = []


class Daemon:
    """One amberd process. ``root`` is world-traversable: sandboxes start as
    an unprivileged mapped uid and must reach their root below it."""

    def __init__(
        self,
        root: Path,
        *,
        jobs: int = 4,
        extra_env: dict[str, str] | None = None,
        bin_dir: Path = BIN,
    ):
        self.root = root
        self.bin = bin_dir  # another checkout's venv: its amberd and amber (a benchmark's baseline)
        self.state = root / "state"
        self.socket = root / "amberd.sock"
        self.jobs = jobs
        self.env = dict(
            os.environ, AMBER_SOCKET=str(self.socket), AMBER_NO_AUTOSTART="1", **(extra_env or {})
        )
        self.process: subprocess.Popen | None = None
        self.log = root / "amberd.log"

    def start(self, *args: str) -> Daemon:
        cmd = [str(self.bin / "amberd"), "--state-dir", str(self.state), "--socket", str(self.socket),
               "--jobs", str(self.jobs), "--stop-grace", "2", *args]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        _STARTED.append(self)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"amberd exited with {self.process.returncode}:\n{self.log.read_text()}"
                )
            try:
                Connection.open(str(self.socket), timeout=2).close()
                return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("amberd did not start listening")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def amber(
        self, *args: str, input: bytes | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        """Run the real `amber` command against this daemon."""
        return subprocess.run([str(self.bin / "amber"), *args], capture_output=True, env=self.env, input=input,
                              timeout=timeout)  # fmt: skip

    def build_json(self, spec: Path, *extra: str) -> tuple[int, dict]:
        """`amber build --json`: exit code and the one JSON object it prints."""
        proc = self.amber("build", "--json", *extra, str(spec))
        try:
            return proc.returncode, json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"amber build printed no JSON (exit {proc.returncode}):\n"
                f"stdout: {proc.stdout.decode()}\nstderr: {proc.stderr.decode()}\n"
                f"daemon log:\n{self.log.read_text()[-3000:]}"
            ) from None

    def connect(self) -> Connection:
        return Connection.open(str(self.socket))


def make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="amber-test-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    return root


def cleanup_root(root: Path) -> list[str]:
    """Stop the daemons, undo the mounts, remove ``root``; what was left behind."""
    left = []
    for daemon in [d for d in _STARTED if d.root.is_relative_to(root)]:
        _STARTED.remove(daemon)
        if daemon.process is not None and daemon.process.poll() is None:
            left.append(f"amberd pid {daemon.process.pid}")
            daemon.stop(signal.SIGKILL)
    left += mounts_under(root)
    unmount_all_under(root)
    shutil.rmtree(root, ignore_errors=True)
    return left
