"""What amberd writes at a path a user named, the client opens (client/userfiles.py).

amberd is root; a hand-run amberd (as here: no systemd unit) keeps
CAP_SYS_PTRACE, so even with its filesystem uid switched to the user's it
passes ``/proc/PID/cwd`` of a third user's process, into that user's 0700
home. The victim's directory there is world-writable: only the 0700 home
keeps others out, so a write that gets through shows. mal (uid 4242) names
it as ``amber export -o`` and ``amber build --out-link``: both are refused,
and nothing appears there. mal's own paths still work, and a client that
sends a path instead of a descriptor is told to upgrade.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from second_user import BOB, MAL, Mal, mal_daemon, user_of

from amber.client.errors import AmberError

VICTIM = 4343
FAILING = (
    '[build]\nname = "fds"\nbase = "host"\n[[step]]\nname = "s"\nrun = "echo hi > /tmp/x; exit 3"\n'
)
PASSING = (
    '[build]\nname = "fds"\nbase = "host"\noutput = "/build/out"\n'
    '[[step]]\nname = "s"\nrun = "mkdir -p out && echo made > out/made"\n'
)


@pytest.fixture
def mal(daemon_root: Path) -> Iterator[Mal]:
    with mal_daemon(daemon_root) as mal:
        yield mal


@pytest.fixture
def victim_drop(daemon_root: Path) -> Iterator[tuple[str, Path]]:
    """(``/proc/PID/cwd``, the directory) of a uid-4343 process in a 0777 directory of its 0700 home."""
    home = daemon_root / "home-victim"
    drop = home / "drop"
    drop.mkdir(parents=True)
    for path, mode in ((home, 0o700), (drop, 0o777)):
        os.chown(path, VICTIM, VICTIM)
        os.chmod(path, mode)
    proc = subprocess.Popen(["setpriv", f"--reuid={VICTIM}", f"--regid={VICTIM}", "--clear-groups",
                             "sleep", "600"], cwd=drop)  # fmt: skip
    try:
        yield f"/proc/{proc.pid}/cwd", drop
    finally:
        proc.kill()
        proc.wait()


def failed_build(mal: Mal) -> str:
    spec = mal.write("project/spec.toml", FAILING)
    code, out = mal.said("build", "--json", spec)
    assert code == 1 and '"frozen": true' in out, out
    return out.split('"build": "', 1)[1].split('"', 1)[0]


def test_export_through_proc_cwd_is_refused(mal: Mal, victim_drop: tuple[str, Path]):
    cwd, drop = victim_drop
    build = failed_build(mal)
    code, out = mal.said("export", build, "-o", f"{cwd}/out.tar")
    assert code != 0, out
    assert "Permission denied" in out, out
    assert os.listdir(drop) == []


def test_out_link_through_proc_cwd_is_refused(mal: Mal, victim_drop: tuple[str, Path]):
    cwd, drop = victim_drop
    spec = mal.write("project/spec.toml", PASSING)
    code, out = mal.said("build", "--out-link", f"{cwd}/r", spec)
    assert code != 0, out
    assert "Permission denied" in out, out
    assert os.listdir(drop) == []


def test_export_on_failure_through_proc_cwd_is_refused(mal: Mal, victim_drop: tuple[str, Path]):
    cwd, drop = victim_drop
    spec = mal.write("project/spec.toml", FAILING)
    code, out = mal.said(
        "build", "--export-on-failure", "oci", "--export-path", f"{cwd}/x.tar", spec
    )
    assert code != 0, out
    assert "Permission denied" in out, out
    assert os.listdir(drop) == []


def test_mals_own_export_on_failure_still_works(mal: Mal):
    subprocess.run(["chown", f"{MAL}:{MAL}", mal.home], check=True)
    spec = mal.write("project/spec.toml", FAILING)
    os.chown(spec.parent, MAL, MAL)
    code, out = mal.said(
        "build", "--export-on-failure", "oci", "--export-path", mal.home / "f.tar", spec
    )
    assert code == 1 and "exported the state at failure" in out, out
    assert os.stat(mal.home / "f.tar").st_uid == MAL
    code, out = mal.said("build", "--retry-failed", "--export-on-failure", "docker-archive", spec)
    assert code == 1 and "exported the state at failure" in out, out
    (made,) = [n for n in os.listdir(spec.parent) if n.endswith(".tar")]  # amber-BUILD.tar
    assert made.startswith("amber-fds-") and os.stat(spec.parent / made).st_uid == MAL
    assert [n for n in os.listdir(spec.parent) + os.listdir(mal.home) if n.startswith(".")] == []


def test_mals_own_export_and_out_link_still_work(mal: Mal):
    subprocess.run(["chown", f"{MAL}:{MAL}", mal.home], check=True)
    build = failed_build(mal)
    code, out = mal.said("export", build, "-o", mal.home / "mine.tar")
    assert code == 0, out
    st = os.stat(mal.home / "mine.tar")
    assert st.st_uid == MAL and st.st_size > 0
    assert [n for n in os.listdir(mal.home) if n.endswith(".part")] == []
    spec = mal.write("project/ok.toml", PASSING)
    for _ in range(2):  # the second replaces the out-link the first made
        code, out = mal.said("build", "--out-link", mal.home / "r", spec)
        assert code == 0, out
        made = mal.home / "r" / "made"
        assert made.read_text() == "made\n"
        assert os.stat(mal.home / "r").st_uid == MAL and os.stat(made).st_uid == MAL
    assert sorted(n for n in os.listdir(mal.home) if n.startswith(".")) == []


def test_a_client_sending_paths_is_told_to_upgrade(mal: Mal):
    build = failed_build(mal)
    out = mal.home / "old.tar"
    with mal.daemon.connect() as conn:
        with pytest.raises(AmberError, match="upgrade amber"):
            conn.call("export", build=build, output=str(out))
        spec = mal.write("project/ok.toml", PASSING)
        with pytest.raises(AmberError, match="upgrade amber"):
            conn.call("build", spec_text=PASSING, spec_path=str(spec), out_link=str(mal.home / "r"))
        with pytest.raises(AmberError, match="upgrade amber"):
            conn.call("build", spec_text=FAILING, spec_path=str(spec), export_on_failure="oci",
                      export_path=str(out))  # fmt: skip
    assert not out.exists() and not (mal.home / "r").exists()


def source_spec(mal: Mal, path: str, extra: str = "") -> Path:
    return mal.write("project/src.toml", '[build]\nname = "fds"\nbase = "host"\n'
                     f'[[source]]\npath = "{path}"\n{extra}[[step]]\nname = "s"\nrun = "true"\n')  # fmt: skip


def test_a_spec_tells_nothing_of_files_behind_proc_cwd(mal: Mal, victim_drop: tuple[str, Path]):
    cwd, drop = victim_drop
    (drop / "there").write_bytes(b"x\n")
    os.chown(drop / "there", VICTIM, VICTIM)
    for name in ("nothere", "there"):  # told the same of both: existence is not given away
        code, out = mal.said("build", source_spec(mal, f"{cwd}/{name}"))
        assert code != 0, out
        assert f"cannot read {cwd}/{name} as uid {MAL}: Permission denied" in out, out
        assert "No such file" not in out, out


def test_spec_errors_about_mals_own_sources_are_unchanged(mal: Mal):
    mal.write("project/tree/a.txt", "a\n")
    subprocess.run(["chown", "-R", f"{MAL}:{MAL}", mal.home], check=True)
    code, out = mal.said("build", source_spec(mal, "missing.txt"))
    assert code != 0 and f"{mal.home}/project/missing.txt: No such file or directory" in out, out
    code, out = mal.said("build", source_spec(mal, "tree", f'sha256 = "{"0" * 64}"\n'))
    assert code != 0 and "is a directory: digests are for files" in out, out
    mal.run("mkfifo", mal.home / "project/fifo", check=True)
    code, out = mal.said("build", source_spec(mal, "fifo"))
    assert code != 0 and "is neither a file nor a directory" in out, out


def test_out_link_in_a_directory_mal_cannot_write_is_refused(mal: Mal):
    """A directory mal may open but not write (root's 0755, like /etc): root makes nothing there."""
    closed = mal.daemon.root / "roots-own"
    closed.mkdir(mode=0o755)
    spec = mal.write("project/spec.toml", PASSING)
    code, out = mal.said("build", "--out-link", closed / "r", spec)
    assert code != 0, out
    assert "Permission denied" in out, out
    assert os.listdir(closed) == []


def test_out_link_cannot_replace_another_users_in_a_sticky_directory(mal: Mal):
    """bob's out-link in a shared sticky directory (a /tmp) is bob's: mal naming it changes nothing."""
    shared = mal.daemon.root / "shared-tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    bob = user_of(mal.daemon, BOB)
    code, out = bob.said("build", "--out-link", shared / "r", bob.write("spec.toml", PASSING))
    assert code == 0, out
    spec = mal.write("project/spec.toml", PASSING.replace("echo made", "echo mals"))
    code, out = mal.said("build", "--out-link", shared / "r", spec)
    assert code != 0, out
    assert (shared / "r" / "made").read_text() == "made\n"
    assert (shared / "r").stat().st_uid == BOB


def test_an_export_descriptor_that_is_no_writable_regular_file_is_refused(mal: Mal):
    """A hostile client's descriptor: a FIFO (a worker would block on it), a file open
    read-only or for appending. Each is refused with a reason; the daemon serves on."""
    build = failed_build(mal)
    fifo = mal.home / "fifo"
    os.mkfifo(fifo)
    plain = mal.write("plain", "")
    cases = {
        "regular file only": os.open(fifo, os.O_RDWR | os.O_NONBLOCK),
        "open for writing": os.open(plain, os.O_RDONLY),
        "not in append mode": os.open(plain, os.O_WRONLY | os.O_APPEND),
    }
    try:
        with mal.daemon.connect() as conn:
            for reason, fd in cases.items():
                with (
                    pytest.raises(AmberError, match=reason),
                    conn.request("export", {"build": build, "output": str(plain)}, fds=[fd]) as s,
                ):
                    s.wait()
            assert "builds" in conn.call("ps")
    finally:
        for fd in cases.values():
            os.close(fd)
    assert plain.read_bytes() == b""
