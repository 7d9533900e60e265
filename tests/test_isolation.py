"""Users' builds are isolated from each other and from the host: each running
build has its own host id range, and build roots are mounted nosuid,nodev in
amberd's own mount namespace. Attacks run as a real second uid (4242)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from amberd_process import BIN, Daemon

from amber.sandbox.mounts import mounts_under

OTHER = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups"]

SLEEPER = """
[build]
name = "{name}"
base = "host"

[[step]]
name = "wait"
{user}
run = "{prepare}exec sleep {seconds}"
"""


def write_spec(directory: Path, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o755)
    (directory / "spec.toml").write_text(text)
    os.chmod(directory / "spec.toml", 0o644)
    return directory / "spec.toml"


def find_sleep(seconds: int, timeout: float = 60) -> int:
    """The host pid of the step running `sleep SECONDS` (a unique number per test)."""
    want = f"sleep\0{seconds}\0".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if Path(f"/proc/{entry}/cmdline").read_bytes() == want:
                        return int(entry)
                except OSError:
                    continue
        time.sleep(0.1)
    raise AssertionError(f"no step running sleep {seconds}")


def host_ids(pid: int) -> tuple[int, int, str]:
    """A process's real host uid and gid (as `ps` shows them) and its uid map."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    gid = int(next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1])
    return uid, gid, Path(f"/proc/{pid}/uid_map").read_text().split("\n")[0]


def in_background(argv: list[str], env: dict[str, str]) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(
        target=lambda: out.setdefault("proc", subprocess.run(argv, capture_output=True, env=env))
    )
    thread.start()
    return thread, out


def shared_daemon(daemon_root: Path) -> Daemon:
    config = daemon_root / "amberd.toml"
    config.write_text("socket-mode = 0o666\n")
    return Daemon(daemon_root).start("--config", str(config))


def test_two_users_running_builds_have_their_own_host_ids_and_cannot_signal(daemon_root: Path):
    d = shared_daemon(daemon_root)
    threads = []
    try:
        mine = write_spec(
            daemon_root / "a", SLEEPER.format(name="a", user="", prepare="", seconds=4101)
        )
        theirs = write_spec(
            daemon_root / "b", SLEEPER.format(name="b", user="", prepare="", seconds=4102)
        )
        env = dict(d.env, HOME="/tmp")
        threads.append(in_background([str(BIN / "amber"), "build", str(mine)], env))
        threads.append(in_background([*OTHER, str(BIN / "amber"), "build", str(theirs)], env))
        a, b = find_sleep(4101), find_sleep(4102)
        a_uid, _, a_map = host_ids(a)
        b_uid, b_gid, b_map = host_ids(b)
        # Both steps run as the sandbox's build user 1000, in different ranges.
        a_base, b_base = int(a_map.split()[1]), int(b_map.split()[1])
        assert (a_uid, b_uid) == (a_base + 1000, b_base + 1000), (a_map, b_map)
        assert abs(a_base - b_base) >= 65536, (a_map, b_map)  # disjoint ranges
        # A process holding B's host ids (B's step escaped, or a subuid owner
        # who maps them) cannot signal A's step: EPERM, not delivered.
        attack = ["setpriv", f"--reuid={b_uid}", f"--regid={b_gid}", "--clear-groups"]
        probe = subprocess.run(
            [*attack, "/usr/bin/python3", "-c", f"import os; os.kill({a}, 0)"], capture_output=True
        )
        assert probe.returncode != 0 and b"PermissionError" in probe.stderr, probe.stderr
        # And B's step itself sees none of A's processes (its own pid namespace).
        assert b_map.split()[1] != a_map.split()[1]
    finally:
        for pid in _sleepers(4101, 4102):
            os.kill(pid, signal.SIGKILL)
        for thread, _ in threads:
            thread.join(60)
        assert d.stop() == 0


def _sleepers(*numbers: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if any(cmd == f"sleep\0{n}\0".encode() for n in numbers):
                found.append(int(entry))
    return found


CHAIN = """
[build]
name = "chain"
base = "host"

[[step]]
name = "own"
env = {{ FLAVOUR = "{flavour}" }}
user = "root"
run = "cat /proc/self/uid_map; mkdir d && echo x > d/f && echo r > rootfile && chown -R 1000:1000 d && chown 65534:65534 rootfile && touch -d @1 . d d/f rootfile"

[[step]]
name = "look"
run = "ls -ln d rootfile > listing && cat listing && touch -d @1 . listing"
"""


def step_trees(amberd: Daemon, build: str) -> list[str]:
    db = sqlite3.connect(f"file:{amberd.state / 'amber.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT after_tree FROM build_steps WHERE build_id = ? ORDER BY idx", (build,)
        ).fetchall()
    finally:
        db.close()
    assert rows and all(r[0] for r in rows), rows
    return [r[0] for r in rows]


def test_the_same_steps_in_another_id_range_give_the_same_trees_and_cache_hits(amberd: Daemon):
    spec = write_spec(amberd.root / "chain", CHAIN.format(flavour="one"))
    code, first = amberd.build_json(spec)
    assert code == 0, first
    assert [s["status"] for s in first["steps"]] == ["ran", "ran"]
    holder = write_spec(
        amberd.root / "holder", SLEEPER.format(name="holder", user="", prepare="", seconds=4103)
    )
    thread, _ = in_background([str(BIN / "amber"), "build", str(holder)], amberd.env)
    try:
        held = int(host_ids(find_sleep(4103))[2].split()[1])
        # Both steps rerun (step "own"'s env changed) in a range other than the
        # holder's: each leaves the same tree as in the first range.
        write_spec(amberd.root / "chain", CHAIN.format(flavour="two"))
        code, second = amberd.build_json(spec)
        assert code == 0, second
        assert [s["status"] for s in second["steps"]] == ["ran", "ran"]
        log = amberd.amber("log", "--step", "own", second["build"]).stdout.decode()
        assert int(log.split()[1]) != held, log  # it did run in another range
        assert step_trees(amberd, second["build"]) == step_trees(amberd, first["build"])
        # The first spec again, in yet another range than its first run: all cached.
        write_spec(amberd.root / "chain", CHAIN.format(flavour="one"))
        code, third = amberd.build_json(spec)
        assert code == 0 and [s["status"] for s in third["steps"]] == ["cached", "cached"]
    finally:
        for pid in _sleepers(4103):
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
    listing = amberd.amber("log", "--step", "look", first["build"]).stdout.decode()
    assert " 1000 1000 " in listing and " 65534 65534 " in listing, listing


def _amberd_mounts(pid: int, under: Path) -> list[tuple[str, str, str]]:
    """(mount point, per-mount options, fs type) of amberd's mounts below ``under``."""
    found = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        fstype = fields[fields.index("-") + 1]
        if fields[4].startswith(str(under) + "/"):
            found.append((fields[4], fields[5], fstype))
    return found


def test_build_roots_are_nosuid_nodev_and_out_of_other_users_reach(daemon_root: Path):
    d = shared_daemon(daemon_root)
    prepare = "cp $(command -v python3) /pysuid && chmod 4755 /pysuid && touch /marker-4104 && "
    spec = write_spec(
        daemon_root / "root",
        SLEEPER.format(name="r", user='user = "root"', prepare=prepare, seconds=4104),
    )
    thread, out = in_background([str(BIN / "amber"), "build", str(spec)], d.env)
    try:
        try:
            step = find_sleep(4104, 30)
        except AssertionError:
            thread.join(30)
            raise AssertionError(out) from None
        assert d.process is not None
        mnt = d.state / "mnt"
        mounts = _amberd_mounts(d.process.pid, mnt)
        kinds = {fstype for _, _, fstype in mounts}
        assert {"overlay", "fuse.amber"} <= kinds, mounts
        for point, options, _ in mounts:
            assert {"nosuid", "nodev"} <= set(options.split(",")), (point, options)
        # The host's namespace (any other user's) has none of them...
        assert mounts_under(d.state) == []
        # The step's upper layer is a plain directory on the host: another
        # user who knows its path can neither list it nor run its setuid file.
        [marker] = list(mnt.rglob("marker-4104"))
        for probe in (f"import os; os.listdir({str(marker.parent)!r})",
                      f"import os; os.execv({str(marker.parent / 'pysuid')!r}, ['x', '-c', "
                      "'import os; print(os.geteuid())'])"):  # fmt: skip
            attempt = subprocess.run([*OTHER, "/usr/bin/python3", "-c", probe], capture_output=True)
            assert attempt.returncode != 0 and b"PermissionError" in attempt.stderr, attempt
        # ...and even inside amberd's, the step's setuid file grants nothing.
        root = next(p for p, _, fstype in mounts if fstype == "overlay")
        assert os.stat(f"/proc/{step}/root/pysuid").st_mode & 0o4000
        run = subprocess.run(
            ["nsenter", "-t", str(d.process.pid), "-m", *OTHER, f"{root}/pysuid", "-c",
             "import os; print(os.geteuid())"],
            capture_output=True,
        )  # fmt: skip
        assert run.stdout == b"4242\n", run
    finally:
        for pid in _sleepers(4104):
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
        assert d.stop() == 0


DEBIAN_SUBIDS = "# as useradd writes them\nalice:100000:65536\nbob:165536:65536\n"


def amberd_seeing(
    subids: dict[str, str], daemon_root: Path, *args: str
) -> subprocess.CompletedProcess:
    """Run amberd with these /etc/subuid and /etc/subgid (bind-mounted in a private namespace)."""
    binds = []
    for name, text in subids.items():
        (daemon_root / name).write_text(text)
        binds.append(f"mount --bind {daemon_root / name} /etc/{name}")
    command = " && ".join([*binds, 'exec "$@"'])
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command, "sh",
         str(BIN / "amberd"), "--state-dir", str(daemon_root / "state"),
         "--socket", str(daemon_root / "s.sock"), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_an_id_pool_overlapping_subordinate_ids_is_refused_at_start(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text("id-base = 100000\n")  # the old default: alice's subordinate ids
    for name in ("subuid", "subgid"):
        started = amberd_seeing({name: DEBIAN_SUBIDS}, daemon_root, "--config", str(config))
        assert started.returncode == 78, started
        assert f"/etc/{name} line 2 (alice:100000:65536) overlaps the sandbox id pool" in (
            started.stderr
        ), started.stderr
    # The whole pool counts, to its last id (70000 + 2 * 65536 - 1 = 201071), and no further.
    config.write_text("id-base = 70000\nid-ranges = 2\n")
    started = amberd_seeing({"subuid": "bob:201071:1\n"}, daemon_root, "--config", str(config))
    assert started.returncode == 78 and "line 1 (bob:201071:1)" in started.stderr, started
    checked = amberd_seeing(
        {"subuid": "bob:201072:1\n"}, daemon_root, "--config", str(config), "--check"
    )
    assert "ok    id-pool: sandbox ids 70000..201071" in checked.stdout, checked


def test_the_default_id_pool_is_clear_of_debian_allocations(daemon_root: Path):
    both = {"subuid": DEBIAN_SUBIDS, "subgid": DEBIAN_SUBIDS}
    checked = amberd_seeing(both, daemon_root, "--check")
    assert "ok    id-pool: sandbox ids 1879048192..1895825407" in checked.stdout, checked


def test_with_every_id_range_held_a_build_errors_and_a_shell_is_refused(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text("id-ranges = 1\n")
    d = Daemon(daemon_root).start("--config", str(config))
    try:
        quick = write_spec(
            daemon_root / "q", '[build]\nname = "q"\n[[step]]\nname = "s"\nrun = "true"\n'
        )
        code, done = d.build_json(quick)
        assert code == 0, done
        holder = write_spec(
            daemon_root / "h", SLEEPER.format(name="h", user="", prepare="", seconds=4105)
        )
        thread, _ = in_background([str(BIN / "amber"), "build", str(holder)], d.env)
        find_sleep(4105)
        shell = d.amber("shell", done["build"], "--", "true")
        assert shell.returncode != 0
        assert b"all 1 sandbox id ranges are in use" in shell.stderr, shell
        other = write_spec(
            daemon_root / "o", '[build]\nname = "o"\n[[step]]\nname = "s"\nrun = "echo o"\n'
        )
        code, refused = d.build_json(other)
        assert refused["status"] == "errored", refused
        assert "all 1 sandbox id ranges are in use" in refused["error"], refused
        for pid in _sleepers(4105):
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
        # Released with the build: the range serves the next one.
        assert d.amber("shell", done["build"], "--", "true").returncode == 0
    finally:
        for pid in _sleepers(4105):
            os.kill(pid, signal.SIGKILL)
        assert d.stop() == 0
