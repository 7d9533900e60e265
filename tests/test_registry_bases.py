"""Bases pulled from a registry: ``base = "docker://REGISTRY/REPO:TAG|@sha256:..."`` and
``amber image import NAME docker://...``, against a real docker-registry that skopeo
pushed the image to.

What a user checks: the build runs on the image; the log and ``amber show`` name the
digest the tag had; a second build downloads no blob (the registry's access log says
so) and, by digest, needs no registry at all; a moved tag is noticed; the keys are the
tree's, not the tag's; a multi-platform index gives this machine's image; errors say
what is wrong and amberd serves on.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from amberd_process import Daemon
from conftest import serve_registry
from rootfs import make_busybox_root
from tools import need, run

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OCI_INDEX, OCI_MANIFEST, machine_architecture

MAKE_IMAGE = """
[build]
name = "img"
base = "bb"

[[step]]
name = "mark"
run = "echo {text} > /hello"
user = "root"
"""

ON_BASE = """
[build]
name = "onbase"
base = "{base}"

[[step]]
name = "read"
run = "cat /hello > /build/seen"
user = "root"

[[step]]
name = "after"
run = "cat /build/seen"
"""


def spec(amberd: Daemon, name: str, text: str) -> Path:
    path = amberd.root / name
    path.write_text(text)
    return path


def push_image(amberd: Daemon, registry: str, ref: str, text: str, creds: str | None = None) -> str:
    """An image whose /hello says ``text``, exported by amber, pushed by skopeo to
    ``registry/ref`` (as ``creds``, USER:PASSWORD); its manifest digest as skopeo reports it."""
    need("skopeo")
    code, result = amberd.build_json(
        spec(amberd, f"make-{text}.toml", MAKE_IMAGE.format(text=text))
    )
    assert code == 0, result
    archive = amberd.root / f"{text}.tar"
    exported = amberd.amber("export", result["build"], "-o", str(archive))
    assert exported.returncode == 0, exported.stderr
    login = ["--dest-creds", creds] if creds else []
    run(["skopeo", "copy", "-q", "--dest-tls-verify=false", *login, f"oci-archive:{archive}",
         f"docker://{registry}/{ref}"])  # fmt: skip
    login = ["--creds", creds] if creds else []
    info = run(["skopeo", "inspect", "--tls-verify=false", *login, f"docker://{registry}/{ref}"])
    return json.loads(info.stdout)["Digest"]


@pytest.fixture
def bb(amberd: Daemon) -> Daemon:
    root = amberd.root / "bbroot"
    make_busybox_root(root)
    assert amberd.amber("image", "import", "bb", f"dir:{root}").returncode == 0
    return amberd


def keys(amberd: Daemon, result: dict) -> list[str]:
    return [s["key"] for s in show(amberd, result["build"])["steps"]]


def access_log(registry_log: Path, since: int) -> list[str]:
    """The registry's access-log lines (combined format) written after offset ``since``."""
    text = registry_log.read_bytes()[since:].decode(errors="replace")
    return [line for line in text.splitlines() if re.search(r'"(GET|HEAD) /v2/', line)]


def blob_gets(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r'"GET /v2/\S+/blobs/', line)]


def show(amberd: Daemon, build: str) -> dict:
    proc = amberd.amber("show", build, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_tagged_base_is_pulled_once_and_named_by_digest(
    bb: Daemon, registry: str, tmp_path: Path
):
    amberd = bb
    digest = push_image(amberd, registry, "amber/bb:v1", "first")
    on_tag = spec(amberd, "tag.toml", ON_BASE.format(base=f"docker://{registry}/amber/bb:v1"))
    code, first = amberd.build_json(on_tag)
    assert code == 0, first
    assert [s["status"] for s in first["steps"]] == ["ran", "ran"]
    log = amberd.amber("log", first["build"], "--step", "after").stdout.decode()
    assert "first" in log
    # The log and `amber show` say which image the tag was.
    pinned = f"docker://{registry}/amber/bb@{digest}"
    notes = amberd.amber("log", first["build"]).stdout.decode()
    assert f"is {pinned}" in notes and "pulled 2 layer(s)" in notes, notes
    assert show(amberd, first["build"])["base_digest"] == digest
    text = amberd.amber("show", first["build"]).stdout.decode()
    assert f"docker://{registry}/amber/bb:v1 ({digest})" in text

    # Again: one manifest GET to re-resolve the tag, no blob downloaded, every step cached.
    registry_log = tmp_path / "registry.log"
    mark = registry_log.stat().st_size
    code, second = amberd.build_json(on_tag)
    assert code == 0, second
    assert [s["status"] for s in second["steps"]] == ["cached", "cached"]
    requests = access_log(registry_log, mark)
    assert blob_gets(requests) == [], requests
    assert len([r for r in requests if "/manifests/v1 " in r]) == 1, requests
    assert (
        "pulled before, nothing downloaded" in amberd.amber("log", second["build"]).stdout.decode()
    )

    # By digest, the same keys (they are the tree's), and no registry needed at all.
    on_digest = spec(amberd, "digest.toml", ON_BASE.format(base=pinned))
    mark = registry_log.stat().st_size
    code, by_digest = amberd.build_json(on_digest)
    assert code == 0, by_digest
    assert keys(amberd, by_digest) == keys(amberd, first)
    assert access_log(registry_log, mark) == []

    # A named image of the same pull: `amber image import NAME docker://...`, same keys.
    imported = amberd.amber("image", "import", "bbpulled", f"docker://{registry}/amber/bb:v1")
    assert imported.returncode == 0, imported.stderr
    assert pinned.encode() in imported.stdout
    code, named = amberd.build_json(spec(amberd, "named.toml", ON_BASE.format(base="bbpulled")))
    assert code == 0 and keys(amberd, named) == keys(amberd, first), named
    assert [s["status"] for s in named["steps"]] == ["cached", "cached"]

    # The tag moves: noticed on the next build, which runs on the new image.
    moved = push_image(amberd, registry, "amber/bb:v1", "second")
    assert moved != digest
    code, third = amberd.build_json(on_tag)
    assert code == 0, third
    assert [s["status"] for s in third["steps"]] == ["ran", "ran"]
    assert "second" in amberd.amber("log", third["build"], "--step", "after").stdout.decode()
    assert show(amberd, third["build"])["base_digest"] == moved
    # The named image stays what the tag was when it was imported.
    listed = json.loads(amberd.amber("image", "ls", "--json").stdout)["images"]
    assert [i["source"] for i in listed if i["name"] == "bbpulled"] == [pinned]


def test_a_digest_base_builds_with_the_registry_gone(bb: Daemon, tmp_path: Path):
    """Pulled once (here by tag), a base named by digest needs no registry: stopped
    after the first build. A tag cannot be resolved then: the error names the digest."""
    amberd = bb
    (tmp_path / "r").mkdir()
    with serve_registry(tmp_path / "r") as reg:
        digest = push_image(amberd, reg, "amber/bb:v1", "offline")
        on_tag = spec(amberd, "tag.toml", ON_BASE.format(base=f"docker://{reg}/amber/bb:v1"))
        code, first = amberd.build_json(on_tag)
        assert code == 0, first
    # The registry is gone now: the first step is a hit, the changed second one runs.
    base = f"docker://{reg}/amber/bb@{digest}"
    changed = ON_BASE.format(base=base).replace("cat /build/seen", "cat /build/seen; echo more")
    code, second = amberd.build_json(spec(amberd, "changed.toml", changed))
    assert code == 0, second
    assert [s["status"] for s in second["steps"]] == ["cached", "ran"]
    assert "offline" in amberd.amber("log", second["build"], "--step", "after").stdout.decode()
    # A tag must be resolved: the build says it cannot and what to name, and amberd serves on.
    code, tagged = amberd.build_json(on_tag)
    assert code != 0 and tagged["status"] == "errored", tagged
    assert "cannot reach registry" in tagged["error"], tagged
    assert f"your last pull of this tag was {base}" in tagged["error"], tagged
    assert amberd.amber("status").returncode == 0


def busybox_layer(tmp_path: Path) -> bytes:
    """A busybox root as one uncompressed layer, owned by root (/build by uid 1000)."""
    root = make_busybox_root(tmp_path / "bb-layer")

    def owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
        build = info.name in ("build", "./build")
        info.uid = info.gid = 1000 if build else 0
        info.uname = info.gname = ""
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(root.iterdir()):
            tar.add(entry, arcname=entry.name, filter=owner)
    return buf.getvalue()


def put_index(registry: str, repo: str, arches: list[str], base_layer: bytes) -> str:
    """A multi-platform index at ``repo:latest``: per architecture, ``base_layer`` and a
    layer with one file, /ARCH.txt; returns the index's digest."""
    from test_oci import layer_tar, member

    def sha(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def desc(data: bytes, media_type: str, **more) -> dict:
        return {"mediaType": media_type, "digest": sha(data), "size": len(data), **more}

    client = RegistryClient(registry)
    try:
        entries = []
        for arch in arches:
            layer = layer_tar((member(f"{arch}.txt", mode=0o644), f"the {arch} image\n".encode()))
            config = json.dumps({"architecture": arch, "os": "linux", "rootfs": {
                "type": "layers", "diff_ids": [sha(base_layer), sha(layer)]}}).encode()  # fmt: skip
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": desc(config, "application/vnd.oci.image.config.v1+json"),
                "layers": [desc(b, "application/vnd.oci.image.layer.v1.tar") for b in (base_layer, layer)],
            }).encode()  # fmt: skip
            for blob in (base_layer, layer, config):
                client.upload(repo, sha(blob), blob, len(blob))
            client.put_manifest(repo, sha(manifest), manifest, OCI_MANIFEST)
            platform = {"architecture": arch, "os": "linux"}
            entries.append(desc(manifest, OCI_MANIFEST, platform=platform))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return client.put_manifest(repo, "latest", json.dumps(index).encode(), OCI_INDEX)
    finally:
        client.close()


LIST = """
[build]
name = "multi"
base = "docker://{registry}/{repo}:latest"

[[step]]
name = "ls"
run = "cat /*.txt"
"""


def test_a_multi_platform_index_gives_this_machines_image(
    amberd: Daemon, registry: str, tmp_path: Path
):
    host = machine_architecture()
    other = "arm64" if host != "arm64" else "amd64"
    layer = busybox_layer(tmp_path)
    index = put_index(registry, "amber/multi", [other, host, "s390x"], layer)
    code, result = amberd.build_json(
        spec(amberd, "m.toml", LIST.format(registry=registry, repo="amber/multi"))
    )
    assert code == 0, result
    out = amberd.amber("log", result["build"], "--step", "ls").stdout.decode()
    assert out.strip() == f"the {host} image", out
    assert show(amberd, result["build"])["base_digest"] == index
    notes = amberd.amber("log", result["build"]).stdout.decode()
    assert "this platform's manifest sha256:" in notes, notes

    # An index without this machine's platform: a clear error, and amberd serves on.
    put_index(registry, "amber/foreign", [other, "s390x"], layer)
    foreign = spec(amberd, "f.toml", LIST.format(registry=registry, repo="amber/foreign"))
    code, result = amberd.build_json(foreign)
    assert code != 0 and result["status"] == "errored", result
    assert f"none for linux/{host}" in result["error"] and "linux/s390x" in result["error"], result
    # Nor is the one image of an index taken when it says it is another platform's.
    put_index(registry, "amber/one", [other], layer)
    code, result = amberd.build_json(
        spec(amberd, "o.toml", LIST.format(registry=registry, repo="amber/one"))
    )
    assert code != 0 and f"none for linux/{host} (it has: linux/{other})" in result["error"], result
    assert amberd.amber("status").returncode == 0


def test_an_unknown_tag_or_a_tampered_layer_is_a_clear_error(
    bb: Daemon, registry: str, tmp_path: Path
):
    amberd = bb
    push_image(amberd, registry, "amber/bad:v1", "tampered")
    code, result = amberd.build_json(
        spec(amberd, "nope.toml", ON_BASE.format(base=f"docker://{registry}/amber/bad:nope"))
    )
    assert code != 0 and result["status"] == "errored", result
    assert f"{registry}/amber/bad has no tag 'nope'" in result["error"], result

    # Change the config where the registry keeps it (same length): its digest no longer matches.
    inspect = [
        "skopeo",
        "inspect",
        "--raw",
        "--tls-verify=false",
        f"docker://{registry}/amber/bad:v1",
    ]
    config = json.loads(run(inspect).stdout)["config"]["digest"].removeprefix("sha256:")
    data = tmp_path / "registry-data/docker/registry/v2/blobs/sha256" / config[:2] / config / "data"
    body = data.read_bytes()
    assert b'"architecture"' in body
    data.write_bytes(body.replace(b'"architecture"', b'"Architecture"'))
    on_tag = spec(amberd, "bad.toml", ON_BASE.format(base=f"docker://{registry}/amber/bad:v1"))
    for _ in range(2):  # and nothing of it was kept as that image: refused again
        code, result = amberd.build_json(on_tag)
        assert code != 0 and result["status"] == "errored", result
        assert f"blob sha256:{config} does not match its digest" in result["error"], result

    # A manifest named by digest that the registry serves changed: refused too.
    digest = push_image(amberd, registry, "amber/bad2:v1", "manifest")
    data = (
        tmp_path
        / "registry-data/docker/registry/v2/blobs/sha256"
        / digest[7:9]
        / digest[7:]
        / "data"
    )
    body = data.read_bytes()
    data.write_bytes(body.replace(b'"schemaVersion"', b'"SchemaVersion"'))
    by_digest = spec(
        amberd, "bad2.toml", ON_BASE.format(base=f"docker://{registry}/amber/bad2@{digest}")
    )
    code, result = amberd.build_json(by_digest)
    assert code != 0 and result["status"] == "errored", result
    assert f"manifest {digest} does not match its digest" in result["error"], result
    assert amberd.amber("status").returncode == 0


HELPER = """#!/bin/sh
# A docker credential helper: `get` reads the registry on stdin, answers JSON.
cat > {log}
[ "$1" = get ] || exit 1
echo '{{"ServerURL": "x", "Username": "alice", "Secret": "s3cret"}}'
"""


@pytest.fixture
def htpasswd_registry(tmp_path: Path):
    need("htpasswd")
    users = tmp_path / "htpasswd"
    run(["htpasswd", "-Bbc", str(users), "alice", "s3cret"])
    run(["htpasswd", "-Bb", str(users), "mallory", "m4l"])
    extra = f"auth:\n  htpasswd:\n    realm: amber-test\n    path: {users}\n"
    with serve_registry(tmp_path, extra) as address:
        yield address


@pytest.mark.parametrize("how", ["credHelpers", "credsStore"])
def test_credentials_from_a_docker_credential_helper(
    bb: Daemon, htpasswd_registry: str, tmp_path: Path, how: str
):
    """docker's config.json sends the registry to ``docker-credential-test``, which amber
    (the client, as the user) runs with the host on stdin, as docker does."""
    amberd, reg = bb, htpasswd_registry
    digest = push_image(amberd, reg, "amber/priv:v1", "private", creds="alice:s3cret")
    base = f"docker://{reg}/amber/priv:v1"
    anonymous = amberd.amber("image", "import", "priv", base)
    assert anonymous.returncode != 0 and b"no credentials" in anonymous.stderr, anonymous.stderr
    bin_dir, config = tmp_path / "helper-bin", tmp_path / "docker"
    bin_dir.mkdir()
    config.mkdir()
    helper = bin_dir / "docker-credential-test"
    helper.write_text(HELPER.format(log=tmp_path / "helper-stdin"))
    helper.chmod(0o755)
    doc = (
        {"credHelpers": {reg: "test"}}
        if how == "credHelpers"
        else {"credsStore": "test", "auths": {reg: {}}}
    )
    (config / "config.json").write_text(json.dumps(doc))
    amberd.env.update(DOCKER_CONFIG=str(config), PATH=f"{bin_dir}:{amberd.env['PATH']}")
    amberd.env.pop("REGISTRY_AUTH_FILE", None)
    imported = amberd.amber("image", "import", "priv", base)
    assert imported.returncode == 0, imported.stderr
    assert (tmp_path / "helper-stdin").read_text() == reg
    priv = spec(amberd, "priv.toml", ON_BASE.format(base=base))
    verified = amberd.amber("verify", str(priv))  # resolves the base as a build would
    assert verified.returncode == 0, verified.stderr
    code, result = amberd.build_json(priv)
    assert code == 0, result
    assert show(amberd, result["build"])["base_digest"] == digest
    assert "private" in amberd.amber("log", result["build"], "--step", "after").stdout.decode()


def test_builds_starting_together_pull_a_base_once(bb: Daemon, registry: str, tmp_path: Path):
    """CI starts many jobs on one base at once: one pull, the others wait for it."""
    amberd = bb
    push_image(amberd, registry, "amber/bb:v1", "together")
    registry_log = tmp_path / "registry.log"
    mark = registry_log.stat().st_size
    base = f"docker://{registry}/amber/bb:v1"
    specs = [spec(amberd, f"t{i}.toml", ON_BASE.format(base=base).replace("seen", f"seen{i}"))
             for i in range(3)]  # fmt: skip
    procs = [subprocess.Popen([str(amberd.bin / "amber"), "build", str(path)], env=amberd.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for path in specs]  # fmt: skip
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    gets = [
        re.search(r"/blobs/(sha256:\w+)", line).group(1)
        for line in blob_gets(access_log(registry_log, mark))
    ]
    assert gets and len(gets) == len(set(gets)), gets


@pytest.mark.parametrize(
    ("base", "problem"),
    [
        ("docker://127.0.0.1:5000/a/b:v1", None),
        ("docker://[::1]:5000/a", None),
        ("docker://reg.example/a@sha256:" + "a" * 64, None),
        ("docker://debian:12", "needs a registry host, e.g. docker://docker.io/debian:12"),
        ("docker://a.b#c/x:1", '"a.b#c" is not a registry host[:port]'),
        ("docker://a.b?c/x:1", '"a.b?c" is not a registry host[:port]'),
        ("docker://reg.io/a:t@sha256:" + "b" * 64, "give a tag or a digest, not both"),
        ("docker://reg.io/a@sha256:abc", "malformed digest"),
    ],
)
def test_a_docker_base_is_checked_when_the_spec_is_read(base: str, problem: str | None):
    from amber.daemon.build.spec import SpecError, parse_spec

    text = f'[build]\nname = "n"\nbase = "{base}"\n[[step]]\nname = "s"\nrun = "true"\n'
    if problem is None:
        assert str(parse_spec(text, "/x/s.toml", Path("/x")).base) == base
        return
    with pytest.raises(SpecError, match=re.escape(problem)):
        parse_spec(text, "/x/s.toml", Path("/x"))


def test_a_pulled_base_collected_by_gc_is_pulled_again(bb: Daemon, registry: str, tmp_path: Path):
    """A pulled base is a cache, not a GC root: once collected, its record no longer
    counts and the next build pulls the image again instead of failing."""
    amberd = bb
    digest = push_image(amberd, registry, "amber/bb:v1", "collected")
    on_digest = spec(
        amberd, "d.toml", ON_BASE.format(base=f"docker://{registry}/amber/bb@{digest}")
    )
    code, first = amberd.build_json(on_digest)
    assert code == 0, first
    gc = amberd.amber("gc", "--json")
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["objects"] > 0
    registry_log = tmp_path / "registry.log"
    mark = registry_log.stat().st_size
    code, again = amberd.build_json(on_digest)
    assert code == 0, again
    assert [s["status"] for s in again["steps"]] == ["ran", "ran"]
    assert blob_gets(access_log(registry_log, mark))
    notes = amberd.amber("log", again["build"]).stdout.decode()
    assert "pulled 2 layer(s)" in notes and "collected" in notes, notes


def test_a_base_behind_a_token_server(bb: Daemon, registry: str, tmp_path: Path):
    """Bearer tokens (``WWW-Authenticate: Bearer realm=...``), as for image export and import."""
    from test_registry_auth import TokenGate, auth_json

    amberd = bb
    digest = push_image(amberd, registry, "amber/bb:v1", "tokened")  # behind the gate
    gate = TokenGate(registry, "bob", "hunter2")
    try:
        base = f"docker://{gate.address}/amber/bb:v1"
        on_gate = spec(amberd, "gate.toml", ON_BASE.format(base=base))
        code, refused = amberd.build_json(on_gate)
        assert code != 0 and "no credentials" in refused["error"], refused
        login = auth_json(tmp_path / "auth.json", gate.address, "bob", "hunter2")
        amberd.env["REGISTRY_AUTH_FILE"] = str(login)
        code, result = amberd.build_json(on_gate)
        assert code == 0, result
        assert show(amberd, result["build"])["base_digest"] == digest
        assert gate.token_requests
    finally:
        gate.server.shutdown()
        gate.server.server_close()
