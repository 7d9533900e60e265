"""amberd on systemd-managed hosts: units, socket activation, readiness, stop, crash, config.

There is no systemd as PID 1 here, so each piece is exercised with the tool
that stands in for it: ``systemd-analyze verify`` for the unit files,
``systemd-socket-activate`` for the socket unit, a datagram socket named by
NOTIFY_SOCKET for the service manager, and a private mount namespace,
``setpriv`` and the devices cgroup for the unit's hardening.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import resource
import select
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from amberd_process import BIN, Daemon
from tools import need

from amber.client.units import parse_duration
from amber.daemon import systemd
from amber.daemon.config import OPTIONS, Config, example_config, load_config
from amber.sandbox.mounts import mounts_under
from amber.sandbox.store import Store

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
UNITS = ("amberd.service", "amberd.socket", "amber-gc.service", "amber-gc.timer")
EXAMPLE = UNIT_DIR / "amberd.toml.example"
EX_CONFIG = 78


@pytest.fixture(autouse=True)
def systemd_tools() -> None:
    need("systemd-socket-activate", "systemd-analyze")


LONG_STEP = '[build]\nname = "{name}"\nbase = "host"\n[[step]]\nname = "long"\nrun = "sleep 60"\n'


# --- helpers -------------------------------------------------------------------------


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as (key, value) lists: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in unit_entries(path).get(section, []) if k == key]


def write_spec(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spec.toml").write_text(text)
    return directory / "spec.toml"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children of all its threads)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def build_status(state: Path, build_id: str) -> tuple[str, list[str]]:
    """A build's status and its steps' statuses, read straight from the database."""
    db = sqlite3.connect(f"file:{state / 'amber.db'}?mode=ro", uri=True, timeout=10)
    try:
        (status,) = db.execute("SELECT status FROM builds WHERE id = ?", (build_id,)).fetchone()
        steps = [
            s
            for (s,) in db.execute(
                "SELECT status FROM build_steps WHERE build_id = ? ORDER BY idx", (build_id,)
            )
        ]
        return status, steps
    finally:
        db.close()


class Notifications:
    """Stands in for systemd's notification socket: records each datagram amberd sends.

    ``at_ready`` runs in the receiving thread the moment ``READY=1`` arrives,
    before amberd can do anything else a test could mistake for recovery.
    """

    def __init__(self, path: Path, at_ready: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.at_ready = at_ready
        self.seen_at_ready: Any = None
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            if "READY=1" in text.split("\n") and self.at_ready is not None:
                self.seen_at_ready = self.at_ready()
            with self._cond:
                self.messages.append(text)
                self._cond.notify_all()

    def fields(self) -> list[str]:
        with self._cond:
            return [f for m in self.messages for f in m.split("\n")]

    def wait_for(self, field: str, timeout: float = 30) -> None:
        def present() -> bool:
            return any(f == field or f.startswith(field) for f in self.fields())

        with self._cond:
            if not self._cond.wait_for(present, timeout):
                raise AssertionError(f"amberd never sent {field!r}; sent: {self.messages}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self._sock.close()


class Activated:
    """amberd started by ``systemd-socket-activate`` as amberd.socket would start it.

    The activator execs amberd in place, so ``process.pid`` is amberd's pid
    once a client has connected. stderr goes to a file that amberd is told
    (JOURNAL_STREAM) is the journal's stream.
    """

    def __init__(self, root: Path, *, jobs: int = 5, grace: float = 2, at_ready=None) -> None:
        self.root = root
        self.state = root / "state"
        self.socket = root / "activated.sock"
        self.unused_socket = root / "never-bound.sock"  # amberd would bind it without LISTEN_FDS
        self.log = root / "activated.log"
        self.jobs = jobs
        self.grace = grace
        self.at_ready = at_ready
        self.env = dict(os.environ, AMBER_SOCKET=str(self.socket), AMBER_NO_AUTOSTART="1")
        self.notifications: Notifications | None = None
        self.process: subprocess.Popen | None = None

    def start(self) -> Activated:
        notify = self.root / f"notify-{time.monotonic_ns()}.sock"
        self.notifications = Notifications(notify, self.at_ready)
        self.log.touch()
        st = self.log.stat()
        # One uid runs all these builds: let it hold every slot (jobs-per-user).
        config = self.root / "activated.toml"
        config.write_text(f"jobs-per-user = {self.jobs}\n")
        cmd = [
            "systemd-socket-activate", "-l", str(self.socket), "--fdname=amberd.sock",
            "-E", "PATH", "-E", f"NOTIFY_SOCKET={notify}",
            "-E", f"JOURNAL_STREAM={st.st_dev}:{st.st_ino}",
            str(BIN / "amberd"), "--state-dir", str(self.state), "--socket", str(self.unused_socket),
            "--jobs", str(self.jobs), "--stop-grace", str(self.grace), "--config", str(config),
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.socket.exists, 10, "systemd-socket-activate to listen")
        return self

    def amber(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "amber"), "--socket", str(self.socket), *args],
                              capture_output=True, env=self.env, timeout=timeout)  # fmt: skip

    def build_json(self, spec: Path) -> tuple[int, dict]:
        proc = self.amber("build", "--json", str(spec))
        try:
            return proc.returncode, json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"amber build printed no JSON (exit {proc.returncode}): {proc.stderr.decode()}\n"
                f"amberd's log:\n{self.amberd_log()[-3000:]}"
            ) from None

    def running(self) -> list[dict]:
        return json.loads(self.amber("ps", "--json").stdout)["builds"]

    def amberd_log(self) -> str:
        """What amberd wrote (the activator's own lines come before its exec)."""
        text = self.log.read_text()
        return text.split("Execing", 1)[1].split("\n", 1)[1] if "Execing" in text else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.notifications is not None:
            self.notifications.close()
        return self.process.returncode


@pytest.fixture
def activated(daemon_root: Path):
    started: list[Activated] = []

    def start(**kw: Any) -> Activated:
        d = Activated(daemon_root, **kw).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    holder: dict = {}
    thread = threading.Thread(target=lambda: holder.setdefault("result", fn()), daemon=True)
    thread.start()
    return thread, holder


# --- the unit files -------------------------------------------------------------------


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path):
    # The units start /usr/local/bin/amberd and amber (scripts/setup links
    # them); verify checks that ExecStart exists, so point it at this venv.
    for name in UNITS:
        text = (UNIT_DIR / name).read_text().replace("/usr/local/bin/", f"{BIN}/")
        (tmp_path / name).write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    # verify exits 0 on unknown keys and unparsable values; it only warns.
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr

    (tmp_path / "typo.service").write_text("[Service]\nExecStart=/bin/true\nKillMode=wrong\n")
    bad = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "typo.service")],
                         capture_output=True, text=True)  # fmt: skip
    assert "typo.service:3" in bad.stderr  # the check above would see a mistake


def test_units_say_what_the_daemon_relies_on():
    service, sock = UNIT_DIR / "amberd.service", UNIT_DIR / "amberd.socket"
    get = lambda path, key, section="Service": unit_values(path, section, key)  # noqa: E731
    assert get(service, "Type") == ["notify"]
    assert get(service, "Restart") == ["on-failure"]
    assert get(service, "ExecStart") == ["/usr/local/bin/amberd"]
    assert get(service, "KillMode") == ["mixed"]  # SIGTERM to amberd alone
    assert parse_duration(get(service, "TimeoutStopSec")[0]) > Config().stop_grace
    assert get(service, "RestartPreventExitStatus") == [str(EX_CONFIG)]
    assert get(service, "StateDirectory") == ["amber"] and get(service, "RuntimeDirectory") == [
        "amber"
    ]
    # The socket unit owns /run/amber: the service must not delete it on stop.
    assert get(service, "RuntimeDirectoryPreserve") == ["yes"]
    assert "amberd.socket" in get(service, "Requires", "Unit")
    assert get(sock, "ListenStream", "Socket") == ["/run/amber/amberd.sock"]
    assert get(sock, "SocketMode", "Socket") == ["0660"]
    assert get(sock, "SocketGroup", "Socket") == ["amber"]
    gc = UNIT_DIR / "amber-gc.service"
    assert get(gc, "Type") == ["oneshot"] and get(gc, "ExecStart") == ["/usr/local/bin/amber gc"]
    timer = UNIT_DIR / "amber-gc.timer"
    assert get(timer, "OnCalendar", "Timer") == ["daily"]
    assert get(timer, "Persistent", "Timer") == ["true"]
    assert get(timer, "RandomizedDelaySec", "Timer")


# Options that would break what amberd is made of, each checked here (see the
# comments in amberd.service): never set them on the daemon.
BREAKS_SANDBOXES = {
    "NoNewPrivileges": "setuid bwrap and AppArmor's userns transition on exec",
    "ProtectKernelTunables": "an overmounted /proc: bwrap cannot mount a fresh one",
    "ProtectKernelLogs": "an overmounted /proc: bwrap cannot mount a fresh one",
    "ProtectProc": "an overmounted /proc: bwrap cannot mount a fresh one",
    "ProcSubset": "an overmounted /proc: bwrap cannot mount a fresh one",
    "RestrictNamespaces": "sandboxes are namespaces",
    "PrivateUsers": "amberd must be real root",
    "PrivateDevices": "hides /dev/fuse",
    "SystemCallFilter": "seccomp filters are inherited by every build step",
    "RestrictSUIDSGID": "seccomp filters are inherited by every build step",
    "MemoryDenyWriteExecute": "seccomp filters are inherited by every build step",
    "PrivateNetwork": "pasta connects network = true steps through the host's network",
}


def test_amberd_service_sets_nothing_that_breaks_sandboxes():
    # systemd's own reading of the unit, not ours: set=true means the
    # restriction is in effect.
    report = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--json=short",
         str(UNIT_DIR / "amberd.service")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    checks = json.loads(report.stdout)
    for key, reason in BREAKS_SANDBOXES.items():
        found = [c for c in checks if c["json_field"].split("_")[0] == key]
        assert found, f"systemd-analyze no longer reports {key}"
        assert not any(c["set"] for c in found), f"{key}: {reason}"
    entries = dict(unit_entries(UNIT_DIR / "amberd.service")["Service"])
    assert entries.get("ProtectHome") == "no" and entries.get("PrivateTmp") == "no"


# --- socket activation and readiness ----------------------------------------------------


def interrupted_by_kill(daemon_root: Path) -> tuple[str, list[str]]:
    """A state directory as a crash leaves it: a build recorded as running.

    amberd and every process below it are frozen, then killed, so that not
    even the filesystem processes can unmount anything; what was mounted
    goes with amberd's mount namespace.
    """
    d = Daemon(daemon_root).start()
    spec = write_spec(daemon_root / "crashed", LONG_STEP.format(name="crashed"))
    thread, _ = in_background(lambda: d.amber("build", str(spec)))
    with d.connect() as conn:
        build = wait_until(
            lambda: next((b["id"] for b in conn.call("ps")["builds"] if b["step"]), None),
            30,
            "the build to run its step",
        )
    assert d.process is not None
    # The build's mounts, in amberd's own mount namespace.
    mounted = mounts_under(daemon_root / "state" / "mnt", pid=d.process.pid)
    assert mounted, "the build was meant to have its root mounted"
    assert mounts_under(daemon_root) == []  # never in the host's
    victims = [d.process.pid, *descendants(d.process.pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):  # a short-lived helper
                os.kill(pid, sig)
    d.process.wait()
    thread.join(30)
    wait_until(lambda: not any(alive(p) for p in victims), 10, "the killed processes to go")
    # The namespace died with its last process: the crash left no mount behind.
    assert mounts_under(daemon_root) == []
    return build, mounted


def test_ready_is_sent_only_after_recovery(daemon_root: Path, activated):
    build, stale = interrupted_by_kill(daemon_root)
    state = daemon_root / "state"
    assert build_status(state, build)[0] == "running"

    def at_ready() -> tuple[list[str], str]:
        return mounts_under(state / "mnt"), build_status(state, build)[0]

    d = activated(at_ready=at_ready)
    assert d.process is not None
    # The first connection starts amberd; it waits in the socket's queue
    # while amberd recovers, and is answered once amberd is ready.
    status = d.amber("status")
    assert status.returncode == 0, status.stderr
    assert d.notifications is not None
    d.notifications.wait_for("READY=1")
    assert d.notifications.seen_at_ready == ([], "errored"), (stale, d.notifications.seen_at_ready)
    fields = d.notifications.fields()
    recovering = fields.index("STATUS=recovering: cleaning up after the previous amberd")
    assert recovering < fields.index("READY=1")
    assert build_status(state, build) == ("errored", ["errored"])
    assert not d.unused_socket.exists()  # it used the socket it was given
    assert re.search(r"^amberd: +\S+ at ", status.stdout.decode(), re.M)
    for row in ("uptime:", "builds:", "store:", "free:", "last gc:"):
        assert row in status.stdout.decode()
    assert d.stop() == 0


def test_a_build_through_the_activated_socket_and_sigterm_during_one(daemon_root: Path, activated):
    d = activated(grace=2)
    quick = write_spec(
        daemon_root / "quick", '[build]\nname = "quick"\n[[step]]\nname = "s"\nrun = "echo hi"\n'
    )
    code, report = d.build_json(quick)  # this connection starts amberd
    assert code == 0 and report["status"] == "success"
    assert d.notifications is not None
    d.notifications.wait_for("READY=1")

    spec = write_spec(daemon_root / "long", LONG_STEP.format(name="long"))
    thread, _ = in_background(lambda: d.amber("build", "--json", str(spec)))
    running = wait_until(lambda: [b for b in d.running() if b["step"] == "long"], 30, "the step")
    build = running[0]["id"]
    d.notifications.wait_for("STATUS=ready: 1 build(s) running")
    time.sleep(0.3)  # let the step's sandbox start
    assert d.process is not None
    amberd_pid = d.process.pid
    below = descendants(amberd_pid)
    assert mounts_under(daemon_root, pid=amberd_pid)
    # The grace, then cancelled: amberd exits by itself (stop() kills it, and
    # fails this, if it is still there a minute later).
    assert d.stop(signal.SIGTERM) == 0
    thread.join(30)

    fields = d.notifications.fields()
    assert "STOPPING=1" in fields
    assert fields.index("READY=1") < fields.index("STOPPING=1")
    assert any(f.startswith("EXTEND_TIMEOUT_USEC=") for f in fields)
    assert "STATUS=stopping: waiting for 1 running step(s), cancelled in 2 s" in fields
    assert mounts_under(daemon_root) == []
    assert not any(alive(p) for p in below), "amberd left processes behind"
    # Cancelled, hence errored and never cached.
    assert build_status(daemon_root / "state", build) == ("errored", ["errored"])
    db = sqlite3.connect(f"file:{daemon_root / 'state' / 'amber.db'}?mode=ro", uri=True)
    assert db.execute("SELECT count(*) FROM results WHERE build_id = ?", (build,)).fetchone() == (
        0,
    )
    db.close()
    # journald reads one event a line, each with its level.
    lines = d.amberd_log().splitlines()
    assert lines and all(re.match(r"<[0-7]>amber", line) for line in lines), lines
    assert any(line.startswith("<4>amber.manager: cancelling 1 build") for line in lines)


TWO_STEPS = """
[build]
name = "graceful"

[[step]]
name = "short"
run = "sleep 2 && echo done > out"

[[step]]
name = "next"
run = "cat out"
"""


def test_sigterm_lets_a_running_step_finish_within_the_grace(daemon_root: Path, activated):
    d = activated(grace=600)  # longer than stop() waits: waiting all of it fails this
    spec = write_spec(daemon_root / "graceful", TWO_STEPS)
    thread, _ = in_background(lambda: d.amber("build", str(spec)))
    running = wait_until(lambda: [b for b in d.running() if b["step"] == "short"], 30, "step")
    build = running[0]["id"]
    assert d.stop(signal.SIGTERM) == 0  # it waited for the step, not for the whole grace
    thread.join(30)
    # The running step finished and was cached; the next one never started.
    assert build_status(daemon_root / "state", build) == ("errored", ["ran", "skipped"])
    assert mounts_under(daemon_root) == []
    again = activated(grace=30)
    code, report = again.build_json(spec)
    assert code == 0 and [s["status"] for s in report["steps"]] == ["cached", "ran"], report


def test_a_second_sigterm_cancels_at_once(daemon_root: Path, activated):
    d = activated(grace=600)
    spec = write_spec(daemon_root / "long", LONG_STEP.format(name="long"))
    thread, _ = in_background(lambda: d.amber("build", str(spec)))
    wait_until(lambda: [b for b in d.running() if b["step"] == "long"], 30, "the step")
    assert d.process is not None and d.notifications is not None
    d.process.send_signal(signal.SIGTERM)
    d.notifications.wait_for("STOPPING=1")
    assert d.stop(signal.SIGTERM) == 0  # at once: the grace (600 s) outlasts stop()'s wait
    thread.join(30)
    assert mounts_under(daemon_root) == []


FIVE = """
[build]
name = "crash{i}"
base = "host"

[[step]]
name = "prepare"
run = "seq 1 {i}000 > numbers && head -c 300000 /dev/urandom > noise"

[[step]]
name = "wait"
run = "sleep 8 && wc -l numbers"
"""


def test_kill_9_during_five_builds_then_a_restart(daemon_root: Path, activated):
    d = activated(jobs=5)
    specs = [write_spec(daemon_root / f"crash{i}", FIVE.format(i=i)) for i in range(1, 6)]
    threads = [in_background(lambda s=s: d.amber("build", "--json", str(s)))[0] for s in specs]
    running = wait_until(
        lambda: (
            (rows := [b for b in d.running() if b["step"] == "wait"]) and len(rows) == 5 and rows
        ),
        60,
        "five builds in their second step",
    )
    builds = {b["id"] for b in running}
    time.sleep(0.5)  # the sandboxes are running
    assert d.process is not None
    below = descendants(d.process.pid)
    d.process.kill()  # amberd only: its filesystem processes learn it from PR_SET_PDEATHSIG
    d.process.wait()
    assert d.notifications is not None
    d.notifications.close()
    for thread in threads:
        thread.join(60)
    wait_until(lambda: not any(alive(p) for p in below), 20, "amberd's processes to end")

    d2 = activated(jobs=5)
    listing = json.loads(d2.amber("builds", "--json", "--limit", "50").stdout)["builds"]
    assert mounts_under(daemon_root) == []
    after = {b["id"]: b for b in listing if b["id"] in builds}
    assert len(after) == 5 and {b["status"] for b in after.values()} == {"errored"}, after

    fsck = d2.amber("store", "fsck", "--json")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert json.loads(fsck.stdout)["problems"] == [], fsck.stdout
    report = Store.open(daemon_root / "state").fsck()
    assert report.clean and report.temp_files == 0, report

    results: dict[int, tuple[int, dict]] = {}
    again = [
        in_background(lambda i=i, s=s: results.setdefault(i, d2.build_json(s)))[0]
        for i, s in enumerate(specs)
    ]
    for thread in again:
        thread.join(120)
    assert len(results) == 5
    for code, report in results.values():
        assert code == 0 and report["status"] == "success", report
        # What was committed before the crash is still there: only the
        # interrupted step runs again.
        assert [s["status"] for s in report["steps"]] == ["cached", "ran"]
    assert d2.stop() == 0
    assert mounts_under(daemon_root) == []


def test_a_client_retries_while_amberd_restarts(daemon_root: Path):
    first = Daemon(daemon_root).start()
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert first.socket.exists()  # stale: nobody accepts on it
    second = Daemon(daemon_root)
    client, holder = in_background(lambda: second.amber("status"))
    try:
        second.start()
        client.join(30)
        status = holder["result"]
        assert status.returncode == 0, status.stderr
        assert b"uptime:" in status.stdout
    finally:
        assert second.stop() == 0


# --- the unit's hardening, emulated ----------------------------------------------------------


PROTECT_SYSTEM = {"yes": ("/usr", "/boot", "/efi"), "full": ("/usr", "/boot", "/efi", "/etc")}
# DevicePolicy=closed: what systemd always allows (the pseudo devices).
CLOSED_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DEVICE_CLASSES = {"char-pts": "c 136:*"}


def device_rule(spec: str) -> str:
    """``/dev/fuse rw`` or ``char-pts rw`` as a line for a v1 devices.allow."""
    name, _, access = spec.partition(" ")
    if name in DEVICE_CLASSES:
        return f"{DEVICE_CLASSES[name]} {access or 'rwm'}"
    rdev = os.stat(name).st_rdev
    kind = "c" if Path(name).is_char_device() else "b"
    return f"{kind} {os.major(rdev)}:{os.minor(rdev)} {access or 'rwm'}"


def hardening_script(unit: Path, cgroup: Path) -> str:
    """A shell script running its arguments confined the way ``unit`` confines amberd.

    Emulated: ProtectSystem (read-only bind mounts in a private mount
    namespace, as systemd does), CapabilityBoundingSet (setpriv), UMask,
    LimitNOFILE, and DevicePolicy and DeviceAllow in the cgroup v1 devices
    cgroup ``cgroup``.
    """
    service = dict(unit_entries(unit)["Service"])
    lines = ["set -e", "mount --make-rslave /"]
    if "UMask" in service:
        lines.append(f"umask {service['UMask']}")
    if "LimitNOFILE" in service:
        # Raising the hard limit takes CAP_SYS_RESOURCE, which a container
        # may lack: at most what this host allows.
        limit = min(int(service["LimitNOFILE"]), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        lines.append(f"ulimit -n {limit}")
    for path in PROTECT_SYSTEM.get(service.get("ProtectSystem", "no"), ()):
        lines.append(f"if [ -d {path} ]; then mount --rbind {path} {path}; "
                     f"mount -o remount,bind,ro {path}; fi")  # fmt: skip
    if service.get("DevicePolicy") == "closed":
        rules = [device_rule(d) for d in CLOSED_DEVICES]
        rules += [device_rule(d) for d in unit_values(unit, "Service", "DeviceAllow")]
        lines.append(f"echo a > {cgroup}/devices.deny")
        lines += [f"echo '{rule}' > {cgroup}/devices.allow" for rule in rules]
        lines.append(f"echo $$ > {cgroup}/cgroup.procs")
    drop, keep = [], []
    for value in unit_values(unit, "Service", "CapabilityBoundingSet"):
        names = [c.removeprefix("CAP_").lower() for c in value.removeprefix("~").split()]
        (drop if value.startswith("~") else keep).extend(names)
    caps = ",".join([f"-{c}" for c in drop] + (["-all", *[f"+{c}" for c in keep]] if keep else []))
    lines.append(f'exec setpriv --bounding-set {caps} "$@"' if caps else 'exec "$@"')
    return "\n".join(lines) + "\n"


HARDENED = """
[build]
name = "hardened"
base = "host"

[[source]]
path = "data.txt"

[[step]]
name = "as-build-user"
run = "test $(id -u) = 1000 && cat data.txt > copy && grep -q 'CapBnd:.*0000000000000000' /proc/self/status"

[[step]]
name = "as-root"
user = "root"
run = "test $(id -u) = 0 && rm data.txt && chown 1000 copy && ls /proc/1"

[[step]]
name = "on-the-network"
network = true
run = "grep -q '^[a-z0-9]*[[:space:]]00000000[[:space:]]' /proc/net/route"

[[step]]
name = "fails"
run = "test ! -e data.txt && echo 'the compiler said no' && exit 3"
"""

# What a user finds in an out-link: the modes a workstation's umask gives.
MADE_FILES = """
[build]
name = "made-files"
base = "host"

[[step]]
name = "make"
run = "mkdir -p out/bin && echo hello > out/made && cp /bin/true out/bin/tool"

[[step]]
name = "give-a-capability"
user = "root"
run = "setcap cap_net_raw+ep out/bin/tool"

[[step]]
name = "copy-it-up"
user = "root"
run = "chmod 0755 out/bin/tool && getcap out/bin/tool | grep -q cap_net_raw"
"""


def test_amberd_confined_like_its_unit_builds_and_shells(daemon_root: Path):
    """Under amberd.service's hardening: FUSE, overlayfs (a whiteout: a base file removed),
    both sandbox users, a pty shell into the frozen failure."""
    cgroup = Path(f"/sys/fs/cgroup/devices/amber-test-{os.getpid()}")
    if not Path("/sys/fs/cgroup/devices/devices.allow").exists():
        # Under systemd on cgroup v2 the policy is a BPF program, not emulated
        # here: fail rather than pass without the unit's device policy.
        pytest.fail("emulating DevicePolicy needs the cgroup v1 devices controller")
    cgroup.mkdir(exist_ok=True)
    wrapper = daemon_root / "confine.sh"
    wrapper.write_text(hardening_script(UNIT_DIR / "amberd.service", cgroup))
    d = Daemon(daemon_root)
    amberd = BIN / "amberd"
    cmd = ["unshare", "--mount", "sh", str(wrapper), str(amberd), "--state-dir", str(d.state),
           "--socket", str(d.socket), "--stop-grace", "2"]  # fmt: skip
    with open(d.log, "ab") as log:
        d.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=d.env)
    try:
        wait_until(lambda: d.socket.exists() or d.process.poll() is not None, 30, "amberd")
        assert d.process.poll() is None, d.log.read_text()
        status = Path(f"/proc/{d.process.pid}/status").read_text()
        assert "CapBnd:\t000001ffffffffff" not in status  # the bounding set took effect
        assert "Umask:\t0077" in status  # and the unit's umask
        code, made = d.build_json(write_spec(daemon_root / "made", MADE_FILES),
                                  "--out-link", str(daemon_root / "result"))  # fmt: skip
        assert code == 0, (made, d.log.read_text()[-3000:])
        workdir = daemon_root / "result" / "build"
        modes = {p.relative_to(workdir).as_posix(): oct(p.lstat().st_mode & 0o7777)
                 for p in (workdir / "out", *(workdir / "out").rglob("*"))}  # fmt: skip
        assert modes == {"out": "0o755", "out/made": "0o644", "out/bin": "0o755",
                         "out/bin/tool": "0o755"}, modes  # fmt: skip
        spec_dir = daemon_root / "hardened"
        spec_dir.mkdir()
        (spec_dir / "data.txt").write_text("from the spec\n")
        code, report = d.build_json(write_spec(spec_dir, HARDENED))
        assert report["status"] == "failed", (report, d.log.read_text()[-3000:])
        # pasta connects the network step under the unit's capabilities and devices.
        assert [s["status"] for s in report["steps"]] == ["ran", "ran", "ran", "failed"], report
        build = report["build"]
        shell = d.amber("shell", build, "--", "sh", "-c", "cat copy; ls -n copy")
        assert shell.returncode == 0 and shell.stdout.startswith(b"from the spec\n"), shell
        assert b" 1000 " in shell.stdout
        assert b"answer=42" in pty_shell(d, build, b"echo answer=$((6*7)); exit\r")
    finally:
        code = d.stop()
        wait_until(lambda: _rmdir(cgroup), 10, f"{cgroup} to empty")
    assert code == 0, d.log.read_text()[-3000:]


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def pty_shell(d: Daemon, build: str, keys: bytes, timeout: float = 30) -> bytes:
    """``amber shell BUILD`` on a real pseudo-terminal; what it printed after ``keys``."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(BIN / "amber"), "shell", build], stdin=slave, stdout=slave,
                            stderr=slave, env=dict(d.env, TERM="dumb"), start_new_session=True)  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        ready, _, _ = select.select([master], [], [], timeout)  # the shell's first words
        assert ready, "amber shell printed nothing"
        seen = os.read(master, 4096)
        os.write(master, keys)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert proc.wait(timeout=10) == 0, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return seen


# --- the config file ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('jobs = "four"\n', "'jobs'"),  # a wrong type
        ("job = 4\n", "'job'"),  # an unknown option (a typo)
        ('stop-grace = "soon"\n', "'stop-grace'"),
        ("socket-mode = 0o1777\n", "'socket-mode'"),
        ('state-dir = "relative/path"\n', "'state-dir'"),
        ("jobs = 4\n[extra]\nx = 1\n", "'extra'"),
    ],
)
def test_a_bad_config_fails_start_up_naming_the_option(tmp_path: Path, text: str, named: str):
    config = tmp_path / "amberd.toml"
    config.write_text(text)
    notify = Notifications(tmp_path / "notify.sock")
    try:
        proc = subprocess.run(
            [str(BIN / "amberd"), "--config", str(config), "--state-dir", str(tmp_path / "state"),
             "--socket", str(tmp_path / "amberd.sock")],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, NOTIFY_SOCKET=str(notify.path)),
        )  # fmt: skip
        assert proc.returncode == EX_CONFIG, proc.stderr
        first = proc.stderr.strip().splitlines()[0]
        assert first.startswith(f"amberd: {config}: ") and named in first, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "amberd.sock").exists() and not (tmp_path / "state").exists()
        notify.wait_for("STATUS=configuration error:")
    finally:
        notify.close()


def test_the_example_config_documents_every_option_and_is_current(tmp_path: Path):
    regenerate = (
        "regenerate it: python -c 'from amber.daemon.config import example_config; "
        'print(example_config(), end="")\' > systemd/amberd.toml.example'
    )
    text = EXAMPLE.read_text()
    assert text == example_config(), regenerate
    for name in OPTIONS:
        assert len(re.findall(rf"^#{re.escape(name)} = ", text, re.M)) == 1, name
    # Uncommented, every line is valid and (but for the illustrations) the default.
    uncommented = "\n".join(
        line[1:] for line in text.splitlines() if re.match(r"#[a-z-]+ = ", line)
    )
    assert len(uncommented.splitlines()) == len(OPTIONS)
    config_file = tmp_path / "amberd.toml"
    illustrated = {'socket-group = "amber"': 'socket-group = "root"',
                   'admin-group = "amber-admin"': 'admin-group = "root"'}  # fmt: skip
    for example, existing in illustrated.items():
        uncommented = uncommented.replace(example, existing)
    config_file.write_text(uncommented)
    loaded = load_config(config_file)
    defaults = Config()
    for name, (attr, _, _) in OPTIONS.items():
        if name not in ("jobs", "socket-group", "admin-group"):
            assert getattr(loaded, attr) == getattr(defaults, attr), name


def test_install_systemd_into_a_root(tmp_path: Path):
    root = tmp_path / "root"
    script = REPO / "scripts" / "install-systemd"
    first = subprocess.run([str(script), "--root", str(root)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    for name in UNITS:
        assert (root / "etc/systemd/system" / name).read_bytes() == (UNIT_DIR / name).read_bytes()
    assert re.search(r"^amber:x:\d+:$", (root / "etc/group").read_text(), re.M)
    installed = root / "etc/amber/amberd.toml"
    assert installed.read_text() == EXAMPLE.read_text()
    assert load_config(installed) == Config()
    assert (
        "systemctl daemon-reload && systemctl enable --now amberd.socket amber-gc.timer"
        in first.stdout
    )

    installed.write_text("jobs = 3\n")  # an admin's own config is never overwritten
    again = subprocess.run([str(script), "--root", str(root)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert installed.read_text() == "jobs = 3\n"
    assert again.stdout.count("is up to date") == len(UNITS)
    assert (root / "etc/group").read_text().count("amber:") == 1


# --- small pieces -------------------------------------------------------------------


def test_notify_reaches_an_abstract_socket_and_is_quiet_without_one():
    name = f"amber-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.Notifier("@" + name).ready("ready: 0 build(s)\nrunning")
        assert sock.recv(1024) == b"READY=1\nSTATUS=ready: 0 build(s) running"
    assert not systemd.Notifier(None).status("nobody listens")


def test_journal_levels_only_when_stderr_is_the_journal(monkeypatch):
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert systemd.journal_stream()
    # Inherited by a child whose stderr went elsewhere: not the journal any more.
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not systemd.journal_stream()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not systemd.journal_stream()


def test_no_second_amberd_on_a_state_directory(amberd: Daemon, tmp_path: Path):
    proc = subprocess.run(
        [str(BIN / "amberd"), "--state-dir", str(amberd.state), "--socket", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"another amberd (pid {amberd.process.pid}) is using {amberd.state}" in proc.stderr
    assert amberd.amber("status").returncode == 0  # and the first one never noticed
