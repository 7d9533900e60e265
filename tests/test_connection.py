"""The blocking client against a scripted fake daemon over real Unix sockets.

Each fake server is a plain function running in a thread; it speaks the
protocol through the same encoder and decoder as amberd will.
"""

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

import pytest

from amber.client.connection import (
    Connection,
    ConnectionLost,
    DaemonUnreachable,
    default_socket_path,
)
from amber.client.protocol import (
    AmberError,
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    error_reply,
    event,
    hello_reply,
    parse_hello,
    parse_request,
    pick_version,
    result_reply,
)

SERVER_TIMEOUT = 10.0


class Peer:
    """The daemon's end of one connection, as a fake server scripts it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(SERVER_TIMEOUT)
        self.sock = sock
        self.decoder = FrameDecoder()
        self.inbox: deque[dict] = deque()
        self.fds: list[int] = []

    def recv(self) -> dict:
        # recv_fds on every read, as amberd must: descriptors ride on the
        # first byte of their request frame.
        while not self.inbox:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 8)
            self.fds += fds
            if not data:
                raise EOFError("client hung up")
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.popleft()

    def send(self, msg: dict) -> None:
        self.sock.sendall(encode_frame(msg))

    def accept_hello(self, server: str = "amberd/test") -> None:
        versions, _client = parse_hello(self.recv())
        self.send(hello_reply(pick_version(versions), server))

    def expect(self, op: str):
        req = parse_request(self.recv())
        assert req.op == op
        return req

    def at_eof(self) -> bool:
        return self.sock.recv(1) == b""


@pytest.fixture
def serve():
    """Start ``fn(*args)`` in a thread; its failures fail the test at teardown."""
    started = []

    def start(fn, *args):
        errors: list[BaseException] = []

        def target():
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        started.append((thread, errors))

    yield start
    for thread, errors in started:
        thread.join(SERVER_TIMEOUT)
        assert not thread.is_alive(), "fake server did not finish"
        if errors:
            raise errors[0]


@pytest.fixture
def pair(serve):
    """A client Connection (hello done) and a way to script the server side."""
    client_sock, server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = Peer(server_sock)
    conns = []

    def connect(script):
        def run():
            with server_sock:
                peer.accept_hello()
                script(peer)

        serve(run)
        conn = Connection(client_sock)
        conn.hello()
        conns.append(conn)
        return conn

    yield connect
    for conn in conns:
        conn.close()


def listen(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    sock.listen()
    sock.settimeout(SERVER_TIMEOUT)
    return sock


def test_hello_over_a_socketpair(pair):
    conn = pair(lambda peer: None)
    assert conn.version == 1
    assert conn.server == "amberd/test"


def test_open_and_call_over_a_unix_socket(tmp_path, serve):
    path = tmp_path / "s"
    listener = listen(path)

    def server():
        with listener, listener.accept()[0] as sock:
            peer = Peer(sock)
            peer.accept_hello()
            req = peer.expect("ping")
            assert req.args == {"x": 1, "op": "shadowed?"}
            peer.send(result_reply(req.id, {"pong": req.args["x"]}))
            assert peer.at_eof()

    serve(server)
    with Connection.open(path, timeout=SERVER_TIMEOUT) as conn:
        # `op` is positional-only, so an argument may be called "op" too.
        assert conn.call("ping", x=1, op="shadowed?") == {"pong": 1}


def test_error_reply_raises_amber_error_with_its_code(pair):
    def script(peer):
        req = peer.expect("delete")
        peer.send(error_reply(req.id, AmberError(ErrorCode.NOT_FOUND, "no build 'b7'")))
        req = peer.expect("status")
        peer.send(result_reply(req.id, {"builds": 0}))

    conn = pair(script)
    with pytest.raises(AmberError) as info:
        conn.call("delete", build="b7")
    assert (info.value.code, info.value.message) == ("not-found", "no build 'b7'")
    assert conn.call("status") == {"builds": 0}  # the connection is still good


def test_request_ids_increase(pair):
    seen = []

    def script(peer):
        for _ in range(3):
            req = peer.expect("ping")
            seen.append(req.id)
            peer.send(result_reply(req.id))

    conn = pair(script)
    for _ in range(3):
        conn.call("ping")
    assert seen == [1, 2, 3]


def test_stream_yields_events_as_they_arrive(pair):
    first_seen = threading.Event()

    def script(peer):
        req = peer.expect("build")
        peer.send(event(req.id, "log", {"line": "configure"}))
        # Nothing more is sent until the client has printed the first line:
        # events are not held back until the reply.
        assert first_seen.wait(SERVER_TIMEOUT)
        peer.send(event(req.id, "log", {"line": "make"}))
        peer.send(event(req.id, "step-finished", {"step": 1}))
        peer.send(result_reply(req.id, {"build": "b1", "status": "success"}))

    conn = pair(script)
    stream = conn.stream("build", spec="spec.toml")
    lines = []
    for ev in stream:
        assert ev["id"] == stream.id
        if ev["event"] == "log":
            lines.append(ev["data"]["line"])
        first_seen.set()
    assert lines == ["configure", "make"]
    assert stream.done
    assert stream.wait() == {"build": "b1", "status": "success"}


def test_stream_ending_in_an_error_raises_from_the_loop(pair):
    def script(peer):
        req = peer.expect("build")
        peer.send(event(req.id, "log", {"line": "oops"}))
        peer.send(error_reply(req.id, AmberError(ErrorCode.SPEC_ERROR, "bad step")))

    conn = pair(script)
    stream = conn.stream("build")
    events = []
    with pytest.raises(AmberError) as info:
        for ev in stream:
            events.append(ev["event"])
    assert events == ["log"]
    assert info.value.code == "spec-error"
    with pytest.raises(AmberError, match="spec-error"):
        stream.wait()


def test_stream_returns_its_result_to_yield_from(pair):
    def script(peer):
        req = peer.expect("build")
        peer.send(event(req.id, "log", {"line": "x"}))
        peer.send(result_reply(req.id, {"n": 1}))

    conn = pair(script)

    def relay():
        return (yield from conn.stream("build"))

    gen = relay()
    assert next(gen)["event"] == "log"
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == {"n": 1}


def test_wait_skips_unread_events(pair):
    def script(peer):
        req = peer.expect("build")
        for i in range(100):
            peer.send(event(req.id, "log", {"line": str(i)}))
        peer.send(result_reply(req.id, {"done": True}))

    conn = pair(script)
    assert conn.call("build") == {"done": True}


def test_abandoned_stream_is_drained_by_the_next_request(pair):
    def script(peer):
        build = peer.expect("build")
        peer.send(event(build.id, "log", {"line": "1"}))
        status = peer.expect("status")
        # Late traffic of the abandoned build, then the answer to status.
        peer.send(event(build.id, "log", {"line": "2"}))
        peer.send(result_reply(build.id, {"build": "b1"}))
        peer.send(result_reply(status.id, {"ok": "yes"}))

    conn = pair(script)
    stream = conn.stream("build")
    assert next(stream)["data"] == {"line": "1"}
    assert conn.call("status") == {"ok": "yes"}  # implicitly abandons the stream
    assert stream.done


def test_fd_passing(pair):
    def script(peer):
        req = peer.expect("shell")
        assert req.fds == 1
        assert len(peer.fds) == 1
        [fd] = peer.fds
        os.write(fd, b"hello from amberd\n")
        os.close(fd)
        peer.send(result_reply(req.id, {"exit": 0}))

    conn = pair(script)
    r, w = os.pipe()
    try:
        result = conn.request("shell", {"build": "b1"}, fds=[w]).wait()
        os.close(w)
        w = -1
        assert result == {"exit": 0}
        assert os.read(r, 100) == b"hello from amberd\n"
        assert os.read(r, 100) == b""  # the daemon's copy is closed, ours too
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_fds_with_a_frame_larger_than_one_send(pair):
    big = "x" * (4 * 1024 * 1024)

    def script(peer):
        req = peer.expect("shell")
        assert req.args["pad"] == big
        assert len(peer.fds) == req.fds == 2
        for fd in peer.fds:
            os.close(fd)
        peer.send(result_reply(req.id))

    conn = pair(script)
    r, w = os.pipe()
    try:
        assert conn.request("shell", {"pad": big}, fds=[r, w]).wait() == {}
    finally:
        os.close(r)
        os.close(w)


def test_daemon_hanging_up_mid_call(pair):
    def script(peer):
        peer.expect("build")
        peer.sock.shutdown(socket.SHUT_RDWR)

    conn = pair(script)
    with pytest.raises(ConnectionLost) as info:
        conn.call("build")
    assert info.value.code == ErrorCode.CONNECTION_LOST
    with pytest.raises(ConnectionLost):
        conn.call("status")


def test_reply_for_an_unknown_request_breaks_the_connection(pair):
    def script(peer):
        req = peer.expect("status")
        peer.send(result_reply(req.id + 41))
        assert peer.at_eof()

    conn = pair(script)
    with pytest.raises(ProtocolError) as info:
        conn.call("status")
    assert info.value.code == ErrorCode.BAD_REPLY


def test_oversized_frame_from_the_daemon(serve):
    client_sock, server_sock = socket.socketpair()

    def server():
        with server_sock:
            peer = Peer(server_sock)
            peer.accept_hello()
            peer.expect("dump")
            server_sock.sendall((1 << 30).to_bytes(4, "big"))
            assert peer.at_eof()

    serve(server)
    with Connection(client_sock, max_frame=1024) as conn:
        conn.hello()
        with pytest.raises(ProtocolError, match="frame-too-large"):
            conn.call("dump")


def test_timeout_then_late_reply_is_dropped(tmp_path, serve):
    path = tmp_path / "s"
    listener = listen(path)
    timed_out = threading.Event()

    def server():
        with listener, listener.accept()[0] as sock:
            peer = Peer(sock)
            peer.accept_hello()
            slow = peer.expect("slow")
            assert timed_out.wait(SERVER_TIMEOUT)
            fast = peer.expect("fast")
            peer.send(result_reply(slow.id, {"late": True}))
            peer.send(result_reply(fast.id, {"fast": True}))

    serve(server)
    with Connection.open(path, timeout=SERVER_TIMEOUT) as conn:
        conn.settimeout(0.2)
        with pytest.raises(AmberError) as info:
            conn.call("slow")
        assert info.value.code == ErrorCode.TIMEOUT
        timed_out.set()
        conn.settimeout(SERVER_TIMEOUT)
        assert conn.call("fast") == {"fast": True}


def test_protocol_version_refused(tmp_path, serve):
    path = tmp_path / "s"
    listener = listen(path)

    def server():
        with listener, listener.accept()[0] as sock:
            peer = Peer(sock)
            peer.recv()
            peer.send(error_reply(0, AmberError(ErrorCode.PROTOCOL_VERSION, "only v2")))

    serve(server)
    with pytest.raises(AmberError) as info:
        Connection.open(path, timeout=SERVER_TIMEOUT)
    assert info.value.code == ErrorCode.PROTOCOL_VERSION
    assert not isinstance(info.value, DaemonUnreachable)


def test_retry_for_waits_for_a_late_socket(tmp_path, serve):
    path = tmp_path / "s"

    def late_daemon():
        time.sleep(0.3)
        with listen(path) as listener, listener.accept()[0] as sock:
            peer = Peer(sock)
            peer.accept_hello()
            req = peer.expect("status")
            peer.send(result_reply(req.id, {"up": True}))

    serve(late_daemon)
    with Connection.open(path, timeout=SERVER_TIMEOUT, retry_for=SERVER_TIMEOUT) as conn:
        assert conn.call("status") == {"up": True}


def test_retry_for_rides_out_a_daemon_hanging_up_during_hello(tmp_path, serve):
    path = tmp_path / "s"
    listener = listen(path)

    def restarting_daemon():
        with listener:
            with listener.accept()[0]:
                pass  # an old daemon on its way out
            with listener.accept()[0] as sock:
                Peer(sock).accept_hello("amberd/new")

    serve(restarting_daemon)
    with Connection.open(path, timeout=SERVER_TIMEOUT, retry_for=SERVER_TIMEOUT) as conn:
        assert conn.server == "amberd/new"


def test_daemon_unreachable_without_a_socket(tmp_path):
    with pytest.raises(DaemonUnreachable) as info:
        Connection.open(tmp_path / "absent")
    assert info.value.code == ErrorCode.UNREACHABLE
    assert "absent" in info.value.message


class VirtualClock:
    """``time`` for the connection module: sleeping moves the clock, nothing waits."""

    def __init__(self, at: dict[float, Callable[[], None]] | None = None) -> None:
        self.now = 0.0
        self.at = dict(at or {})  # virtual time -> what happens then

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for when in sorted(w for w in self.at if w <= self.now):
            self.at.pop(when)()


def test_daemon_unreachable_gives_up_after_retry_for(tmp_path, monkeypatch):
    import amber.client.connection as connection

    clock = VirtualClock()
    monkeypatch.setattr(connection, "time", clock)
    with pytest.raises(DaemonUnreachable, match="cannot reach amberd"):
        Connection.open(tmp_path / "absent", retry_for=0.3)
    assert clock.now == pytest.approx(0.3)  # tried until the deadline, and no longer


def test_retry_for_connects_to_a_socket_that_appears_before_the_deadline(tmp_path, monkeypatch):
    import amber.client.connection as connection

    path = tmp_path / "s"
    listener: list[socket.socket] = []

    def daemon_starts() -> None:
        listener.append(listen(path))
        threading.Thread(target=answer, daemon=True).start()

    def answer() -> None:
        Peer(listener[0].accept()[0]).accept_hello("amberd/late")

    clock = VirtualClock(at={0.25: daemon_starts})
    monkeypatch.setattr(connection, "time", clock)
    try:
        with Connection.open(path, timeout=SERVER_TIMEOUT, retry_for=0.3) as conn:
            assert conn.server == "amberd/late"
    finally:
        for sock in listener:
            sock.close()


def test_stale_socket_file_is_unreachable(tmp_path):
    path = tmp_path / "s"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(path))
    dead.close()  # the file stays; nobody listens (ECONNREFUSED)
    with pytest.raises(DaemonUnreachable, match="refused"):
        Connection.open(path)


def test_default_socket_path(tmp_path):
    """Everyone uses the system daemon's socket, as docker's clients do; AMBER_SOCKET wins."""
    system = tmp_path / "run" / "amberd.sock"
    env = {"AMBER_SYSTEM_SOCKET": str(system), "XDG_RUNTIME_DIR": str(tmp_path / "user")}
    assert default_socket_path({**env, "AMBER_SOCKET": "/x/s"}, euid=0) == "/x/s"
    assert default_socket_path({**env, "AMBER_SOCKET": "/x/s"}, euid=1000) == "/x/s"
    assert default_socket_path({}, euid=0) == "/run/amber/amberd.sock"
    # Nothing there yet: the system socket, which the error then names.
    assert default_socket_path(env, euid=0) == str(system)
    assert default_socket_path(env, euid=1000) == str(system)
    # A per-user socket counts only while there is no system one.
    user = tmp_path / "user" / "amber" / "amberd.sock"
    user.parent.mkdir(parents=True)
    user.touch()
    assert default_socket_path(env, euid=1000) == str(user)
    assert default_socket_path(env, euid=0) == str(system)  # root: always the system one
    system.parent.mkdir()
    system.touch()
    assert default_socket_path(env, euid=1000) == str(system)
    del env["XDG_RUNTIME_DIR"]
    system.unlink()
    assert default_socket_path(env, euid=4242) == str(system)  # /tmp/amber-4242 is absent
