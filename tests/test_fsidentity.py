"""The filesystem identity of one thread: a user's for their paths, root's back for the store.

Real setfsuid(2) on this thread, checked by opening a file only root may
read: inside a user's identity the open fails, inside ``as_store_owner`` it
succeeds, however the two nest, and a thread started inside a user's
identity reads the store after ``store_owner_thread``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from second_user import MAL

from amber.sandbox.fsidentity import as_store_owner, filesystem_identity, store_owner_thread


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "root-only"
    path.write_text("root's\n")
    os.chmod(path, 0o600)
    os.chmod(tmp_path, 0o755)
    return path


def readable(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        return False
    return True


def test_store_owner_nests_inside_a_users_identity(secret: Path):
    with filesystem_identity(MAL, MAL):
        assert not readable(secret)
        with as_store_owner():
            with as_store_owner():  # the store's own open inside a walk that is already root's
                assert readable(secret)
            assert readable(secret)  # the inner one did not end the outer
        assert not readable(secret)
    assert readable(secret)


def test_a_thread_started_as_the_user_takes_roots_rights_back(secret: Path):
    seen: list[bool] = []

    def thread() -> None:
        seen.append(readable(secret))
        store_owner_thread()
        seen.append(readable(secret))

    with filesystem_identity(MAL, MAL):
        t = threading.Thread(target=thread)
        t.start()
        t.join()
    assert seen == [False, True]
