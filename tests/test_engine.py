"""amber export --to-engine and --export-on-failure engine, against a real Docker Engine API.

The engines are podman's API service (``podman system service``) on a private
socket and vfs storage, whose image is then run with the podman command on the
same storage, and Debian's dockerd on private directories, whose image is run
with ``docker run``: what the engine really stored.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon
from rootfs import make_busybox_root
from tools import need, run

SPEC = """
[build]
name = "engined"
base = "bb"
env = { FLAVOUR = "smoky" }

[[step]]
name = "prepare"
run = "mkdir -p src && echo kept > src/kept && echo doomed > src/doomed"

[[step]]
name = "compile"
cwd = "src"
run = "rm doomed && echo half-built > wrote-before-failing && exit 3"
"""

# What podman here needs to run a container (DESIGN.md, machine facts).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"

[engine]
runtime = "runc"
"""


class Engine:
    def __init__(self, podman: list[str], sock: Path, env: dict[str, str]):
        self.podman = podman
        self.socket = sock
        self.env = env

    def images(self) -> list[str]:
        out = run([*self.podman, "images", "--format", "{{.Repository}}:{{.Tag}}"], env=self.env)
        return out.stdout.split()

    def sh(self, image: str, script: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.podman, "run", "--rm", image, "/bin/sh", "-c", script],
            capture_output=True, text=True, env=self.env,
        )  # fmt: skip


@pytest.fixture
def engine(podman: list[str], tmp_path: Path) -> Iterator[Engine]:
    """podman's Docker-compatible API on a private socket, stopped whatever happens."""
    conf = tmp_path / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    # A directory anyone may traverse: only the socket's own mode (0600) guards it.
    top = Path(tempfile.mkdtemp(prefix="amber-engine-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    sock = top / "engine.sock"
    log = open(tmp_path / "engine.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*podman, "system", "service", "--time=0", f"unix://{sock}"],
        stdout=log, stderr=log, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "engine.log").read_text())
            time.sleep(0.1)
        yield Engine(podman, sock, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(top, ignore_errors=True)


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
            return b" 200 " in s.recv(100)
    except OSError:
        return False


@pytest.fixture
def frozen(amberd: Daemon) -> tuple[Daemon, Path, str]:
    root = amberd.root / "bbroot"
    make_busybox_root(root)
    assert amberd.amber("image", "import", "bb", f"dir:{root}").returncode == 0
    spec_dir = amberd.root / "spec"
    spec_dir.mkdir()
    spec = spec_dir / "spec.toml"
    spec.write_text(SPEC)
    code, report = amberd.build_json(spec)
    assert code == 1 and report["frozen"], report
    return amberd, spec, report["build"]


FAILED_STATE = (
    'test "$(cat /build/src/wrote-before-failing)" = half-built && ! test -e /build/src/doomed'
    ' && test "$PWD" = /build/src && test "$FLAVOUR" = smoky'
)


def test_export_to_engine_loads_the_failed_state(frozen, engine: Engine):
    amberd, _, build = frozen
    done = amberd.amber(
        "export", build, "--to-engine", "--engine-socket", str(engine.socket),
        "--tag", "debug/engined:failed",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"loaded build" in done.stdout and b"debug/engined:failed" in done.stdout
    assert any(i.endswith("debug/engined:failed") for i in engine.images()), engine.images()
    ran = engine.sh("debug/engined:failed", FAILED_STATE)
    assert ran.returncode == 0, ran.stderr
    inspect = json.loads(run([*engine.podman, "image", "inspect", "debug/engined:failed"],
                             env=engine.env).stdout)  # fmt: skip
    assert inspect[0]["Labels"]["org.amber.build"] == build
    assert len(inspect[0]["RootFS"]["Layers"]) == 3  # base and sources, one layer per step


def test_export_to_engine_before_the_failure_and_by_default_name(frozen, engine: Engine):
    amberd, _, build = frozen
    env = dict(amberd.env, DOCKER_HOST=f"unix://{engine.socket}")
    done = subprocess.run([str(BIN / "amber"), "export", build, "--before", "--to-engine"],
                          capture_output=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = f"localhost/amber/{build}:compile-before"
    assert image in engine.images()
    ran = engine.sh(image, "test -e /build/src/doomed && ! test -e /build/src/wrote-before-failing")
    assert ran.returncode == 0, ran.stderr


def test_export_on_failure_engine(frozen, engine: Engine):
    amberd, spec, _ = frozen
    proc = amberd.amber(
        "build", "--retry-failed", "--export-on-failure", "engine", "--export-ref", "onfail:latest",
        "--engine-socket", str(engine.socket), str(spec),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # the build's outcome, not the export's
    assert b"loaded build" in proc.stdout, proc.stderr
    loaded = [i for i in engine.images() if i.endswith("onfail:latest")]
    assert loaded, engine.images()
    ran = engine.sh(loaded[0], FAILED_STATE)
    assert ran.returncode == 0, ran.stderr


def test_an_engine_error_is_shown_and_nothing_loaded(frozen, engine: Engine, tmp_path: Path):
    amberd, _, build = frozen
    missing = amberd.amber(
        "export", build, "--to-engine", "--engine-socket", str(tmp_path / "none")
    )
    assert missing.returncode == 1
    assert b"no container engine socket at" in missing.stderr
    not_engine = tmp_path / "not-engine.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(not_engine))
        listener.listen()
        # An HTTP server that is not an engine: it says 404 to everything.
        proc = subprocess.Popen(
            ["python3", "-c", _NOT_ENGINE, str(listener.fileno())], pass_fds=[listener.fileno()]
        )
        try:
            done = amberd.amber("export", build, "--to-engine", "--engine-socket", str(not_engine))
        finally:
            proc.kill()
            proc.wait()
    assert done.returncode == 1
    assert b"does not answer as a Docker Engine API" in done.stderr, done.stderr
    # amberd's own refusal ends the upload unfinished: the engine loads nothing.
    before = engine.images()
    gone = amberd.amber(
        "export", "no-such-build", "--to-engine", "--engine-socket", str(engine.socket)
    )
    assert gone.returncode == 1 and b"no build" in gone.stderr
    assert engine.images() == before


_NOT_ENGINE = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.1 404 Not Found\\r\\nContent-Length: 9\\r\\n\\r\\nnot found")
    c.close()
"""


def test_a_user_reaches_only_the_engines_they_can_open(daemon_root: Path, engine: Engine):
    """amberd is root, but the engine connection is the user's: a socket they cannot open stays shut."""
    config = daemon_root / "amberd.toml"
    config.write_text("socket-mode = 0o666\n")
    d = Daemon(daemon_root).start("--config", str(config))
    try:
        other = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", str(BIN / "amber")]
        env = dict(d.env, HOME="/tmp")
        build = "engined-1"
        export = [*other, "export", build, "--to-engine", "--engine-socket", str(engine.socket)]
        assert engine.socket.stat().st_mode & 0o777 == 0o600  # root's alone
        proc = subprocess.run(export, capture_output=True, env=env)
        assert proc.returncode == 1
        assert b"cannot open" in proc.stderr and b"permission denied" in proc.stderr, proc.stderr
        # Opened up, the same command gets through to amberd, which then judges the build.
        os.chmod(engine.socket, 0o666)
        proc = subprocess.run(export, capture_output=True, env=env)
        assert proc.returncode == 1
        assert b"no build" in proc.stderr, proc.stderr
    finally:
        assert d.stop() == 0


def test_the_default_engine_socket(monkeypatch, tmp_path: Path):
    from amber.client import engine

    docker, podman_sock = tmp_path / "docker.sock", tmp_path / "podman.sock"
    monkeypatch.setattr(engine, "DOCKER_SOCKET", str(docker))
    monkeypatch.setattr(engine, "PODMAN_SOCKET", str(podman_sock))
    assert engine.default_socket({"DOCKER_HOST": "unix:///x/d.sock"}) == "/x/d.sock"
    assert engine.default_socket({"DOCKER_HOST": "tcp://1.2.3.4:2375"}) == str(docker)
    assert engine.default_socket({}) == str(docker)  # nothing there: docker's is the one to name
    podman_sock.touch()
    assert engine.default_socket({}) == str(podman_sock)
    docker.touch()
    assert engine.default_socket({}) == str(docker)


@pytest.fixture
def dockerd() -> Iterator[dict[str, str]]:
    """Debian's dockerd on private directories (no systemd needed); the env to reach it."""
    need("dockerd", "docker")
    top = Path(tempfile.mkdtemp(prefix="amber-dockerd-", dir="/var/tmp"))
    sock = top / "docker.sock"
    log = open(top / "log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["dockerd", "--host", f"unix://{sock}", "--data-root", str(top / "root"),
         "--exec-root", str(top / "exec"), "--pidfile", str(top / "pid"),
         "--iptables=false", "--bridge=none"],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((top / "log").read_text())
            time.sleep(0.2)
        yield dict(os.environ, DOCKER_HOST=f"unix://{sock}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["umount", "-R", str(top / "exec")], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def _docker_sh(env: dict[str, str], image: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "run", "--rm", "--network", "none", image, "/bin/sh", "-c", script],
                          capture_output=True, text=True, env=env)  # fmt: skip


def test_dockerd_takes_the_export_and_the_archives(frozen, dockerd: dict[str, str]):
    amberd, _, build = frozen
    env = dict(amberd.env, DOCKER_HOST=dockerd["DOCKER_HOST"])
    done = subprocess.run([str(BIN / "amber"), "export", build, "--to-engine", "--tag", "dbg:failed"],
                          capture_output=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ran = _docker_sh(dockerd, "dbg:failed", FAILED_STATE)
    assert ran.returncode == 0, ran.stderr
    for fmt in ("oci", "docker-archive"):
        out = amberd.root / f"export-{fmt}.tar"
        assert amberd.amber("export", build, "-o", str(out), "--format", fmt).returncode == 0
        loaded = run(["docker", "load", "-i", str(out)], env=dockerd)
        assert f"localhost/amber/{build}:compile" in loaded.stdout, loaded.stdout
        ran = _docker_sh(dockerd, f"localhost/amber/{build}:compile", FAILED_STATE)
        assert ran.returncode == 0, (fmt, ran.stderr)
        run(["docker", "rmi", f"localhost/amber/{build}:compile"], env=dockerd)
