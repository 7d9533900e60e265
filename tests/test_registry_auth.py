"""Registry logins as the container tools do them: basic (htpasswd) and bearer tokens.

The `amber` client reads its user's auth.json and sends the entry for the
registry it names; a wrong password is refused with a clear message.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from amberd_process import Daemon
from conftest import serve_registry
from rootfs import make_busybox_root
from tools import need, run

SPEC = """
[build]
name = "authed"
base = "bb"

[[step]]
name = "fail"
run = "echo hi > /greeting && exit 1"
"""


def auth_json(path: Path, host: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


@pytest.fixture
def frozen(amberd: Daemon) -> tuple[Daemon, str]:
    root = amberd.root / "bbroot"
    make_busybox_root(root)
    assert amberd.amber("image", "import", "bb", f"dir:{root}").returncode == 0
    spec = amberd.root / "spec.toml"
    spec.write_text(SPEC)
    code, result = amberd.build_json(spec)
    assert code != 0
    return amberd, result["build"]


@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[str]:
    need("htpasswd")
    users = tmp_path / "htpasswd"
    run(["htpasswd", "-Bbc", str(users), "alice", "s3cret"])
    extra = f"auth:\n  htpasswd:\n    realm: amber-test\n    path: {users}\n"
    with serve_registry(tmp_path, extra) as address:
        yield address


def test_basic_auth_from_auth_json(frozen, htpasswd_registry: str, tmp_path: Path):
    amberd, build = frozen
    ref = f"{htpasswd_registry}/amber/authed:failed"
    anonymous = amberd.amber("export", build, "--push", ref)
    assert anonymous.returncode != 0
    assert b"no credentials" in anonymous.stderr
    amberd.env["REGISTRY_AUTH_FILE"] = str(
        auth_json(tmp_path / "bad.json", htpasswd_registry, "alice", "wrong")
    )
    wrong = amberd.amber("export", build, "--push", ref)
    assert wrong.returncode != 0
    assert b"refused the credentials of 'alice'" in wrong.stderr
    assert b"wrong" not in wrong.stderr
    amberd.env["REGISTRY_AUTH_FILE"] = str(
        auth_json(tmp_path / "good.json", htpasswd_registry, "alice", "s3cret")
    )
    pushed = amberd.amber("export", build, "--push", ref)
    assert pushed.returncode == 0, pushed.stderr
    info = run(
        ["skopeo", "inspect", "--tls-verify=false", "--creds", "alice:s3cret", f"docker://{ref}"]
    )
    assert json.loads(info.stdout)["Labels"]["org.amber.build"] == build
    imported = amberd.amber("import", ref)
    assert imported.returncode == 0, imported.stderr
    assert (
        b"s3cret" not in (amberd.root / "amberd.log").read_bytes()
        if (amberd.root / "amberd.log").exists()
        else True
    )


class TokenGate:
    """A token server and a registry front that demands its tokens, in front of a real
    anonymous docker-registry (distribution's own token auth needs a signed JWT chain)."""

    def __init__(self, backend: str, user: str, password: str):
        self.backend, self.user, self.password = backend, user, password
        self.tokens: dict[str, str] = {}  # token -> scope it grants
        self.token_requests: list[str] = []
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                gate.handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        if req.path.startswith("/token"):
            return self.issue(req)
        parts = req.path.split("?", 1)[0].split("/")  # /v2/REPO.../(blobs|manifests|tags)/...
        kind = next((i for i, p in enumerate(parts) if p in ("blobs", "manifests", "tags")), 0)
        repo = "/".join(parts[2:kind]) if kind > 2 else ""
        granted = self.tokens.get(req.headers.get("Authorization", "").removeprefix("Bearer "))
        if repo and not self.allows(granted, repo, req.command):
            challenge = (f'Bearer realm="http://{self.address}/token",service="gate",'
                         f'scope="repository:{repo}:pull,push"')  # fmt: skip
            return self.reply(req, 401, b"{}", {"WWW-Authenticate": challenge},
                              head=req.command == "HEAD")  # fmt: skip
        conn = http.client.HTTPConnection(self.backend)
        headers = {
            k: v for k, v in req.headers.items() if k.lower() not in ("authorization", "host")
        }
        conn.request(req.command, req.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        keep = {k: v.replace(self.backend, self.address) for k, v in resp.getheaders()
                if k.lower() not in ("content-length", "connection")}  # fmt: skip
        self.reply(req, resp.status, data, keep, head=req.command == "HEAD")
        conn.close()

    def allows(self, granted: str | None, repo: str, method: str) -> bool:
        """Whether a token granting ``granted`` may do ``method`` in ``repo``."""
        return granted == f"repository:{repo}:pull,push"

    def grant(self, scope: str) -> str:
        """The scope a token is issued for, when ``scope`` is asked (all of it, here)."""
        return scope

    def issue(self, req) -> None:
        self.token_requests.append(req.path)
        want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if req.headers.get("Authorization") != want:
            return self.reply(req, 401, b'{"details":"bad login"}', {})
        scope = (
            req.path.split("scope=", 1)[1]
            .split("&")[0]
            .replace("%3A", ":")
            .replace("%2C", ",")
            .replace("%2F", "/")
        )
        token = secrets.token_hex(16)
        self.tokens[token] = self.grant(scope)
        self.reply(
            req, 200, json.dumps({"token": token}).encode(), {"Content-Type": "application/json"}
        )

    @staticmethod
    def reply(req, status: int, data: bytes, headers: dict, head: bool = False) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        if "Content-Length" not in headers:
            req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if not head:
            req.wfile.write(data)


def test_bearer_token_flow(frozen, registry: str, tmp_path: Path):
    amberd, build = frozen
    gate = TokenGate(registry, "bob", "hunter2")
    try:
        ref = f"{gate.address}/amber/tokened:failed"
        amberd.env["REGISTRY_AUTH_FILE"] = str(
            auth_json(tmp_path / "bad.json", gate.address, "bob", "nope")
        )
        wrong = amberd.amber("export", build, "--push", ref)
        assert wrong.returncode != 0
        assert b"token server refused the credentials of 'bob'" in wrong.stderr
        amberd.env["REGISTRY_AUTH_FILE"] = str(
            auth_json(tmp_path / "good.json", gate.address, "bob", "hunter2")
        )
        pushed = amberd.amber("export", build, "--push", ref)
        assert pushed.returncode == 0, pushed.stderr
        # The push ran on one token: a token per scope, not per request.
        asked = len(gate.token_requests)
        imported = amberd.amber("import", ref)
        assert imported.returncode == 0, imported.stderr
        assert len(gate.token_requests) <= asked + 1
        # Behind the gate sits the plain registry: the image is really there.
        subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry}/amber/tokened:failed"],
                       check=True, capture_output=True)  # fmt: skip
    finally:
        gate.server.shutdown()
        gate.server.server_close()
