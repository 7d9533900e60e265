"""Pins across hosts, through a real docker-registry and real amberd hosts.

`amber build --pin NAME` tags each of the pin's results in the remotes the
host pushes to (``pin-USER.NAME.N``), `amber pin ls` says where a pin lives,
`amber pin rm` re-points the tags it made at a tombstone, and the registry's
own garbage collector keeps what is pinned after an operator pruned step tags.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

from amberd_process import Daemon
from second_user import BOB, MAL, user_of
from test_remote import FAILING, SPEC, notes, public, run_amber, statuses, write_spec

from amber.daemon.oci.errors import OciError
from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OCI_MANIFEST, sha256_digest
from amber.daemon.remote.pins import tombstone

TRUNK = "amber/trunk"
PRUNE = Path(__file__).resolve().parent.parent / "scripts" / "registry-prune-steps"


def remote_host(root: Path, name: str, remotes: list[tuple[str, bool]], *, sign: bool,
                trusted: dict[str, str], top: str = "", cache: str = "") -> Daemon:  # fmt: skip
    """An amberd with its own state, key and ``[[cache.remote]]`` list of (url, push)."""
    home = root / name
    home.mkdir()
    (home / "keys").mkdir()
    lines = [top]
    for url, push in remotes:
        lines.append(f'[[cache.remote]]\nurl = "{url}"\npush = {str(push).lower()}')
    lines.append(f'[cache]\ntrusted-keys = "{home / "trusted"}"\n{cache}')
    if sign:
        run_amber("key", "generate", name, "--dir", str(home / "keys"))
        lines.append(f'signing-key = "{home / "keys" / (name + ".key")}"')
    (home / "trusted").write_text("")
    for other, key in trusted.items():
        run_amber("key", "trust", other, key, "--file", str(home / "trusted"))
    (home / "amberd.toml").write_text("\n".join(lines) + "\n")
    return Daemon(home).start("--config", str(home / "amberd.toml"))


def repo_tags(registry: str, repo: str = TRUNK) -> dict[str, str]:
    """Every tag of ``repo`` and the manifest digest it names."""
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/{repo}/tags/list") as r:
            names = json.load(r).get("tags") or []
    except OSError:
        return {}
    client = RegistryClient(registry)
    try:
        found = {t: settled_manifest(client, repo, t) for t in names}
        return {t: m[2] for t, m in found.items() if m is not None}
    finally:
        client.close()


def settled_manifest(client: RegistryClient, repo: str, tag: str) -> tuple | None:
    """The tag's manifest, or None while a host writes it: distribution 2.8 lists a tag
    before its link is written (404) and can answer 500 while the link is rewritten."""
    try:
        return client.get_manifest(repo, tag)
    except OciError as exc:
        if getattr(exc, "status", None) in (404, 500):
            return None
        raise


def artifact_type(registry: str, tag: str, repo: str = TRUNK) -> str | None:
    client = RegistryClient(registry)
    try:
        found = settled_manifest(client, repo, tag)
        return None if found is None else json.loads(found[0]).get("artifactType")
    finally:
        client.close()


def pins(daemon: Daemon, user=None) -> dict[str, dict]:
    proc = (user or daemon).amber("pin", "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)["pins"]}


def wait_tagged(daemon: Daemon, name: str, count: int, user=None) -> list[str]:
    """The pin's remote tags, once ``count`` of them are tagged."""
    deadline = time.monotonic() + 120
    while True:
        remotes = pins(daemon, user).get(name, {}).get("remotes") or []
        states = [s for r in remotes for s in r["states"]]
        if states.count("tagged") >= count:
            return [t for r in remotes for t in r["tags"]]
        assert not any(s.startswith("failed") for s in states), remotes
        assert time.monotonic() < deadline, remotes
        time.sleep(0.2)


def wait_tombstones(registry: str, tags: list[str]) -> None:
    deadline = time.monotonic() + 60
    while any(artifact_type(registry, t) != "application/vnd.amber.pin-removed.v1" for t in tags):
        assert time.monotonic() < deadline, repo_tags(registry)
        time.sleep(0.2)


def step_keys(daemon: Daemon, build: str) -> list[str]:
    shown = json.loads(daemon.amber("show", "--json", build).stdout)
    return [s["key"] for s in shown["steps"]]


def trunk(registry: str) -> str:
    return f"http://{registry}/{TRUNK}"


def test_pins_are_tagged_where_the_host_pushes_and_pin_rm_untags_only_them(
    daemon_root: Path, registry: str
):
    a = remote_host(daemon_root, "ci-a", [(trunk(registry), True)], sign=True, trusted={})
    # B signs nothing (it pushes no results) but writes pin tags in trunk.
    b = remote_host(daemon_root, "ci-b", [(trunk(registry), True)], sign=False,
                    trusted={"ci-a": public(a)})  # fmt: skip
    try:
        spec = write_spec(daemon_root, SPEC.format(three="3"))
        code, report = a.build_json(spec, "--pin", "release")
        assert code == 0 and statuses(report) == ["ran"] * 4
        tagged = wait_tagged(a, "release", 4)
        assert tagged == [f"pin-root.release.{i}" for i in range(4)]
        on_registry = repo_tags(registry)
        keys = step_keys(a, report["build"])
        for i, key in enumerate(keys):  # the same manifest under a second tag
            assert on_registry[f"pin-root.release.{i}"] == on_registry[f"step-{key}"]
        listed = a.amber("pin", "ls").stdout.decode()
        assert f"local, {trunk(registry)}" in listed

        # B pins a build made only of remote hits: tagged from the manifests alone.
        code, report_b = b.build_json(spec, "--pin", "b-side")
        assert code == 0 and statuses(report_b) == ["cached"] * 4, report_b
        assert wait_tagged(b, "b-side", 4) == [f"pin-root.b-side.{i}" for i in range(4)]
        assert "tagging its results in" in notes(b, report_b["build"])

        # Moved to a build of two results: tags 0 and 1 follow it, 2 and 3 are tombstones.
        short = write_spec(daemon_root, FAILING.replace("exit 3", "true"), "short.toml")
        code, moved = a.build_json(short, "--pin", "release")
        assert code == 0
        assert wait_tagged(a, "release", 2) == ["pin-root.release.0", "pin-root.release.1"]
        wait_tombstones(registry, ["pin-root.release.2", "pin-root.release.3"])
        now = repo_tags(registry)
        for i, key in enumerate(step_keys(a, moved["build"])):
            assert now[f"pin-root.release.{i}"] == now[f"step-{key}"]

        removed = a.amber("pin", "rm", "release")
        assert removed.returncode == 0, removed.stderr
        assert f"its tags in {trunk(registry)} are being re-pointed" in removed.stdout.decode()
        wait_tombstones(registry, [f"pin-root.release.{i}" for i in range(4)])
        after = repo_tags(registry)
        for i, key in enumerate(keys):  # the step tags and B's pin still name the results
            assert after[f"step-{key}"] == on_registry[f"step-{key}"]
            assert after[f"pin-root.b-side.{i}"] == on_registry[f"step-{key}"]
        assert "release" not in pins(a)
        before = a.amber("builds", "-q", "--all").stdout
        bad = a.amber("build", str(spec), "--pin", "no spaces please")
        assert bad.returncode != 0 and b"would be tagged in a remote cache" in bad.stderr
        assert a.amber("builds", "-q", "--all").stdout == before  # refused before it was queued
    finally:
        a.stop()
        b.stop()


def test_a_user_cannot_move_or_remove_another_users_remote_pin(daemon_root: Path, registry: str):
    world = "socket-mode = 0o666"
    one = remote_host(daemon_root, "ci-one", [(trunk(registry), True)], sign=True, trusted={},
                      top=world)  # fmt: skip
    two = remote_host(daemon_root, "ci-two", [(trunk(registry), True)], sign=True, trusted={},
                      top=world)  # fmt: skip
    try:
        bob, mal = user_of(one, BOB), user_of(one, MAL)
        spec = bob.write("spec.toml", SPEC.format(three="bob"))
        code, out = bob.said("build", spec, "--pin", "release")
        assert code == 0, out
        bobs = wait_tagged(one, "release", 4, user=bob)
        assert bobs[0] == f"pin-uid{BOB}.release.0"  # no passwd entry here: scoped by uid
        before = repo_tags(registry)

        code, out = mal.said("pin", "rm", "release")
        assert code != 0 and f"belongs to uid {BOB}" in out
        # On another host, mal's pin of the same name is mal's own tags.
        mal_two = user_of(two, MAL)
        spec = mal_two.write("spec.toml", SPEC.format(three="mal"))
        code, out = mal_two.said("build", spec, "--pin", "release")
        assert code == 0, out
        assert wait_tagged(two, "release", 4, user=mal_two)[0] == f"pin-uid{MAL}.release.0"
        code, out = mal_two.said("pin", "rm", "release")
        assert code == 0, out
        time.sleep(1)  # the worker's untagging of mal's tags
        after = repo_tags(registry)
        assert {t: after[t] for t in bobs} == {t: before[t] for t in bobs}
    finally:
        one.stop()
        two.stop()


def test_registry_gc_keeps_what_is_pinned_after_step_tags_are_pruned(
    daemon_root: Path, registry: str, tmp_path: Path
):
    a = remote_host(daemon_root, "ci-a", [(trunk(registry), True)], sign=True, trusted={})
    b = remote_host(daemon_root, "ci-b", [(trunk(registry), False)], sign=False,
                    trusted={"ci-a": public(a)})  # fmt: skip
    try:
        pinned = write_spec(daemon_root, SPEC.format(three="kept"))
        loose = write_spec(
            daemon_root, SPEC.format(three="loose").replace("echo one", "echo uno"), "l.toml"
        )
        assert a.build_json(pinned, "--pin", "keep")[0] == 0
        code, report = a.build_json(loose)
        assert code == 0
        wait_tagged(a, "keep", 4)
        loose_keys = step_keys(a, report["build"])
        deadline = time.monotonic() + 120
        while not all(f"step-{k}" in repo_tags(registry) for k in loose_keys):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        storage = tmp_path / "registry-data"
        loose_config = _config_blob(registry, f"step-{loose_keys[0]}")

        # The operator prunes every step tag (older than 0 days) but the pinned ones, then GCs.
        pruned = subprocess.run([str(PRUNE), str(storage), TRUNK, "--older-than", "0"],
                                capture_output=True, text=True)  # fmt: skip
        assert pruned.returncode == 0, pruned.stderr
        assert f"removed step-{loose_keys[0]}" in pruned.stdout
        gc = subprocess.run(["docker-registry", "garbage-collect", "--delete-untagged",
                             str(tmp_path / "registry.yml")], capture_output=True, text=True)  # fmt: skip
        assert gc.returncode == 0, gc.stderr
        blob = storage / "docker/registry/v2/blobs/sha256" / loose_config[7:9] / loose_config[7:]
        assert not blob.exists()  # the unpinned result is collected

        code, report = b.build_json(pinned)
        assert code == 0 and statuses(report) == ["cached"] * 4  # every pinned result a hit
        shell = b.amber("shell", report["build"], "--step", "four", "--", "cat", "four")
        assert shell.returncode == 0 and shell.stdout == b"one\nkept\n", shell.stderr  # its files
        code, report = b.build_json(loose)
        assert code == 0 and statuses(report) == ["ran"] * 4

        # A pin tag alone keeps a result whose step tag went: the whole artifact copies.
        step_four = f"step-{step_keys(a, pins(a)['keep']['target'])[3]}"
        tag_dir = (
            storage / "docker/registry/v2/repositories" / TRUNK / "_manifests/tags" / step_four
        )
        subprocess.run(["rm", "-r", str(tag_dir)], check=True)
        gc = subprocess.run(["docker-registry", "garbage-collect", "--delete-untagged",
                             str(tmp_path / "registry.yml")], capture_output=True, text=True)  # fmt: skip
        assert gc.returncode == 0, gc.stderr
        copied = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                                 f"docker://{registry}/{TRUNK}:pin-root.keep.3",
                                 f"dir:{tmp_path / 'kept'}"], capture_output=True)  # fmt: skip
        assert copied.returncode == 0, copied.stderr
    finally:
        a.stop()
        b.stop()


def _config_blob(registry: str, tag: str) -> str:
    client = RegistryClient(registry)
    try:
        return json.loads(client.get_manifest(TRUNK, tag)[0])["config"]["digest"]
    finally:
        client.close()


NONDETERMINISTIC = """
[build]
name = "stamp"
base = "host"

[[step]]
name = "stamp"
run = "date +%s%N > stamp"
"""


def test_a_pin_tags_only_the_result_pinned_not_another_of_its_key(daemon_root: Path, registry: str):
    a = remote_host(daemon_root, "ci-a", [(trunk(registry), True)], sign=True, trusted={})
    c = remote_host(daemon_root, "ci-c", [(trunk(registry), True)], sign=True, trusted={})
    try:
        spec = write_spec(daemon_root, NONDETERMINISTIC)
        code, first = a.build_json(spec)
        assert code == 0
        key = step_keys(a, first["build"])[0]
        mine = wait_for_tag(registry, f"step-{key}")
        # Host C builds the same key without reading trunk (an empty repository instead)
        # and pushes its own result, with other contents, to trunk's step-KEY.
        other = f"http://{registry}/amber/elsewhere"
        code, second = c.build_json(spec, "--cache-from", other, "--cache-to", trunk(registry))
        assert code == 0 and statuses(second) == ["ran"]
        deadline = time.monotonic() + 60
        while repo_tags(registry).get(f"step-{key}", mine) == mine:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        added = a.amber("pin", "add", "first", first["build"])
        assert added.returncode == 0, added.stderr
        states = wait_failed(a, "first")
        assert "holds another result of the key" in states[0]
        assert "pin-root.first.0" not in repo_tags(registry)
        assert "(failed)" in a.amber("pin", "ls").stdout.decode()

        # A step tag that is no amber result at all (someone with write access put an
        # empty artifact there): the pin says why, amberd serves on.
        client = RegistryClient(registry)
        client.upload(TRUNK, sha256_digest(b"{}"), b"{}", 2)
        client.put_manifest(TRUNK, f"step-{key}", tombstone(), OCI_MANIFEST)
        client.close()
        assert a.amber("pin", "add", "again", first["build"]).returncode == 0
        states = wait_failed(a, "again")
        assert "not an amber step result" in states[0]
    finally:
        a.stop()
        c.stop()


def wait_failed(daemon: Daemon, name: str) -> list[str]:
    """The states of a pin's tags in its first remote, once the first has failed."""
    deadline = time.monotonic() + 60
    while not (states := pins(daemon)[name]["remotes"][0]["states"])[0].startswith("failed"):
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
    return states


def wait_for_tag(registry: str, tag: str) -> str:
    deadline = time.monotonic() + 60
    while (digest := repo_tags(registry).get(tag)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return digest
