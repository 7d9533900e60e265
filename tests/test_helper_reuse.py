"""Reading helpers are kept for the same user's next request (sandbox/asuser_pool.py).

A cached build must not start a process to read its sources, so a helper that
finished cleanly waits for the next request of the same uid, gid and groups.
It must never read for anyone else, nor with groups its client no longer has,
and a helper its user killed must not break that user's next build.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from second_user import BOB, MAL, Mal, amberd_children, mal_daemon, user_of

GROUP = 4546
STEP = '\n[[step]]\nname = "show"\nrun = "cat s"\n'


@pytest.fixture
def mal(daemon_root: Path) -> Iterator[Mal]:
    with mal_daemon(daemon_root) as mal:
        yield mal


def spec(user: Mal, name: str, source: Path) -> Path:
    text = f'[build]\nname = "reuse"\nbase = "host"\n[[source]]\npath = "{source}"\ndest = "s"\n'
    return user.write(f"{name}.toml", text + STEP)


def kept_helpers(user: Mal) -> list[int]:
    """amberd's children that are reading helpers (python3) running as ``user``."""
    found = []
    for child in amberd_children(user.daemon):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{child}/status").read_text()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields["Name"] == "python3" and int(fields["Uid"].split()[0]) == user.uid:
                found.append(int(child))
    return found


def test_a_kept_helper_reads_for_its_own_user_only(mal: Mal):
    secret = mal.write("secret", "mal's own\n")
    os.chmod(secret, 0o600)
    code, out = mal.said("build", spec(mal, "mine", secret))
    assert code == 0, out
    assert kept_helpers(mal), "mal's helper is kept for mal's next request"
    bob = user_of(mal.daemon, BOB)
    code, out = bob.said("build", spec(bob, "theirs", secret))
    assert code != 0, out
    assert f"cannot read {secret} as uid {BOB}: Permission denied" in out, out


def test_a_kept_helper_is_not_used_with_other_groups(daemon_root: Path):
    with mal_daemon(daemon_root) as mal:
        grouped = user_of(mal.daemon, MAL, (GROUP,))
        shared = grouped.write("shared", "the group's\n")
        os.chown(shared, 0, GROUP)
        os.chmod(shared, 0o640)
        code, out = grouped.said("build", spec(grouped, "grouped", shared))
        assert code == 0, out
        assert kept_helpers(grouped)
        code, out = mal.said("build", spec(mal, "alone", shared))  # the same uid, no group now
        assert code != 0, out
        assert f"cannot read {shared} as uid {MAL}: Permission denied" in out, out


def test_a_build_after_its_user_killed_the_kept_helper(mal: Mal):
    source = mal.write("data", "first\n")
    path = spec(mal, "data", source)
    code, out = mal.said("build", path)
    assert code == 0, out
    helpers = kept_helpers(mal)
    assert helpers
    for pid in helpers:
        os.kill(pid, signal.SIGKILL)  # the helper is mal's: mal may do this
    source.write_text("second\n")
    code, out = mal.said("build", "--json", path)
    assert code == 0, out
    log = mal.amber("log", "reuse-2")
    assert b"second" in log.stdout, (log.stdout, log.stderr)
