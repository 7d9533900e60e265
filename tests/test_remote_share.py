"""Sharing by hand and by many: `amber push`, `amber pull`, cross-repository mounts, races.

Real amberd hosts (own state directories and keys) and a real docker-registry;
what a user checks: what `amber push`/`pull` print and exit with, step
statuses of later builds, `amber shell`, and what the registry holds.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon
from second_user import BOB, MAL, user_of
from test_remote import FAILING, SPEC, public, run_amber, statuses, write_spec

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.remote import layout, pull, trust
from amber.daemon.remote.config import Remote
from amber.sandbox.digest import from_hex
from amber.sandbox.store import Store


def host(root: Path, name: str, remotes: list[tuple[str, bool]], *, sign: bool = True,
         trusted: dict[str, str] | None = None, extra: str = "",
         bin_dir: Path = BIN) -> Daemon:  # fmt: skip
    """An amberd with its own state, key and trusted keys, and these (url, push) remotes
    (``bin_dir``: another venv's amberd, a benchmark's baseline)."""
    home = root / name
    home.mkdir()
    (home / "keys").mkdir()
    lines = [extra] + [
        f'[[cache.remote]]\nurl = "{u}"\npush = {str(p).lower()}' for u, p in remotes
    ]
    lines.append("[cache]")
    if sign:
        run_amber("key", "generate", name, "--dir", str(home / "keys"))
        lines.append(f'signing-key = "{home / "keys" / (name + ".key")}"')
    (home / "trusted").write_text("")
    for other, key in (trusted or {}).items():
        run_amber("key", "trust", other, key, "--file", str(home / "trusted"))
    lines.append(f'trusted-keys = "{home / "trusted"}"')
    (home / "amberd.toml").write_text("\n".join(lines) + "\n")
    return Daemon(home, bin_dir=bin_dir).start("--config", str(home / "amberd.toml"))


def repo_tags(registry: str, repo: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/{repo}/tags/list") as r:
            return json.load(r).get("tags") or []
    except OSError:
        return []


def wait_tags(registry: str, repo: str, count: int) -> list[str]:
    deadline = time.monotonic() + 120
    while len(found := repo_tags(registry, repo)) < count:
        assert time.monotonic() < deadline, f"only {found} in {repo}"
        time.sleep(0.2)
    return found


def said(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.decode() + proc.stderr.decode()


def uploaded_or_downloaded(output: str, verb: str) -> int:
    """The exact byte count of `amber push`'s or `amber pull`'s summary line."""
    match = re.search(rf"\((\d+) bytes\) {verb}", output)
    assert match, output
    return int(match.group(1))


def uploaded(output: str) -> int:
    return uploaded_or_downloaded(output, "uploaded")


def logged_pushes(daemon: Daemon, url: str, count: int) -> list[int]:
    """The bytes of the background pushes to ``url`` amberd's log reports (once ``count``)."""
    deadline = time.monotonic() + 60
    while True:
        found = re.findall(
            rf"pushed \w+ to {re.escape(url)} \((\d+) bytes\)", daemon.log.read_text()
        )
        if len(found) >= count or time.monotonic() > deadline:
            return [int(n) for n in found]
        time.sleep(0.1)


def keys_of(daemon: Daemon, build: str) -> list[str]:
    shown = json.loads(daemon.amber("show", "--json", build).stdout)
    return [s["key"] for s in shown["steps"]]


@pytest.fixture
def trunk(registry: str) -> str:
    return f"http://{registry}/amber/trunk"


def test_push_by_hand_sends_each_result_once_failures_too(daemon_root, registry, trunk):
    a = host(daemon_root, "ci-a", [(trunk, True)])
    b = host(daemon_root, "ci-b", [(trunk, False)], sign=False, trusted={"ci-a": public(a)})
    code, report = a.build_json(write_spec(daemon_root, SPEC.format(three="3")), "--no-remote")
    assert code == 0 and statuses(report) == ["ran"] * 4
    assert repo_tags(registry, "amber/trunk") == []  # --no-remote: nothing queued

    pushed = a.amber("push", report["build"])
    out = said(pushed)
    assert pushed.returncode == 0, out
    assert f"pushed 4 results of {report['build']} to {trunk}" in out
    assert "0 skipped as present" in out and uploaded(out) > 3_000_000  # the 3 MB file went
    assert "pushed step one" in out  # progress, result by result
    assert len(repo_tags(registry, "amber/trunk")) == 4

    again = a.amber("push", report["build"])
    out = said(again)
    assert again.returncode == 0 and "pushed 0 results" in out, out
    assert "4 skipped as present" in out and uploaded(out) == 0

    failed_code, failed = a.build_json(write_spec(daemon_root, FAILING, "f.toml"), "--no-remote")
    assert failed_code == 1 and failed["frozen"]
    out = said(a.amber("push", failed["build"]))
    assert "pushed 2 results" in out, out  # the failure travels too

    code, hits = b.build_json(write_spec(daemon_root, SPEC.format(three="3")))
    assert code == 0 and statuses(hits) == ["cached"] * 4, hits
    code, replay = b.build_json(write_spec(daemon_root, FAILING, "f.toml"))
    assert code == 1 and statuses(replay) == ["cached", "cached-failure"], replay
    for d in (a, b):
        d.stop()


def test_pull_a_key_or_a_build_whose_states_are_gone(daemon_root, registry, trunk):
    a = host(daemon_root, "ci-a", [(trunk, True)])
    b = host(daemon_root, "ci-b", [(trunk, False)], sign=False, trusted={"ci-a": public(a)})
    code, built = a.build_json(write_spec(daemon_root, SPEC.format(three="3")))
    assert code == 0
    assert a.build_json(write_spec(daemon_root, FAILING, "f.toml"))[0] == 1
    wait_tags(registry, "amber/trunk", 6)

    last = keys_of(a, built["build"])[-1]
    pulled = b.amber("pull", last)
    out = said(pulled)
    assert pulled.returncode == 0, out
    assert "pulled 1 results" in out and "downloaded" in out
    # Keys are input-addressed: with the remote off, the pulled last step is a local hit.
    code, report = b.build_json(write_spec(daemon_root, SPEC.format(three="3")), "--no-remote")
    assert code == 0 and statuses(report) == ["ran", "ran", "ran", "cached"], report
    out = said(b.amber("pull", last))
    assert "pulled 0 results" in out and "1 already in the store" in out, out

    # B replays A's failure, then its store loses every object (as if never fetched).
    code, replay = b.build_json(write_spec(daemon_root, FAILING, "f.toml"))
    assert code == 1 and statuses(replay) == ["cached", "cached-failure"]
    assert b.stop() == 0
    shutil.rmtree(b.state / "cas")
    b.start("--config", str(b.root / "amberd.toml"))
    repaired = b.amber("store", "fsck", "--repair")  # forgets what it no longer has
    assert repaired.returncode == 1, said(repaired)
    back = b.amber("pull", replay["build"])
    assert back.returncode == 0 and "pulled 2 results" in said(back), said(back)
    assert uploaded_or_downloaded(said(back), "downloaded") > 0
    again = said(b.amber("pull", replay["build"]))
    assert "pulled 0 results" in again and "2 already in the store" in again, again
    shell = b.amber("shell", replay["build"], "--", "cat", "kept")
    assert shell.returncode == 0 and shell.stdout == b"kept\n", shell.stderr

    unknown = b.amber("pull", "f" * 64)
    assert unknown.returncode == 1 and "not on " + trunk in said(unknown), said(unknown)
    for d in (a, b):
        d.stop()


def test_push_and_pull_say_what_is_wrong(daemon_root, registry, trunk):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/amber/trunk"  # nothing listens
    unsigned = host(daemon_root, "ci-u", [(trunk, True)], sign=False)
    code, report = unsigned.build_json(write_spec(daemon_root, SPEC.format(three="3")))
    assert code == 0
    refused = unsigned.amber("push", report["build"])
    assert refused.returncode == 1 and "no signing key" in said(refused), said(refused)
    unsigned.stop()

    a = host(daemon_root, "ci-a", [(trunk, True)])
    code, report = a.build_json(write_spec(daemon_root, SPEC.format(three="3")), "--no-remote")
    nowhere = a.amber("push", "no-such-build-1")
    assert nowhere.returncode == 1 and "no build 'no-such-build-1'" in said(nowhere)
    down = a.amber("push", report["build"], "--to", dead)
    out = said(down)
    assert down.returncode == 1 and "cannot reach registry" in out, out
    assert "1 failed, 3 not tried" in out
    bad = a.amber("push", report["build"], "--to", "ftp://x/y")
    assert bad.returncode == 2 and "--to: expected http(s)://" in said(bad)
    unpulled = a.amber("pull", "e" * 64, "--from", dead)
    assert unpulled.returncode == 1 and "cannot reach registry" in said(unpulled)
    assert repo_tags(registry, "amber/trunk") == []
    a.stop()


def test_a_user_pushes_and_pulls_only_their_own_builds(daemon_root, registry, trunk):
    daemon = host(daemon_root, "ci-a", [(trunk, True)], extra="socket-mode = 0o666")
    bob, mal = user_of(daemon, BOB), user_of(daemon, MAL)
    spec = bob.write("spec.toml", SPEC.format(three="bob"))
    code, out = bob.said("build", "--json", "--no-remote", spec)
    assert code == 0, out
    build = json.loads(out[out.index("{") :])["build"]

    for verb in ("push", "pull"):
        code, out = mal.said(verb, build)
        assert code == 1 and "belongs to uid 4243" in out, (verb, out)
    assert repo_tags(registry, "amber/trunk") == []  # nothing of bob's went anywhere
    code, out = mal.said("push", build, "--to", f"{trunk}-mal")
    assert code == 1 and "belongs to uid 4243" in out
    # A step key anyone may pull, but from amberd's own remotes only (their trust lists hold).
    key = "a" * 64
    code, out = mal.said("pull", key, "--from", f"{trunk}-mal")
    assert code == 1 and "not a [[cache.remote]] of amberd.toml" in out, out
    code, out = mal.said("pull", key, "--from", trunk)
    assert code == 1 and f"not on {trunk}" in out, out
    # The same for a build's --cache-from: what it reads becomes everyone's local hit.
    mine = mal.write("mine.toml", SPEC.format(three="mal"))
    code, out = mal.said("build", "--cache-from", f"{trunk}-mal", mine)
    assert code != 0 and "not a [[cache.remote]] of amberd.toml" in out, out
    code, out = mal.said("build", "--cache-from", trunk, mine)
    assert code == 0, out

    code, out = bob.said("push", build)
    assert code == 0 and "pushed 4 results" in out, out
    daemon.stop()


def test_a_pr_repository_mounts_what_trunk_has(daemon_root, registry, trunk):
    """A PR host reads its repository then trunk, and writes its own: blobs trunk has are
    mounted (?mount=), so a push of trunk's results uploads only their manifests."""
    pr = f"http://{registry}/amber/pr-7"
    a = host(daemon_root, "ci-a", [(trunk, True)])
    code, _ = a.build_json(write_spec(daemon_root, SPEC.format(three="3")))
    assert code == 0
    wait_tags(registry, "amber/trunk", 4)
    p = host(daemon_root, "ci-pr", [(pr, True), (trunk, False)], trusted={"ci-a": public(a)})
    code, report = p.build_json(write_spec(daemon_root, SPEC.format(three="pr"), "p.toml"))
    assert code == 0 and statuses(report) == ["cached", "cached", "ran", "ran"]
    wait_tags(registry, "amber/pr-7", 2)  # the background queue: steps three and four
    queued = logged_pushes(p, pr, 2)
    assert all(n < 1_000_000 for n in queued), queued  # not the 3 MB file again

    pushed = p.amber("push", report["build"])
    out = said(pushed)
    assert pushed.returncode == 0 and "pushed 2 results" in out and "2 skipped as present" in out
    assert uploaded(out) < 16_000, out  # two manifests; the 3 MB and the 300 files are mounted

    c = host(daemon_root, "ci-c", [(pr, False)], sign=False,
             trusted={"ci-a": public(a), "ci-pr": public(p)})  # fmt: skip
    code, hits = c.build_json(write_spec(daemon_root, SPEC.format(three="pr"), "p.toml"))
    assert code == 0 and statuses(hits) == ["cached"] * 4, hits  # the PR repo alone is whole
    for d in (a, p, c):
        d.stop()


def _verified(client: RegistryClient, remote: Remote, key: str, trusted: dict,
              scratch: Path) -> str:  # fmt: skip
    """What a reader finds for ``key`` now: 'absent', 'complete' or why it is broken."""
    try:
        found = pull.lookup(client, remote, key, trusted)
        if found is None:
            return "absent"
        result = found.result
        store = Store.open(scratch)
        for layer in found.manifest.layers:
            pull.fetch_layer(store, client, remote, layer, threading.Event())
        missing = store.closure_check().missing(
            [from_hex(result["before_tree"]), from_hex(result["after_tree"])],
            [from_hex(result["log"])],
        )
        return "complete" if missing is None else f"incomplete: {missing}"
    except pull.Miss as miss:
        return f"broken: {miss}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_hosts_pushing_one_key_at_once_leave_a_valid_result_readers_see_all_or_none(
    daemon_root, registry, trunk, tmp_path
):
    a1 = host(daemon_root, "ci-a1", [(trunk, True)])
    a2 = host(daemon_root, "ci-a2", [(trunk, True)])
    trusted = {"ci-a1": public(a1), "ci-a2": public(a2)}
    spec = write_spec(daemon_root, SPEC.format(three="race"))
    builds = [d.build_json(spec, "--no-remote")[1]["build"] for d in (a1, a2)]
    keys = keys_of(a1, builds[0])
    assert keys == keys_of(a2, builds[1])  # the same key on every host

    answers: list[str] = []
    done = threading.Event()
    remote = Remote(trunk)

    def read() -> None:
        client = RegistryClient(remote.registry, insecure=True)
        public_keys = {n: trust.parse_public(k) for n, k in trusted.items()}
        i = 0
        while not done.is_set() or i % len(keys):
            answers.append(_verified(client, remote, keys[i % len(keys)], public_keys,
                                     tmp_path / f"scratch{i}"))  # fmt: skip
            i += 1
        client.close()

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)  # the reader has found nothing yet
    pushes = [subprocess.Popen([str(d.bin / "amber"), "push", b], env=d.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT) for d, b in ((a1, builds[0]), (a2, builds[1]))]  # fmt: skip
    try:
        codes = [p.wait(timeout=300) for p in pushes]
    finally:
        done.set()
        reader.join()
    assert codes == [0, 0], [p.stdout.read() for p in pushes]
    assert "absent" in answers and "complete" in answers, answers
    assert set(answers) == {"absent", "complete"}, [
        a for a in answers if a not in ("absent", "complete")
    ]

    for tag in repo_tags(registry, "amber/trunk"):
        body, _, _ = RegistryClient(remote.registry).get_manifest("amber/trunk", tag)
        assert layout.parse_manifest(body, tag.removeprefix("step-")).signer in trusted
    b = host(daemon_root, "ci-b", [(trunk, False)], sign=False, trusted=trusted)
    code, hits = b.build_json(spec)
    assert code == 0 and statuses(hits) == ["cached"] * 4, hits  # B gets a verified hit
    for d in (a1, a2, b):
        d.stop()


MANY_SMALL = """
[build]
name = "small"
base = "host"

[[step]]
name = "many"
run = "mkdir d && for i in $(seq 1 2000); do head -c 1000 /dev/urandom > d/$i; done"

[[step]]
name = "mark"
run = "echo {mark} > marker"
"""


def test_a_result_differing_by_one_file_uploads_that_file_and_metadata(daemon_root, trunk):
    a = host(daemon_root, "ci-a", [(trunk, True)])
    first = a.build_json(write_spec(daemon_root, MANY_SMALL.format(mark="one")), "--no-remote")
    out = said(a.amber("push", first[1]["build"]))
    assert uploaded(out) > 2_000_000, out  # 2,000 files of 1 KB, packed
    second = a.build_json(write_spec(daemon_root, MANY_SMALL.format(mark="two")), "--no-remote")
    assert statuses(second[1]) == ["cached", "ran"]
    out = said(a.amber("push", second[1]["build"]))
    assert "pushed 1 results" in out and "1 skipped as present" in out, out
    # marker, the two trees above it, the log, the config and the manifest: not a 2 MB pack
    assert uploaded(out) < 8_000, out
    a.stop()


def test_a_registry_refusing_a_mount_gets_the_blob_uploaded(registry):
    """A token whose scope does not cover the other repository (or a registry without
    mounts) answers the mount otherwise than 201/202: the blob is uploaded, not lost."""
    from test_registry_auth import TokenGate

    from amber.daemon.oci.auth import Credentials
    from amber.daemon.oci.spec import sha256_digest

    class NoMounts(TokenGate):
        def handle(self, req):
            if "mount=" in req.path:
                req.rfile.read(int(req.headers.get("Content-Length") or 0))
                return self.reply(req, 403, b'{"errors":[{"code":"DENIED"}]}', {})
            return super().handle(req)

    gate = NoMounts(registry, "ci", "secret")
    try:
        client = RegistryClient(gate.address, credentials=Credentials("ci", "secret"))
        data = b"a blob trunk has" * 100
        digest = sha256_digest(data)
        assert client.upload("amber/trunk", digest, data, len(data)) is False
        mounted = client.upload("amber/pr-1", digest, data, len(data), mount_from=["amber/trunk"])
        assert mounted is False and client.has_blob("amber/pr-1", digest)  # uploaded instead
        client.close()
        direct = RegistryClient(registry)
        assert direct.upload("amber/pr-2", digest, data, len(data), mount_from=["amber/trunk"])
        assert direct.has_blob("amber/pr-2", digest)  # the registry itself mounts it
        direct.close()
    finally:
        gate.server.shutdown()
        gate.server.server_close()
