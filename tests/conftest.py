"""Shared fixtures. Every test runs with a fresh state directory and must
leave no mount behind below its temporary directory, even when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    """A world-traversable directory for a daemon's state, removed afterwards."""
    from amberd_process import cleanup_root, make_root

    root = make_root()
    yield root
    left = cleanup_root(root)
    if left:
        pytest.fail(f"test left mounts behind: {left}")


@pytest.fixture
def amberd(daemon_root):
    """A running amberd; stopped with SIGTERM afterwards (it must exit 0)."""
    from amberd_process import Daemon

    d = Daemon(daemon_root).start()
    yield d
    code = d.stop()
    if code != 0:
        pytest.fail(f"amberd exited with {code}:\n{d.log.read_text()[-3000:]}")
