"""The ``amber`` command without amberd: parsing, rendering, exit codes.

Commands run through the real ``main([...])`` against a scripted fake daemon
(a thread serving a Unix socket in tmp_path), so what is checked is what a
user sees: stdout, stderr and the exit code.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections import deque

import pytest

from amber.client import cli
from amber.client.autostart import (
    autostart_argv,
    may_autostart,
    start_daemon,
    unreachable_hint,
    wait_for_daemon,
)
from amber.client.commands import frozen, local, store
from amber.client.errors import AmberError, DaemonUnreachable
from amber.client.live import LiveBuildView
from amber.client.protocol import (
    FrameDecoder,
    encode_frame,
    error_reply,
    event,
    hello_reply,
    parse_hello,
    parse_request,
    pick_version,
    result_reply,
)
from amber.client.render import (
    BuildState,
    LineSplitter,
    PlainBuildView,
    build_json,
    human_bytes,
    human_seconds,
    render_builds,
    render_diff,
    render_ps,
    render_status,
)

SERVER_TIMEOUT = 10.0
SPEC = '[build]\nname = "zlib"\nbase = "host"\n\n[[step]]\nname = "extract"\nrun = "true"\n'


# --- a fake amberd -------------------------------------------------------------------


class Peer:
    """The daemon's end of one connection, as a test scripts it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(SERVER_TIMEOUT)
        self.sock = sock
        self.decoder = FrameDecoder()
        self.inbox: deque[dict] = deque()
        self.fds: list[int] = []

    def recv(self) -> dict:
        while not self.inbox:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 8)
            self.fds += fds
            if not data:
                raise EOFError("client hung up")
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.popleft()

    def send(self, msg: dict) -> None:
        self.sock.sendall(encode_frame(msg))

    def expect(self, op: str):
        req = parse_request(self.recv())
        assert req.op == op
        return req

    def event(self, req, name: str, data: dict) -> None:
        self.send(event(req.id, name, data))

    def reply(self, req, result: dict) -> None:
        self.send(result_reply(req.id, result))

    def fail(self, req, code: str, message: str) -> None:
        self.send(error_reply(req.id, AmberError(code, message)))


@pytest.fixture(autouse=True)
def no_autostart(monkeypatch):
    """No test here may start a real amberd on the system socket by mistake."""
    monkeypatch.setenv("AMBER_NO_AUTOSTART", "1")


@pytest.fixture
def daemon(tmp_path):
    """``daemon(script)`` serves one connection with ``script(peer)``; returns the socket path.

    The script's failures (a wrong request, say) fail the test at teardown.
    """
    threads: list[tuple[threading.Thread, list[BaseException]]] = []

    def start(script) -> str:
        path = str(tmp_path / f"d{len(threads)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        listener.settimeout(SERVER_TIMEOUT)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with listener:
                    sock, _ = listener.accept()
                with sock:
                    peer = Peer(sock)
                    versions, _client = parse_hello(peer.recv())
                    peer.send(hello_reply(pick_version(versions), "amberd/test"))
                    script(peer)
                    for fd in peer.fds:
                        os.close(fd)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append((thread, errors))
        return path

    yield start
    for thread, errors in threads:
        thread.join(SERVER_TIMEOUT)
        assert not thread.is_alive(), "fake daemon did not finish"
        if errors:
            raise errors[0]


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "zlib.toml"
    path.write_text(SPEC)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def steps_result(build: str, status: str, steps: list[tuple[str, str, int | None]]) -> dict:
    failed = next((n for n, s, _ in steps if s in ("failed", "cached-failure", "errored")), None)
    return {
        "build": build,
        "name": "zlib",
        "status": status,
        "frozen": status == "failed",
        "failed_step": failed,
        "error": None,
        "steps": [
            {"name": n, "status": s, "exit_code": c, "seconds": 0.5, "snapshot_seconds": 0.25}
            for n, s, c in steps
        ],
    }


def serve_build(
    peer: Peer,
    build: str,
    outcome: list[tuple[str, str, int | None]],
    status: str,
    seen: dict | None = None,
):
    """Answer one build request the way amberd does: build, step and log events, then the result.

    The request goes into ``seen`` before the answer: the client may have
    finished, and the test read ``seen``, by the time this returns.
    """
    req = peer.expect("build")
    if seen is not None:
        seen["req"] = req
    names = [name for name, _, _ in outcome]
    peer.event(req, "build", {"build": build, "name": "zlib", "steps": names, "base": "host"})
    for index, (name, step_status, code) in enumerate(outcome):
        if step_status in ("ran", "failed"):
            peer.event(
                req, "step", {"build": build, "index": index, "name": name, "status": "running"}
            )
            peer.event(
                req,
                "log",
                {"build": build, "step": name, "data": b"out of " + name.encode() + b"\n"},
            )
        peer.event(
            req,
            "step",
            {
                "build": build,
                "index": index,
                "name": name,
                "status": step_status,
                "exit_code": code,
                "seconds": 0.5,
            },
        )
    peer.reply(req, steps_result(build, status, outcome))
    return req


# --- units and small pieces ------------------------------------------------------------


def test_human_units():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
    assert human_seconds(3.24) == "3.2s"
    assert human_seconds(75) == "1m15s"
    assert human_seconds(3 * 3600 + 120) == "3h02m"
    assert human_seconds(None) == "-"


def test_line_splitter_keeps_characters_and_lines_whole_across_chunks():
    splitter = LineSplitter()
    euro = "€".encode()
    assert splitter.feed(b"caf" + euro[:1]) == []
    assert splitter.feed(euro[1:] + b"\nsecond li") == ["caf€"]
    assert splitter.feed(b"ne\r\n10%\r50%\r100%\nlast") == ["second line", "100%"]
    assert splitter.flush() == "last"
    assert splitter.flush() is None


def test_exit_status_of_a_shell():
    assert frozen.exit_status(0) == 0
    assert frozen.exit_status(7) == 7
    assert frozen.exit_status(-9) == 137  # killed by SIGKILL, as a shell says
    assert frozen.exit_status(None) == 125  # no status from amberd: amber's failure, not CMD's
    assert frozen.exit_status(300) == 125


def test_exit_codes_of_errors():
    assert cli.exit_code_for(AmberError("spec-error", "x")) == 2
    assert cli.exit_code_for(AmberError("bad-args", "x")) == 2
    assert cli.exit_code_for(DaemonUnreachable("x")) == 3
    assert cli.exit_code_for(AmberError("connection-lost", "x")) == 3
    assert cli.exit_code_for(AmberError("not-found", "x")) == 1
    assert cli.exit_code_for(AmberError("some-future-code", "x")) == 1


# --- parsing ---------------------------------------------------------------------------


def test_daemon_arguments_pass_through_untouched():
    head, rest = cli.split_passthrough(["--socket", "/s", "daemon", "--state-dir", "/x", "--help"])
    assert head == ["--socket", "/s", "daemon"]
    assert rest == ["--state-dir", "/x", "--help"]
    assert local.daemon_argv("/s", rest)[1:] == ["-m", "amber.daemon.main", "--socket", "/s", *rest]
    assert local.daemon_argv("/s", ["--socket=/t"])[3:] == ["--socket=/t"]
    assert local.daemon_argv(None, [])[0] == sys.executable


def test_shell_command_after_double_dash():
    head, rest = cli.split_passthrough(["shell", "b1", "--before", "--", "sh", "-c", "ls --all"])
    assert head == ["shell", "b1", "--before"]
    assert rest == ["sh", "-c", "ls --all"]
    ns = cli.build_parser("shell").parse_args(head)
    assert (ns.build, ns.before, ns.step) == ("b1", True, None)
    assert cli.split_passthrough(["build", "--", "-odd.toml"]) == (
        ["build", "--", "-odd.toml"],
        None,
    )


def test_command_word():
    assert cli.command_of(["--socket", "/s", "build", "x"]) == "build"
    assert cli.command_of(["--version"]) is None
    assert cli.command_of(["-h", "build"]) is None  # top-level help lists every command


def test_socket_option_before_or_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["--socket", "/a", "ps"]).socket == "/a"
    assert parser.parse_args(["ps", "--socket", "/b"]).socket == "/b"
    assert parser.parse_args(["image", "ls", "--socket", "/c"]).socket == "/c"
    assert parser.parse_args(["ps"]).socket is None


def test_build_options():
    ns = cli.build_parser("build").parse_args(
        ["build", "a.toml", "b.toml", "--json", "--on-error", "continue"]
    )
    assert ns.specs == ["a.toml", "b.toml"]
    assert (ns.json, ns.on_error, ns.retry_failed, ns.detach) == (True, "continue", False, False)


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "build")[0] == 2
    code, _, err = run(capsys, "gc", "--max-freed", "10X")
    assert code == 2
    assert "invalid size" in err
    code, _, err = run(capsys, "export", "b1")
    assert code == 2
    assert "-o/--output" in err
    code, _, err = run(capsys, "nonsense")
    assert code == 2
    assert "'nonsense' is not an amber command (`amber --help` lists them)" in err


def test_a_mistyped_command_names_the_nearest_one(capsys):
    code, out, err = run(capsys, "biuld", "spec.toml")
    assert (code, out) == (2, "")
    assert "amber: error: 'biuld' is not an amber command; did you mean 'build'?" in err
    code, _, err = run(capsys, "image", "lss")
    assert code == 2
    assert "'lss' is not an amber image command; did you mean 'ls'?" in err
    code, _, err = run(capsys, "build", "--on-error", "quitt", "x.toml")
    assert code == 2 and "did you mean 'quit'?" in err


def test_an_unknown_flag_shows_its_commands_usage(capsys):
    code, _, err = run(capsys, "build", "--bogus", "x.toml")
    assert code == 2
    assert err.startswith("usage: amber build ")
    assert "amber build: error: unrecognized arguments: --bogus" in err
    code, _, err = run(capsys, "pin", "ls", "--bogus")
    assert code == 2 and err.startswith("usage: amber pin ls ")


def test_shell_usage_errors_exit_125_not_a_status_cmd_could_have(capsys, tmp_path):
    assert run(capsys, "shell")[0] == 125
    assert run(capsys, "shell", "b1", "--bogus", "--", "true")[0] == 125
    assert run(capsys, "shell", "--help")[0] == 0
    code, _, err = run(capsys, "--socket", str(tmp_path / "none.sock"), "shell", "b1", "--", "true")
    assert code == 125 and "cannot reach amberd" in err
    code, out, _ = run(capsys, "shell", "--help")
    assert "125  amber's own failure" in out


def test_help_everywhere(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "amber build" in out and "exit status" in out
    for command in ("build", "shell", "export", "gc", "log"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and f"amber {command}" in out
    code, out, _ = run(capsys, "pin", "add", "--help")
    assert code == 0 and "TARGET" in out
    code, _, err = run(capsys, "image")  # a group alone shows what it has
    assert code == 2 and "import" in err and "ls" in err
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("amber ")
    code, out, _ = run(capsys, "--help")
    assert "AMBER_SYSTEM_SOCKET" in out and "125 for any failure of amber's own" in out


def test_build_option_combinations_refused_before_connecting(capsys, spec, tmp_path):
    nowhere = str(tmp_path / "nobody.sock")
    code, _, err = run(capsys, "--socket", nowhere, "build", str(spec), str(spec), "--pin", "x")
    assert (code, "one SPEC" in err) == (2, True)
    code, _, err = run(
        capsys, "--socket", nowhere, "build", str(spec), "--export-on-failure", "registry"
    )
    assert (code, "--export-ref" in err) == (2, True)
    code, _, err = run(capsys, "--socket", nowhere, "build", str(spec), "--export-path", "x.tar")
    assert (code, "--export-on-failure" in err) == (2, True)


# --- builds against the fake daemon ---------------------------------------------------------


def test_build_success(capsys, daemon, spec):
    seen = {}

    def script(peer):
        serve_build(
            peer, "b1", [("extract", "cached", 0), ("configure", "ran", 0)], "success", seen
        )

    path = daemon(script)
    code, out, err = run(capsys, "--socket", path, "build", str(spec))
    assert code == 0, err
    args = seen["req"].args
    assert args == {
        "spec_text": SPEC,
        "spec_path": str(spec),
        "retry_failed": False,
        "pin": None,
        "out_link": None,
        "detach": False,
    }
    assert "[zlib] step extract: cached\n" in out
    assert "[zlib] configure | out of configure\n" in out
    assert "[zlib] step configure: ran in 0.5s\n" in out
    assert "success: build b1 (1 ran, 1 cached)" in out


def test_build_sends_absolute_paths(capsys, daemon, spec, monkeypatch):
    seen = {}

    def script(peer):
        serve_build(peer, "b1", [("extract", "cached", 0)], "success", seen)

    path = daemon(script)
    monkeypatch.chdir(spec.parent)
    argv = ["build", "zlib.toml", "--pin", "main/x", "--out-link", "result", "--retry-failed"]
    code, _, _ = run(
        capsys, "--socket", path, *argv, "--export-on-failure", "oci", "--export-path", "f.tar"
    )
    assert code == 0
    args = seen["req"].args
    assert args["spec_path"] == str(spec)
    assert args["out_link"] == str(spec.parent / "result")
    assert (args["pin"], args["retry_failed"]) == ("main/x", True)
    assert args["export_on_failure"] == "oci"
    assert args["export_path"] == str(spec.parent / "f.tar")


def test_build_failure_says_how_to_enter_it(capsys, daemon, spec):
    path = daemon(
        lambda peer: serve_build(
            peer, "b2", [("extract", "ran", 0), ("make", "failed", 2)], "failed"
        )
    )
    code, out, _ = run(capsys, "--socket", path, "build", str(spec))
    assert code == 1
    assert "[zlib] step make: failed (exit 2) after 0.5s" in out
    assert "failed at step make: build b2 is frozen" in out
    assert "amber shell b2" in out
    assert "amber shell --before b2" in out
    assert "amber diff b2" in out


def test_cached_failure_suggests_retry(capsys, daemon, spec):
    path = daemon(lambda peer: serve_build(peer, "b3", [("make", "cached-failure", 2)], "failed"))
    code, out, _ = run(capsys, "--socket", path, "build", str(spec))
    assert code == 1
    assert "step make: cached failure (exit 2)" in out
    assert f"amber build --retry-failed {spec}" in out


def test_build_json_prints_one_object_per_build_and_nothing_else(capsys, daemon, spec, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(SPEC)

    def script(peer):
        serve_build(peer, "b1", [("extract", "ran", 0), ("make", "failed", 2)], "failed")
        serve_build(peer, "b2", [("extract", "cached", 0)], "success")

    path = daemon(script)
    argv = ["--socket", path, "build", "--json", "--on-error", "continue", str(spec), str(other)]
    code, out, err = run(capsys, *argv)
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["build"] == "b1" and first["status"] == "failed"
    assert first["steps"] == [
        {
            "name": "extract",
            "status": "ran",
            "exit_code": 0,
            "seconds": 0.5,
            "snapshot_seconds": 0.25,
        },
        {
            "name": "make",
            "status": "failed",
            "exit_code": 2,
            "seconds": 0.5,
            "snapshot_seconds": 0.25,
        },
    ]
    assert second["status"] == "success"
    assert "[zlib] step make: failed" in err  # progress goes to stderr


def test_on_error_quit_stops_after_the_first_failure(capsys, daemon, spec, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(SPEC)

    def script(peer):
        serve_build(peer, "b1", [("make", "failed", 2)], "failed")
        with pytest.raises(EOFError):  # no second build request comes
            peer.recv()

    path = daemon(script)
    code, out, err = run(capsys, "--socket", path, "build", "--json", str(spec), str(other))
    assert code == 1
    assert len(out.splitlines()) == 1
    assert "1 more spec(s) not built" in err


def test_spec_error_from_the_daemon_exits_2(capsys, daemon, spec):
    def script(peer):
        req = peer.expect("build")
        peer.fail(req, "spec-error", f"{spec}: line 5: unknown key 'rnu' in [[step]]")

    path = daemon(script)
    code, out, err = run(capsys, "--socket", path, "build", "--json", str(spec))
    assert code == 2
    assert out == ""
    assert f"amber: {spec}: line 5: unknown key 'rnu'" in err
    assert "Traceback" not in err


def test_missing_spec_file_exits_2_before_connecting(capsys, tmp_path):
    nowhere = str(tmp_path / "nobody.sock")  # would be exit 3 if amber tried to connect
    code, out, err = run(capsys, "--socket", nowhere, "build", str(tmp_path / "nope.toml"))
    assert code == 2
    assert out == ""
    assert err == f"amber: spec file not found: {tmp_path / 'nope.toml'}\n"
    code, _, err = run(capsys, "--socket", nowhere, "build", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_unreachable_daemon_exits_3_and_says_how_to_start_one(capsys, spec, tmp_path):
    code, out, err = run(capsys, "--socket", str(tmp_path / "nobody.sock"), "build", str(spec))
    assert code == 3
    assert out == ""
    assert f"cannot reach amberd at {tmp_path / 'nobody.sock'}: No such file" in err
    assert "that socket comes from --socket" in err
    assert f"`amberd --socket {tmp_path / 'nobody.sock'}`" in err  # root may start one there
    assert "Traceback" not in err


def test_daemon_lost_during_a_build_exits_3(capsys, daemon, spec):
    def script(peer):
        req = peer.expect("build")
        peer.event(req, "build", {"build": "b9", "name": "zlib", "steps": ["a"], "base": "host"})

    path = daemon(script)
    code, _, err = run(capsys, "--socket", path, "build", str(spec))
    assert code == 3
    assert "during build b9" in err


def test_ctrl_c_during_a_build_says_how_to_reattach(capsys, daemon, spec, monkeypatch):
    original = PlainBuildView.event

    def interrupt_after_the_build_event(self, ev):
        original(self, ev)
        if ev["event"] == "build":
            raise KeyboardInterrupt

    monkeypatch.setattr(PlainBuildView, "event", interrupt_after_the_build_event)

    def script(peer):
        req = peer.expect("build")
        peer.event(req, "build", {"build": "b7", "name": "zlib", "steps": ["a"], "base": "host"})

    path = daemon(script)
    code, _, err = run(capsys, "--socket", path, "build", str(spec))
    assert code == 130
    assert "build b7 goes on in amberd" in err
    assert "amber log -f b7" in err and "amber cancel b7" in err


def test_detached_build(capsys, daemon, spec):
    seen = {}

    def script(peer):
        req = seen["req"] = peer.expect("build")
        peer.event(req, "build", {"build": "b5", "name": "zlib", "steps": ["a"], "base": "host"})
        peer.reply(req, {"build": "b5", "status": "queued"})

    path = daemon(script)
    code, out, _ = run(capsys, "--socket", path, "build", "--detach", str(spec))
    assert code == 0
    assert seen["req"].args["detach"] is True
    assert "amber log -f b5" in out


# --- other commands against the fake daemon -----------------------------------------------


def test_ps(capsys, daemon):
    def script(peer):
        req = peer.expect("ps")
        builds = [
            {
                "id": "b1",
                "name": "zlib",
                "uid": 0,
                "status": "running",
                "step": "make",
                "elapsed": 75.0,
            }
        ]
        peer.reply(req, {"builds": builds})

    code, out, _ = run(capsys, "--socket", daemon(script), "ps")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["BUILD", "NAME", "USER", "STATUS", "STEP", "ELAPSED"]
    assert row.split() == ["b1", "zlib", "root", "running", "make", "1m15s"]


def test_builds_marks_frozen_failures(capsys, daemon):
    builds = [
        {"id": "b2", "name": "zlib", "uid": 0, "status": "failed", "frozen": True,
         "created": 1_700_000_000.0, "finished": 1_700_000_004.5, "failed_step": "make"},
        {"id": "b1", "name": "zlib", "uid": 0, "status": "success", "frozen": False,
         "created": 1_699_999_000.0, "finished": 1_699_999_001.0, "failed_step": None},
    ]  # fmt: skip
    seen = {}

    def script(peer):
        req = seen["req"] = peer.expect("builds")
        peer.reply(req, {"builds": builds})

    code, out, _ = run(capsys, "--socket", daemon(script), "builds", "--limit", "5")
    assert code == 0
    assert seen["req"].args == {"limit": 5}
    lines = out.splitlines()
    assert "FAILED (frozen)" in lines[1] and "make" in lines[1] and "4.5s" in lines[1]
    assert "FROZEN" not in lines[2].upper()
    assert "amber shell b2" in lines[-1]


def test_builds_json(capsys, daemon):
    def script(peer):
        peer.reply(peer.expect("builds"), {"builds": []})

    code, out, _ = run(capsys, "--socket", daemon(script), "builds", "--json")
    assert (code, json.loads(out)) == (0, {"builds": []})


def test_unknown_op_is_explained(capsys, daemon):
    def script(peer):
        req = peer.expect("diff")
        peer.fail(req, "unknown-op", "unknown operation 'diff'")

    code, out, err = run(capsys, "--socket", daemon(script), "diff", "b1")
    assert code == 1
    assert out == ""
    assert err.startswith("amber: `amber diff` is not supported by this daemon (amberd/test)")
    assert "newer amberd" in err


def test_not_found_is_one_line(capsys, daemon):
    def script(peer):
        peer.fail(peer.expect("cancel"), "not-found", "no build 'zz' (see `amber builds`)")

    code, _, err = run(capsys, "--socket", daemon(script), "cancel", "zz")
    assert (code, err) == (1, "amber: no build 'zz' (see `amber builds`)\n")


def test_log_writes_raw_output_with_a_header_per_step(capsysbinary, daemon):
    def script(peer):
        req = peer.expect("log")
        assert req.args == {"build": "b1", "step": None, "follow": True}
        peer.event(req, "log", {"step": "extract", "data": b"one\ntw"})
        peer.event(req, "log", {"step": "extract", "data": b"o"})
        peer.event(req, "log", {"step": "make", "data": b"\xffbin\n"})
        peer.reply(req, {"build": "b1", "status": "failed"})

    code = cli.main(["--socket", daemon(script), "log", "-f", "b1"])
    out, err = capsysbinary.readouterr()
    assert code == 1  # following ends with the build's outcome
    assert out == b"==> step extract <==\none\ntwo\n==> step make <==\n\xffbin\n"
    assert b"b1: failed" in err


def test_log_prints_amber_notes_with_the_log_on_stdout(capsysbinary, daemon):
    def script(peer):
        req = peer.expect("log")
        peer.event(req, "note", {"message": "stamp build/.configured removed: no products"})
        peer.event(req, "log", {"step": "make", "data": b"cc -c a.c"})  # no newline at the end
        peer.event(req, "note", {"message": "pinned as main"})
        peer.reply(req, {"build": "b1", "status": "success"})

    code = cli.main(["--socket", daemon(script), "log", "b1"])
    out, err = capsysbinary.readouterr()
    assert (code, err) == (0, b"")
    assert out == (
        b"amber: stamp build/.configured removed: no products\n"
        b"==> step make <==\ncc -c a.c\namber: pinned as main\n"
    )


def test_shell_refused_by_amberd_exits_125(capsys, daemon):
    def script(peer):
        peer.fail(peer.expect("shell"), "not-found", "no build 'zz' (see `amber builds`)")

    code, _, err = run(capsys, "--socket", daemon(script), "shell", "zz", "--", "true")
    assert (code, err) == (125, "amber: no build 'zz' (see `amber builds`)\n")


def test_shell_with_a_command_passes_the_terminal_and_exits_with_its_status(capsys, daemon):
    seen = {}

    def script(peer):
        req = seen["req"] = peer.expect("shell")
        seen["fds"] = req.fds
        peer.reply(req, {"exit_code": 7})

    code, _, _ = run(
        capsys, "--socket", daemon(script), "shell", "b1", "--step", "make", "--", "cat", "/x"
    )
    assert code == 7
    args = seen["req"].args
    assert (args["build"], args["step"], args["before"], args["argv"]) == (
        "b1",
        "make",
        False,
        ["cat", "/x"],
    )
    assert seen["fds"] == 3


def test_status(capsys, daemon):
    result = {
        "version": "0.1.0", "uptime": 3700.0, "running": 1, "queued": 2, "store_bytes": 3 << 30,
        "free_bytes": 10 << 30, "last_gc": None, "state_dir": "/var/lib/amber",
    }  # fmt: skip
    code, out, _ = run(
        capsys, "--socket", daemon(lambda p: p.reply(p.expect("status"), result)), "status"
    )
    assert code == 0
    assert "1 running, 2 queued" in out
    assert "3.0 GiB" in out and "never" in out and "1h01m" in out


def test_gc_sends_bytes_and_days(capsys, daemon):
    seen = {}

    def script(peer):
        req = seen["req"] = peer.expect("gc")
        peer.reply(req, {"freed_bytes": 1 << 20, "objects": 12})

    code, out, _ = run(
        capsys, "--socket", daemon(script), "gc", "--max-freed", "10G", "--keep-failed", "7"
    )
    assert code == 0
    assert seen["req"].args == {"max_freed": 10 << 30, "keep_failed_days": 7.0, "dry_run": False}
    assert out == "freed 1.0 MiB in 12 objects\n"


def test_image_import_sends_an_absolute_source(capsys, daemon, tmp_path, monkeypatch):
    seen = {}

    def script(peer):
        req = seen["req"] = peer.expect("image-import")
        peer.reply(req, {"name": "bookworm", "tree": "ab" * 32})

    monkeypatch.chdir(tmp_path)
    code, out, _ = run(
        capsys, "--socket", daemon(script), "image", "import", "bookworm", "dir:rootfs"
    )
    assert code == 0
    assert seen["req"].args == {"name": "bookworm", "source": f"dir:{tmp_path}/rootfs"}
    assert 'base = "bookworm"' in out
    assert store.local_source("docker://x/y:1") == "docker://x/y:1"
    assert store.local_source("img.tar") == str(tmp_path / "img.tar")


# --- rendering ------------------------------------------------------------------------------


def test_build_json_keeps_only_the_documented_step_keys():
    result = steps_result("b1", "success", [("a", "ran", 0)])
    result["steps"][0]["extra"] = "x"
    shaped = build_json(result)
    assert shaped["build"] == "b1" and shaped["status"] == "success"
    assert shaped["steps"] == [
        {"name": "a", "status": "ran", "exit_code": 0, "seconds": 0.5, "snapshot_seconds": 0.25}
    ]


def test_render_diff():
    changes = [
        {"kind": "added", "path": "/build/out", "type": "dir", "size": 0},
        {"kind": "modified", "path": "/build/a.o", "type": "file", "size": 2048},
        {"kind": "deleted", "path": "/build/tmp", "type": "symlink", "size": 0},
    ]
    assert (
        render_diff({"changes": changes}, stat=False)
        == "A /build/out/\nM /build/a.o\nD /build/tmp@"
    )
    stat = render_diff({"changes": changes}, stat=True).splitlines()
    assert "2.0 KiB" in stat[1]
    assert stat[-1] == "1 added, 1 modified, 1 deleted"
    assert render_diff({"changes": []}, stat=False) == "no changes"


def test_render_empty_lists():
    assert render_ps({"builds": []}) == "no builds running or queued"
    assert render_builds({"builds": []}) == "no builds yet"
    assert "0.1.0 at /s" in render_status({"version": "0.1.0"}, "/s")


def test_plain_view_survives_events_it_does_not_know():
    out = io.StringIO()
    view = PlainBuildView(out, "/x/zlib.toml")
    view.event({"event": "progress", "data": {"whatever": 1}})
    view.event({"event": "log", "data": {"data": b"early"}})  # before any step is named
    view.finish({"build": "b1", "status": "success", "steps": []})
    assert "[zlib] step 1 | early" in out.getvalue()
    assert "success: build b1" in out.getvalue()


def test_build_state_takes_step_names_or_indexes():
    state = BuildState("/x/zlib.toml")
    state.on_build({"build": "b1", "name": "zlib", "steps": ["a", "b"], "base": "host"})
    assert state.on_step({"index": 1, "status": "running"}).name == "b"
    step, lines = state.on_log({"step": "b", "data": b"x\ny"})
    assert (step.name, lines) == ("b", ["x"])
    assert state.step().name == "b"  # the running one


def test_live_view_draws_in_place_and_leaves_a_summary():
    out = io.StringIO()
    view = LiveBuildView(out, "/x/zlib.toml", color=False)
    view.event(
        {
            "event": "build",
            "data": {"build": "b1", "name": "zlib", "steps": ["a", "b"], "base": "host"},
        }
    )
    view.event({"event": "step", "data": {"index": 0, "name": "a", "status": "cached"}})
    view.event({"event": "step", "data": {"index": 1, "name": "b", "status": "running"}})
    view.event({"event": "log", "data": {"step": "b", "data": b"\x1b[31mred\x1b[0m line\n"}})
    view.tick()
    view.event({"event": "note", "data": {"message": "step a: cache hit checked"}})
    view.event(
        {
            "event": "step",
            "data": {"index": 1, "name": "b", "status": "failed", "exit_code": 2, "seconds": 1.0},
        }
    )
    view.finish(steps_result("b1", "failed", [("a", "cached", 0), ("b", "failed", 2)]))
    text = out.getvalue()
    assert re.search(r"\x1b\[\d+F", text)  # it redraws the step lines in place
    assert "red line" in text and "\x1b[31m" not in text  # the build's own escapes are dropped
    assert "note: step a: cache hit checked" in text
    assert "last lines of b:" in text
    assert "amber shell b1" in text
    assert text.endswith("\x1b[?25h")  # the cursor is given back


# --- auto-start ---------------------------------------------------------------------------------


def test_autostart_only_for_root_on_the_default_socket():
    assert may_autostart(None, {}, euid=0)
    assert not may_autostart("/s", {}, euid=0)
    assert not may_autostart(None, {"AMBER_SOCKET": "/s"}, euid=0)
    assert not may_autostart(None, {"AMBER_NO_AUTOSTART": "1"}, euid=0)
    assert not may_autostart(None, {}, euid=1000)


FAKE_AMBERD = """
import socket, sys
from amber.client.protocol import FrameDecoder, encode_frame, hello_reply, parse_hello, pick_version
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen()
print("listening", flush=True)
conn, _ = listener.accept()
decoder = FrameDecoder()
versions, _ = parse_hello(decoder.feed(conn.recv(65536))[0])
conn.sendall(encode_frame(hello_reply(pick_version(versions), "amberd/fake")))
conn.recv(1)
"""


def test_a_started_daemon_serves_the_socket_amber_waits_on():
    assert autostart_argv("/run/amber/amberd.sock")[1:] == ["-m", "amber.daemon.main"]
    assert autostart_argv("/t/s")[3:] == ["--socket", "/t/s"]  # AMBER_SYSTEM_SOCKET moved it


def test_unreachable_hints_say_what_this_user_can_do():
    import errno

    system = "/nonexistent/amber/amberd.sock"
    env = {"AMBER_SYSTEM_SOCKET": system}
    missing = DaemonUnreachable("x", path=system, errno=errno.ENOENT)
    hint = unreachable_hint(missing, environ=env, euid=4242)
    assert "ask an administrator to start it: `systemctl start amberd.socket`" in hint
    assert "its users are root and group amber: ask an administrator for `usermod -aG amber" in hint
    assert "AMBER_SOCKET=PATH" in hint
    root = unreachable_hint(missing, environ={**env, "AMBER_NO_AUTOSTART": "1"}, euid=0)
    assert "`amberd` (or `amber daemon`)" in root and "AMBER_NO_AUTOSTART is set" in root
    refused = DaemonUnreachable("x", path=system, errno=errno.ECONNREFUSED)
    assert "nothing accepts on it" in unreachable_hint(refused, environ=env, euid=4242)
    named = unreachable_hint(
        DaemonUnreachable("x", path="/s", errno=errno.ENOENT),
        environ={**env, "AMBER_SOCKET": "/s"},
        euid=4242,
    )
    assert "that socket comes from AMBER_SOCKET" in named and system in named
    denied = DaemonUnreachable("x", path=system, errno=errno.EACCES)
    assert "you are not in group amber" in unreachable_hint(denied, environ=env, euid=4242)


def test_started_daemon_is_waited_for_and_logs_to_its_file(tmp_path):
    path, log = str(tmp_path / "a.sock"), str(tmp_path / "log" / "amberd.log")
    proc = start_daemon([sys.executable, "-c", FAKE_AMBERD, path], log)
    try:
        with wait_for_daemon(proc, path, 5.0, log, wait=10.0) as conn:
            assert conn.server == "amberd/fake"
        assert proc.wait(SERVER_TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()
    with open(log) as f:
        assert "listening" in f.read()


def test_daemon_dying_at_start_is_reported_with_its_log(tmp_path):
    path, log = str(tmp_path / "a.sock"), str(tmp_path / "amberd.log")
    proc = start_daemon([sys.executable, "-c", "raise SystemExit(4)"], log)
    with pytest.raises(DaemonUnreachable) as caught:
        wait_for_daemon(proc, path, 5.0, log, wait=10.0)
    assert caught.value.message == (
        f"amberd exited with status 4 as it started to serve {path}; see {log}"
    )


# --- start-up cost ----------------------------------------------------------------------------------


def test_importing_the_cli_stays_light():
    """The fast path must not pay for trio, rich, typing or the daemon (0.15 s budget)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import amber.client.cli"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "amber.client.cli" in imported
    heavy = {"trio", "rich", "typing", "dataclasses", "subprocess", "json", "asyncio"}
    heavy |= {"amber.client.live"}
    assert not heavy & imported
    assert not {m for m in imported if m.startswith(("amber.daemon", "amber.sandbox"))}


def test_no_color_counts_only_when_set_to_something(monkeypatch):
    """no-color.org: NO_COLOR= (empty) leaves colour on."""
    monkeypatch.setenv("NO_COLOR", "")
    assert LiveBuildView(io.StringIO(), "s.toml").color
    monkeypatch.setenv("NO_COLOR", "1")
    assert not LiveBuildView(io.StringIO(), "s.toml").color
    monkeypatch.delenv("NO_COLOR")
    assert LiveBuildView(io.StringIO(), "s.toml").color


def test_a_new_group_member_is_told_to_log_in_again(monkeypatch):
    """usermod -aG took effect in /etc/group, not yet in this session's groups."""
    import errno

    from amber.client import autostart

    monkeypatch.setattr(autostart, "_member_of", lambda group, uid: group == "amber")
    denied = DaemonUnreachable("x", path="/nonexistent/amberd.sock", errno=errno.EACCES)
    hint = unreachable_hint(denied, environ={}, euid=4242)
    assert "you were added to group amber after this session began: log in again" in hint
    assert "newgrp amber" in hint


def _probe_start(argv: list[str]) -> tuple[set[str], int]:
    """``amber ARGV`` in a fresh interpreter: the modules it loaded, the parsers it built."""
    probe = (
        "import argparse, sys\n"
        "built = []\n"
        "init = argparse.ArgumentParser.__init__\n"
        "def counting(self, *a, **kw):\n    built.append(1)\n    init(self, *a, **kw)\n"
        "argparse.ArgumentParser.__init__ = counting\n"
        "from amber.client import cli\n"
        f"code = cli.main({argv!r})\n"
        "print(len(built), ' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    count, modules = done.stderr.strip().splitlines()[-1].split(" ", 1)
    return set(modules.split()), int(count)


@pytest.mark.parametrize("argv", [["--version"], ["build", "/nonexistent/spec.toml"]])
def test_starting_amber_loads_no_help_formatting(argv: list[str]):
    """argparse's formatter would import shutil (and bz2, lzma) at every add_argument."""
    modules, _ = _probe_start(argv)
    assert not {"shutil", "bz2", "lzma"} & modules


def test_version_builds_no_command_parser():
    """``amber --version`` answers without declaring twenty commands."""
    _, built = _probe_start(["--version"])
    _, for_build = _probe_start(["build", "/nonexistent/spec.toml"])
    _, for_help = _probe_start(["--help"])  # lists every command: all are declared
    assert built < for_build and 5 * built < for_help
