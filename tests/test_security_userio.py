"""A user's paths are opened by a process that is that user for real (sandbox/asuser.py).

Switching only the filesystem uid left amberd's capabilities and groups in
force: CAP_SYS_PTRACE let ``/proc/PID/cwd`` of a third user's process reach
into that user's 0700 home, and the daemon's own supplementary groups opened
files of a group the user is not in. mal (uid 4242) tries both, with a local
source, a ``file://`` URL and a ``dir:`` base; and still builds from its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from second_user import MAL, Mal, amberd_children, mal_daemon

VICTIM = 4343
GROUP = 4545
SECRET = b"the victim's secret 91c2\n"


@pytest.fixture
def mal(daemon_root: Path) -> Iterator[Mal]:
    with mal_daemon(daemon_root) as mal:
        yield mal


@pytest.fixture
def victim_cwd(daemon_root: Path) -> Iterator[str]:
    """``/proc/PID/cwd`` of a uid-4343 process sitting in a 0755 directory of its 0700 home."""
    home = daemon_root / "home-victim"
    sub = home / "work"
    sub.mkdir(parents=True)
    (sub / "data").mkdir()
    (sub / "secret").write_bytes(SECRET)
    (sub / "data" / "secret").write_bytes(SECRET)
    for path, mode in ((home, 0o700), (sub, 0o755), (sub / "secret", 0o644),
                       (sub / "data", 0o755), (sub / "data" / "secret", 0o644)):  # fmt: skip
        os.chown(path, VICTIM, VICTIM)
        os.chmod(path, mode)
    proc = subprocess.Popen(["setpriv", f"--reuid={VICTIM}", f"--regid={VICTIM}", "--clear-groups",
                             "sleep", "600"], cwd=sub)  # fmt: skip
    try:
        yield f"/proc/{proc.pid}/cwd"
    finally:
        proc.kill()
        proc.wait()


def spec(mal: Mal, text: str) -> Path:
    path = mal.write("project/spec.toml", '[build]\nname = "userio"\n' + text)
    return path


def leaked(mal: Mal, out: str) -> bool:
    """Whether the secret is in what mal was told, or anywhere in amberd's state."""
    if SECRET.strip().decode() in out:
        return True
    for dirpath, _, files in os.walk(mal.daemon.state):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as f:
                if SECRET.strip() in f.read():
                    return True
    return False


def helpers_left(mal: Mal) -> list[str]:
    """amberd's children that are reading helpers (/usr/bin/python3), running or zombie."""
    left = []
    for child in amberd_children(mal.daemon):
        with contextlib.suppress(OSError), open(f"/proc/{child}/stat") as st:
            text = st.read()
            if text[text.index("(") + 1 : text.rindex(")")] == "python3":
                left.append(text[:60])
    return left


STEP = '\n[[step]]\nname = "show"\nrun = "cat /tmp/s 2>/dev/null; ls /tmp/s 2>/dev/null; true"\n'


def test_a_local_source_through_proc_cwd_is_refused(mal: Mal, victim_cwd: str):
    path = spec(
        mal, f'base = "host"\n[[source]]\npath = "{victim_cwd}/secret"\ndest = "/tmp/s"\n' + STEP
    )
    code, out = mal.said("build", path)
    assert code != 0, out
    assert f"cannot read {victim_cwd}/secret as uid {MAL}: Permission denied" in out, out
    assert not leaked(mal, out)
    assert helpers_left(mal) == []


def test_a_directory_source_through_proc_cwd_is_refused(mal: Mal, victim_cwd: str):
    path = spec(
        mal, f'base = "host"\n[[source]]\npath = "{victim_cwd}/data"\ndest = "/tmp/s"\n' + STEP
    )
    code, out = mal.said("build", path)
    assert code != 0, out
    assert f"as uid {MAL}: Permission denied" in out, out
    assert not leaked(mal, out)


def test_a_file_url_through_proc_cwd_is_refused(mal: Mal, victim_cwd: str):
    digest = hashlib.sha256(SECRET).hexdigest()
    path = spec(mal, f'base = "host"\n[[source]]\nurl = "file://{victim_cwd}/secret"\n'
                     f'sha256 = "{digest}"\ndest = "/tmp/s"\n' + STEP)  # fmt: skip
    code, out = mal.said("build", path)
    assert code != 0, out
    assert f"cannot read {victim_cwd}/secret as uid {MAL}: Permission denied" in out, out
    assert not leaked(mal, out)


def test_a_dir_base_through_proc_cwd_is_refused(mal: Mal, victim_cwd: str):
    path = spec(mal, f'base = "dir:{victim_cwd}"\n' + STEP.replace("/tmp/s", "/secret"))
    code, out = mal.said("build", path)
    assert code != 0, out
    assert f"cannot read {victim_cwd} as uid {MAL}: Permission denied" in out, out
    assert not leaked(mal, out)


@contextlib.contextmanager
def extra_group(gid: int) -> Iterator[None]:
    """Processes started meanwhile have ``gid`` among their supplementary groups."""
    before = os.getgroups()
    os.setgroups([*before, gid])
    try:
        yield
    finally:
        os.setgroups(before)


def test_the_daemons_own_groups_open_nothing_for_mal(daemon_root: Path):
    shared = daemon_root / "group-only"
    shared.write_bytes(SECRET)
    os.chown(shared, 4646, GROUP)
    os.chmod(shared, 0o640)
    with extra_group(GROUP), mal_daemon(daemon_root) as mal:
        os.setgroups([g for g in os.getgroups() if g != GROUP])  # the daemon keeps it
        for source in (f'path = "{shared}"', f'url = "file://{shared}"\nsha256 = '
                       f'"{hashlib.sha256(SECRET).hexdigest()}"'):  # fmt: skip
            path = spec(mal, f'base = "host"\n[[source]]\n{source}\ndest = "/tmp/s"\n' + STEP)
            code, out = mal.said("build", path)
            assert code != 0, out
            assert f"cannot read {shared} as uid {MAL}: Permission denied" in out, out
            assert not leaked(mal, out)


def test_mals_own_files_and_directories_still_build(mal: Mal):
    mal.write("project/one.txt", "one\n")
    mal.write("project/tree/a/b.txt", "bee\n")
    mal.write("root/etc/hello", "hello from a dir base\n")
    subprocess.run(["chown", "-R", f"{MAL}:{MAL}", mal.home], check=True)
    mal.run("ln", "-s", "a/b.txt", mal.home / "project/tree/link", check=True)
    path = spec(mal, 'base = "host"\n'
                     '[[source]]\npath = "one.txt"\ndest = "/srv/one"\n'
                     '[[source]]\npath = "tree"\ndest = "/srv/tree"\n'
                     '[[step]]\nname = "show"\nrun = "cat /srv/one /srv/tree/a/b.txt '
                     '/srv/tree/link; readlink /srv/tree/link"\n')  # fmt: skip
    code, out = mal.said("build", path)
    assert code == 0, out
    shown = "".join(f"[userio] show | {line}\n" for line in ("one", "bee", "bee", "a/b.txt"))
    assert shown in out, out
    code, out = mal.said("image", "import", "mine", f"dir:{mal.home / 'root'}")
    assert code == 0, out
    code, out = mal.said("image", "ls")
    assert code == 0 and "mine" in out, out


def test_an_oci_base_through_proc_cwd_is_refused(mal: Mal, victim_cwd: str):
    path = spec(mal, f'base = "oci:{victim_cwd}/data"\n' + STEP)
    code, out = mal.said("build", path)
    assert code != 0, out
    assert f"as uid {MAL}: Permission denied" in out, out
    assert not leaked(mal, out)


def test_the_daemons_own_groups_let_mal_make_no_out_link(daemon_root: Path):
    """A directory only amberd's extra group may write (0770 root:4545) stays empty."""
    closed = daemon_root / "group-writable"
    closed.mkdir()
    os.chown(closed, 0, GROUP)
    os.chmod(closed, 0o771)  # others may pass through (the client opens it), not write
    with extra_group(GROUP), mal_daemon(daemon_root) as mal:
        os.setgroups([g for g in os.getgroups() if g != GROUP])  # the daemon keeps it
        path = spec(mal, 'base = "host"\n[[step]]\nname = "s"\nrun = "echo made > made"\n')
        code, out = mal.said("build", "--out-link", closed / "r", path)
        assert code != 0, out
        assert "Permission denied" in out, out
        assert os.listdir(closed) == []
