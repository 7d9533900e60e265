"""Shared fixtures. Every test runs with a fresh state directory and must
leave no mount behind below its temporary directory, even when it fails."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools import need

from amber.sandbox.mounts import mounts_under, unmount_all_under
from amber.sandbox.store import Store


@pytest.fixture(autouse=True)
def no_leftover_mounts(tmp_path: Path):
    yield
    left = mounts_under(tmp_path)
    if left:
        unmount_all_under(tmp_path)
        pytest.fail(f"test left mounts behind: {left}")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state")


@pytest.fixture
def daemon_root():
    """A world-traversable directory for a daemon's state, removed afterwards
    with any daemon a failing test left running below it."""
    from amberd_process import cleanup_root, make_root

    root = make_root()
    yield root
    left = cleanup_root(root)
    if left:
        pytest.fail(f"test left behind: {left}")


@pytest.fixture
def amberd(daemon_root):
    """A running amberd; stopped with SIGTERM afterwards (it must exit 0)."""
    from amberd_process import Daemon

    d = Daemon(daemon_root).start()
    yield d
    code = d.stop()
    if code != 0:
        pytest.fail(f"amberd exited with {code}:\n{d.log.read_text()[-3000:]}")


# --- third-party tools that check amber's outputs ------------------------------------


@pytest.fixture
def podman() -> Iterator[list[str]]:
    """podman on private vfs storage (its run root must be under 50 characters)."""
    need("podman")
    top = Path(tempfile.mkdtemp(prefix="amber-podman-"))
    try:
        yield [
            "podman",
            "--root", str(top / "root"),
            "--runroot", str(top / "run"),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "none",
        ]  # fmt: skip
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A docker-registry on a free loopback port, stopped whatever happens."""
    with serve_registry(tmp_path) as address:
        yield address


@contextlib.contextmanager
def serve_registry(
    tmp_path: Path, extra: str = "", storage: str = "", name: str = "registry"
) -> Iterator[str]:
    """docker-registry with ``extra`` YAML (an ``auth:`` section, say) on a free port.

    ``storage``: more of the storage section (indented), ``name``: of its config
    and log files, for a second instance serving the same storage.
    """
    need("docker-registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / f"{name}.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry-data'}\n{storage}"
        f"http:\n  addr: 127.0.0.1:{port}\n" + extra
    )
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:
                break  # 401: up, and asking for a login
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / f"{name}.log").read_text()) from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
