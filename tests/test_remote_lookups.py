"""A fully cached build asks the remote for all its step keys at once, on kept-alive connections.

Host B reaches the registry through a small HTTP proxy that counts what a
network admin would see: connections, requests, and how many manifest
requests are in flight together. The proxy holds each manifest request
until five are in flight (or 5 s passed): a build asking one step at a
time never gets there.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_remote import (
    FAILING,
    FIVE,
    host,
    notes,
    public,
    statuses,
    step_notes,
    tags,
    wait_pushed,
    write_spec,
)

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.remote.layout import tag_for

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class Counting(http.server.ThreadingHTTPServer):
    """A forwarding proxy to ``upstream`` that counts connections and concurrent lookups."""

    daemon_threads = True

    def __init__(self, upstream: str, together: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream, self.together = upstream, together
        self.lock = threading.Condition()
        self.connections = self.requests = self.in_flight = self.most_in_flight = 0
        self.released = False
        #: Blobs whose GET waits for ``release`` (``held`` is set when one arrives).
        self.hold_blobs: set[str] = set()
        self.held, self.release = threading.Event(), threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def hold_manifest(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if self.in_flight >= self.together:
                self.released = True
                self.lock.notify_all()
            self.lock.wait_for(lambda: self.released, timeout=5)

    def manifest_done(self) -> None:
        with self.lock:
            self.in_flight -= 1


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept-alive connections, as a registry serves them
    server: Counting

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        with self.server.lock:
            self.server.requests += 1
        manifest = "/manifests/" in self.path
        if manifest:
            self.server.hold_manifest()
        if any(self.path.endswith(f"/blobs/{d}") for d in self.server.hold_blobs):
            self.server.held.set()
            self.server.release.wait(30)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            up = http.client.HTTPConnection(self.server.upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            up.request(self.command, self.path, body=body, headers=headers)
            answer = up.getresponse()
            data = answer.read()
            up.close()
        finally:
            if manifest:
                self.server.manifest_done()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward


@pytest.fixture
def proxy(registry: str) -> Iterator[Counting]:
    server = Counting(registry, together=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_cached_build_looks_up_every_step_at_once(daemon_root: Path, registry, proxy):
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    b = host(daemon_root, "ci-b", proxy.address, sign=False, trusted={"ci-a": public(a)},
             push=False)  # fmt: skip
    try:
        spec = write_spec(daemon_root, FIVE.format(three="3"))
        assert a.build_json(spec)[0] == 0
        wait_pushed(registry, 5)
        code, report = b.build_json(spec)
        seen = (proxy.most_in_flight, proxy.requests, proxy.connections)  # the build's own
        assert code == 0 and statuses(report) == ["cached"] * 5, report
        assert seen[0] == 5  # the five tags asked for together
        # A manifest per step, its config inside (nothing else), one connection per lookup.
        assert seen[1:] == (5, 5), seen
        assert all(
            n.startswith("cached (remote) from host") for n in step_notes(b, report["build"])
        )
        assert f"via http://{proxy.address}/amber/trunk" in notes(b, report["build"])
    finally:
        a.stop()
        b.stop()


def _layers(registry: str, key: str) -> list[str]:
    """The digests of the layers of ``key``'s result in the registry."""
    client = RegistryClient(registry)
    try:
        body, _, _ = client.get_manifest("amber/trunk", tag_for(key))
    finally:
        client.close()
    return [layer["digest"] for layer in json.loads(body)["layers"]]


def test_a_key_untrusted_during_a_build_stops_counting_for_its_later_steps(
    daemon_root, registry, proxy
):
    """Both answers are fetched (and trusted) before the first step; B pulls hits eagerly,
    and the proxy holds the first step's pull while the admin removes A's key from
    trusted-keys: the second step's answer no longer counts, and it runs, with a note."""
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    b = host(daemon_root, "ci-b", proxy.address, sign=False, trusted={"ci-a": public(a)},
             push=False, cache='pull = "eager"')  # fmt: skip
    try:
        spec = write_spec(daemon_root, FAILING.replace("exit 3", "true"))
        code, report = a.build_json(spec)
        assert code == 0, report
        wait_pushed(registry, 2)
        first = json.loads(a.amber("show", "--json", report["build"]).stdout)["steps"][0]["key"]
        proxy.together = 1  # no manifest held: B's prefetch goes through at once
        proxy.hold_blobs = set(_layers(registry, first))
        started = b.amber("build", "--detach", "--json", str(spec))
        build = json.loads(started.stdout)["build"]
        assert proxy.held.wait(60), "the first step's closure was never pulled"
        (b.root / "trusted").write_text("")  # the admin removes ci-a's key
        proxy.release.set()
        deadline = time.monotonic() + 60
        while (shown := json.loads(b.amber("show", "--json", build).stdout))["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert shown["status"] == "success" and statuses(shown) == ["cached", "ran"], shown
        said = notes(b, build)
        assert "its signer 'ci-a' is not a trusted key; not a hit" in said, said
        assert [n.startswith("cached (remote)") for n in step_notes(b, build)] == [True, False]
    finally:
        a.stop()
        b.stop()


def test_a_config_embedded_in_a_manifest_is_checked_against_its_signed_digest(
    daemon_root, registry
):
    """Someone who can write the registry swaps the config a manifest embeds for a forged
    one (a cached failure made a success), digest and signature left as they were."""
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    b = host(daemon_root, "ci-b", registry, sign=False, trusted={"ci-a": public(a)}, push=False)
    try:
        spec = write_spec(daemon_root, FAILING)
        assert a.build_json(spec)[0] == 1
        wait_pushed(registry, 2)
        client = RegistryClient(registry)
        for tag in tags(registry):
            body, media_type, _ = client.get_manifest("amber/trunk", tag)
            doc = json.loads(body)
            config = json.loads(base64.b64decode(doc["config"]["data"]))
            config["result"].update(status="success", exit_code=0)
            doc["config"]["data"] = base64.b64encode(json.dumps(config).encode()).decode()
            client.put_manifest("amber/trunk", tag, json.dumps(doc).encode(), media_type)
        client.close()
        code, report = b.build_json(spec)
        assert code == 1 and statuses(report) == ["ran", "failed"], report  # the real failure
        assert "the config the manifest embeds does not match" in notes(b, report["build"])
    finally:
        a.stop()
        b.stop()


class _Client:
    closed = 0

    def close(self) -> None:
        _Client.closed += 1


def test_prefetch_asks_the_next_remote_only_what_the_first_did_not_settle():
    """Pure logic: remotes in order, as ``find`` walks them; every answer kept with its reason."""
    import trio

    from amber.daemon.remote import lookups
    from amber.daemon.remote.config import Remote
    from amber.daemon.remote.pull import Miss

    first, second = Remote("http://127.0.0.1:1/pr"), Remote("http://127.0.0.1:1/trunk")
    asked: list[tuple[str, str]] = []

    def lookup(client: object, remote: Remote, key: str) -> object:
        asked.append((remote.repository, key))
        if remote is first and key == "hit":
            return "found"
        if remote is first and key == "bad":
            raise Miss("the result is refused: it is not signed")
        return None

    keys = ["hit", "bad", "none"]
    got = trio.run(lookups.prefetch, [first, second], keys, lookup, lambda r: _Client())
    assert sorted(asked) == sorted(
        [("pr", k) for k in keys] + [("trunk", "bad"), ("trunk", "none")]
    )
    assert got.take(first.url, "hit").unwrap() == "found"
    with pytest.raises(Miss, match="not signed"):
        got.take(first.url, "bad").unwrap()
    assert got.take(second.url, "hit") is None  # never asked: the first remote had it
    assert got.take(second.url, "none").unwrap() is None and len(got) == 2
    assert _Client.closed >= 2  # every connection closed once the lookups are done
