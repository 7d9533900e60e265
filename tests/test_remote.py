"""A step cache shared through a real docker-registry by several real amberd hosts.

Each host has its own state directory and signing key; they share only the
registry. What a user checks: step statuses, logs, files, `amber shell`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import sha256_digest
from amber.daemon.remote import layout
from amber.sandbox.digest import hash_bytes
from amber.sandbox.store import Store

SPEC = """
[build]
name = "shared"
base = "host"

[[step]]
name = "one"
run = "echo one > one && head -c 3000000 /dev/zero | tr '\\\\0' x > big"

[[step]]
name = "two"
run = "mkdir many && for i in $(seq 1 300); do echo $i > many/$i; done"

[[step]]
name = "three"
run = "echo {three} > three"

[[step]]
name = "four"
run = "cat one three > four"
"""

#: The issue's five-step chain: C changes step three of five (SPEC's four, and a fifth).
FIVE = (
    SPEC.replace('name = "shared"', 'name = "chain"')
    + """
[[step]]
name = "five"
run = "echo files $(ls many | wc -l) big $(wc -c < big) four $(cat four) | tee five"
"""
)

FAILING = """
[build]
name = "broken"
base = "host"

[[step]]
name = "prepare"
run = "echo kept > kept"

[[step]]
name = "compile"
run = "echo 'cc: fatal error: remote-visible' >&2 && exit 3"
"""


def host(root: Path, name: str, registry: str, *, sign: bool, trusted: dict[str, str],
         push: bool = True, cache: str = "") -> Daemon:  # fmt: skip
    """An amberd with its own state and key, reading (and maybe writing) the shared remote;
    ``cache``: more lines of its ``[cache]`` table."""
    home = root / name
    home.mkdir()
    keys = home / "keys"
    keys.mkdir()
    lines = [
        f'[[cache.remote]]\nurl = "http://{registry}/amber/trunk"\npush = {str(push).lower()}\n[cache]'
    ]
    if sign:
        run_amber("key", "generate", name, "--dir", str(keys))
        lines.append(f'signing-key = "{keys / (name + ".key")}"')
    (home / "trusted").write_text("")
    for other, key in trusted.items():
        run_amber("key", "trust", other, key, "--file", str(home / "trusted"))
    lines.append(f'trusted-keys = "{home / "trusted"}"')
    lines.append(cache)
    (home / "amberd.toml").write_text("\n".join(lines) + "\n")
    return Daemon(home).start("--config", str(home / "amberd.toml"))


def run_amber(*args: str) -> None:
    out = subprocess.run([str(BIN / "amber"), *args], capture_output=True)
    assert out.returncode == 0, out.stderr


def public(daemon: Daemon) -> str:
    name = daemon.root.name
    return (daemon.root / "keys" / f"{name}.pub").read_text().split()[1]


def tags(registry: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/amber/trunk/tags/list") as r:
            return json.load(r).get("tags") or []
    except OSError:
        return []


def wait_pushed(registry: str, count: int) -> list[str]:
    """The background queue is done when the registry has ``count`` results."""
    deadline = time.monotonic() + 120
    while len(found := tags(registry)) < count:
        assert time.monotonic() < deadline, f"only {found} pushed"
        time.sleep(0.2)
    return found


def write_spec(root: Path, text: str, name: str = "spec.toml") -> Path:
    path = root / name
    path.write_text(text)
    return path


def statuses(report: dict) -> list[str]:
    return [s["status"] for s in report["steps"]]


def step_notes(daemon: Daemon, build: str) -> list[str]:
    """Each step's note as ``amber show`` prints it (where a hit came from)."""
    shown = json.loads(daemon.amber("show", "--json", build).stdout)
    return [str(s.get("note")) for s in shown["steps"]]


def notes(daemon: Daemon, build: str) -> str:
    """What a user reads about a build: its log (notes included) and its steps' notes."""
    shown = json.loads(daemon.amber("show", "--json", build).stdout)
    steps = "\n".join(str(s.get("note")) for s in shown["steps"])
    return daemon.amber("log", build).stdout.decode() + steps


@pytest.fixture
def hosts(daemon_root: Path, registry: str):
    """Host A signs and pushes; B and C trust A and push nothing."""
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    b = host(daemon_root, "ci-b", registry, sign=False, trusted={"ci-a": public(a)}, push=False)
    yield a, b
    for d in (a, b):
        d.stop()


def test_a_result_built_on_one_host_is_a_hit_on_another(hosts, daemon_root, registry):
    a, b = hosts
    spec = write_spec(daemon_root, FIVE.format(three="3"))
    code, report = a.build_json(spec)
    assert code == 0 and statuses(report) == ["ran"] * 5  # A: cold
    wait_pushed(registry, 5)

    code, report = b.build_json(spec)
    assert code == 0, report
    assert statuses(report) == ["cached"] * 5  # zero steps ran on B
    assert all(n.startswith("cached (remote) from host") for n in step_notes(b, report["build"]))
    log = notes(b, report["build"])
    assert f"via http://{registry}/amber/trunk" in log and "pulled the state" not in log
    out = b.amber("export", report["build"], "-o", str(daemon_root / "b.tar"))
    assert out.returncode == 0, out.stderr

    # C changes step three of five: one and two are remote hits, three to five run, on
    # step two's state, pulled first (its closure: step one's big file is in it too).
    c = host(daemon_root, "ci-c", registry, sign=False, trusted={"ci-a": public(a)}, push=False)
    try:
        code, report = c.build_json(write_spec(daemon_root, FIVE.format(three="changed"), "c.toml"))
        assert code == 0, report
        assert statuses(report) == ["cached", "cached", "ran", "ran", "ran"]
        shown = step_notes(c, report["build"])
        assert [n.startswith("cached (remote)") for n in shown] == [True, True, False, False, False]
        log = c.amber("log", report["build"]).stdout.decode()
        pulls = [line for line in log.splitlines() if "pulled the state it runs on" in line]
        assert (
            len(pulls) == 1
            and "step three: " in pulls[0]
            and "(the result of step two)" in pulls[0]
        )
        assert "files 300 big 3000000 four one changed" in log  # the pulled state, whole
    finally:
        c.stop()


def test_a_failure_replays_on_another_host_with_its_log_and_shell(hosts, daemon_root, registry):
    a, b = hosts
    spec = write_spec(daemon_root, FAILING)
    code, report_a = a.build_json(spec)
    assert code == 1 and report_a["frozen"]
    wait_pushed(registry, 2)

    code, report = b.build_json(spec)
    assert code == 1 and report["frozen"] and statuses(report) == ["cached", "cached-failure"]
    log = b.amber("log", report["build"]).stdout.decode()
    assert "cc: fatal error: remote-visible" in log  # A's own log
    origin = notes(b, report["build"])
    assert "cached (remote) from host" in origin and f"build {report_a['build']}" in origin
    shell = b.amber("shell", report["build"], "--", "cat", "kept")
    assert shell.returncode == 0 and shell.stdout == b"kept\n", shell.stderr

    code, retried = b.build_json(spec, "--retry-failed")
    assert code == 1 and statuses(retried) == ["cached", "failed"]  # ran again, on B


def test_a_tampered_blob_is_refused_and_the_step_reruns(hosts, daemon_root, registry, tmp_path):
    a, b = hosts
    spec = write_spec(daemon_root, SPEC.format(three="3"))
    assert a.build_json(spec)[0] == 0
    wait_pushed(registry, 4)
    # Every big-enough blob on the registry's disk loses a byte's worth of truth.
    blobs = tmp_path / "registry-data" / "docker" / "registry" / "v2" / "blobs"
    for data in blobs.rglob("data"):
        if data.stat().st_size > 1_000_000:  # the 3 MB file, in step one's closure
            raw = bytearray(data.read_bytes())
            raw[-1] ^= 1
            data.write_bytes(bytes(raw))
    # B changes step three: step two's closure (the big file in it) is pulled to run it.
    code, report = b.build_json(write_spec(daemon_root, SPEC.format(three="b"), "b.toml"))
    assert code == 0, report
    assert statuses(report)[0] == "ran"  # refused, rerun, not a failure
    assert "does not match its sha256" in notes(b, report["build"])


def test_junk_packs_added_to_a_signed_manifest_are_refused_before_a_byte_of_them(
    hosts, daemon_root, registry
):
    """Layers are not signed: whoever can write the repository can add self-consistent
    packs (each object matching its BLAKE3) to a signed manifest. Its signed config counts
    the packs: a pull refuses it before downloading any; a build reruns the step."""
    a, b = hosts
    spec = write_spec(daemon_root, FAILING.replace("exit 3", "true"))
    code, report = a.build_json(spec)
    assert code == 0
    wait_pushed(registry, 2)
    key = json.loads(a.amber("show", "--json", report["build"]).stdout)["steps"][-1]["key"]
    client = RegistryClient(registry)
    body, media_type, _ = client.get_manifest("amber/trunk", "step-" + key)
    doc = json.loads(body)
    junk = [b"junk %d\n" % i for i in range(200)]
    for data in junk:
        pack = layout.encode_pack([(layout.BLOB, hash_bytes(data), data)])
        client.upload("amber/trunk", sha256_digest(pack), pack, len(pack))
        doc["layers"].append(layout.descriptor(layout.PACK_TYPE, sha256_digest(pack), len(pack)))
    client.put_manifest("amber/trunk", "step-" + key, json.dumps(doc).encode(), media_type)
    client.close()

    pulled = b.amber("pull", key)
    said = (pulled.stdout + pulled.stderr).decode()
    assert pulled.returncode != 0 and "its signed config 1 (" in said, said
    assert not any(Store(b.state).has_blob(hash_bytes(data)) for data in junk)
    code, report = b.build_json(spec)
    assert code == 0 and statuses(report) == ["cached", "ran"], report
    assert "packs" in notes(b, report["build"])


def test_untrusted_or_unsigned_results_are_misses(daemon_root, registry):
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    stranger = host(daemon_root, "ci-x", registry, sign=False, trusted={}, push=False)
    b = host(daemon_root, "ci-b", registry, sign=False, trusted={"ci-a": public(a)}, push=False)
    try:
        spec = write_spec(daemon_root, FAILING.replace("exit 3", "true"))
        assert a.build_json(spec)[0] == 0
        wait_pushed(registry, 2)
        code, report = stranger.build_json(spec)
        assert code == 0 and statuses(report) == ["ran", "ran"]
        assert "is not a trusted key" in notes(stranger, report["build"])

        # The same manifests with their signature stripped, by someone who can write the registry.
        client = RegistryClient(registry)
        for tag in tags(registry):
            body, media_type, _ = client.get_manifest("amber/trunk", tag)
            doc = json.loads(body)
            del doc["annotations"]["org.amber.signature"]
            client.put_manifest("amber/trunk", tag, json.dumps(doc).encode(), media_type)
        client.close()
        code, report = b.build_json(spec)
        assert code == 0 and statuses(report) == ["ran", "ran"]
        assert "it is not signed" in notes(b, report["build"])
    finally:
        for d in (a, stranger, b):
            d.stop()


def test_a_dead_registry_never_fails_a_build_and_a_restart_finishes_the_queue(
    daemon_root, tmp_path
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    later = f"127.0.0.1:{port}"  # nothing listens here yet
    a = host(daemon_root, "ci-a", later, sign=True, trusted={})
    code, report = a.build_json(write_spec(daemon_root, SPEC.format(three="3")))
    assert code == 0 and statuses(report) == ["ran"] * 4  # the build never waited for it
    assert a.stop() == 0
    config = tmp_path / "late.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {tmp_path / 'late'}\nhttp:\n  addr: {later}\n")  # fmt: skip
    proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        a.start("--config", str(a.root / "amberd.toml"))
        assert len(wait_pushed(later, 4)) == 4  # the queue outlived the daemon
        a.stop()
    finally:
        proc.terminate()
        proc.wait()


def test_skopeo_reads_a_pushed_result(hosts, daemon_root, registry):
    a, _ = hosts
    assert a.build_json(write_spec(daemon_root, FAILING.replace("exit 3", "true")))[0] == 0
    tag = wait_pushed(registry, 2)[0]
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                          f"docker://{registry}/amber/trunk:{tag}"], capture_output=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["artifactType"] == "application/vnd.amber.step.v1"
    config = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--config", "--raw",
                             f"docker://{registry}/amber/trunk:{tag}"], capture_output=True)  # fmt: skip
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["result"]["key"] == tag.removeprefix("step-")
