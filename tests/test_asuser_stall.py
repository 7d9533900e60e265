"""A user who stops their own reading helpers holds up only their own requests
(sandbox/asuser.py, asuser_pool.py).

A helper is the user's process: they may SIGSTOP it before it says "ready"
(amberd waits ``READY_SECONDS``, 10, for it, on the request's own thread, not on
the few threads that start everyone's helpers, and on the user's own
threads, userthreads.py, not on trio's 40 shared ones) or in the middle of a request
(each reply has ``REPLY_SECONDS``, 30). Either way the request fails, the helper
is killed, and other users' builds go on. Real uids: mal 4242, bob 4243.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from amberd_process import Daemon
from second_user import BOB, MAL, Mal, amberd_children, user_of
from test_helper_reuse import kept_helpers, spec

T = TypeVar("T")
#: More of mal's requests than trio has worker threads (40), and how many of mal's
#: helpers amberd starts at once (userthreads.PER_UID).
MALS = 44
PER_UID = 4


@contextlib.contextmanager
def daemon(root: Path, extra_env: dict[str, str] | None = None) -> Iterator[Daemon]:
    path = root / "amberd.toml"
    path.write_text("socket-mode = 0o666\n")
    d = Daemon(root, extra_env=extra_env).start("--config", str(path))
    try:
        yield d
    finally:
        assert d.stop() == 0


def stopped_helpers(user: Mal) -> list[int]:
    """``user``'s helpers (amberd's children) that are stopped."""
    found = []
    for pid in kept_helpers(user):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                found.append(pid)
    return found


def wait_for(what: Callable[[], list[T]], count: int) -> list[T]:
    deadline = time.monotonic() + 60
    while len(found := what()) < count:
        assert time.monotonic() < deadline, f"only {found}"
        time.sleep(0.02)
    return found


def test_helpers_stopped_before_ready_hold_up_only_their_user(daemon_root: Path):
    with daemon(daemon_root, {"AMBER_TEST_HOLD_ASUSER_READY": str(MAL)}) as d:
        mal, bob = user_of(d, MAL), user_of(d, BOB)
        source = mal.write("data", "mal's\n")
        mals = [mal.popen("build", spec(mal, f"m{i}", source)) for i in range(MALS)]
        try:
            held = wait_for(lambda: stopped_helpers(mal), PER_UID)  # mal's first requests wait
            theirs = bob.write("data", "bob's\n")
            code, out = bob.said("build", spec(bob, "b", theirs))
            assert code == 0, out
            # Bob waited for none of mal's: those mal's first requests wait for are still
            # there (amberd gives each 10 s; bob's build takes about one), and no others.
            assert sorted(stopped_helpers(mal)) == sorted(held)
            assert [p.poll() for p in mals] == [None] * MALS
            (ended, *_) = wait_for(lambda: [p for p in mals if p.poll() is not None], 1)
            first, _ = ended.communicate()
        finally:
            for p in mals:
                p.kill()
                p.wait()
        assert ended.returncode != 0, first
        assert f"helper for uid {MAL} did not answer in 10 s".encode() in first, first
        (build,) = bob.amber("builds", "-q").stdout.decode().split()
        log = bob.amber("log", build)
        assert b"bob's" in log.stdout, log


def test_a_helper_stopped_mid_request_fails_only_that_request(daemon_root: Path):
    with daemon(daemon_root) as d:
        mal, bob = user_of(d, MAL), user_of(d, BOB)
        source = mal.write("data", "first\n")
        path = spec(mal, "m", source)
        code, out = mal.said("build", path)
        assert code == 0, out
        (helper,) = kept_helpers(mal)  # kept for mal's next request
        stop = mal.run("kill", "-STOP", str(helper))  # it is mal's own process
        assert stop.returncode == 0, stop
        source.write_text("second\n")
        again = mal.popen("build", path)
        try:
            theirs = bob.write("data", "bob's\n")
            code, out = bob.said("build", spec(bob, "b", theirs))
            assert code == 0, out
            said, _ = again.communicate(timeout=120)  # a hang guard: the bound is 30 s
        finally:
            if again.poll() is None:
                again.kill()
        assert again.returncode != 0, said
        assert f"helper for uid {MAL} did not answer in 30 s".encode() in said, said
        assert str(helper) not in amberd_children(d)  # killed and reaped
        code, out = mal.said("build", path)  # mal's next request starts a new helper
        assert code == 0, out


def test_verifies_whose_helpers_are_stopped_hold_up_only_their_user(daemon_root: Path):
    """``amber verify`` of a spec on an ``oci:`` base reads the base as the user after the
    spec is parsed (no helper needed for that): on the user's own threads too."""
    with daemon(daemon_root, {"AMBER_TEST_HOLD_ASUSER_READY": str(MAL)}) as d:
        mal, bob = user_of(d, MAL), user_of(d, BOB)
        path = mal.write("oci.toml", f'[build]\nname = "v"\nbase = "oci:{mal.home}/image"\n'
                         '[[step]]\nname = "s"\nrun = "true"\n')  # fmt: skip
        mals = [mal.popen("verify", path) for _ in range(MALS)]
        try:
            held = wait_for(lambda: stopped_helpers(mal), PER_UID)
            code, out = bob.said("build", spec(bob, "b", bob.write("data", "bob's\n")))
            assert code == 0, out
            assert sorted(stopped_helpers(mal)) == sorted(held)  # bob waited for none of them
            assert [p.poll() for p in mals] == [None] * MALS
        finally:
            for p in mals:
                p.kill()
                p.wait()
