"""amber in scripts: --json on every command that answers, -q ids, RFC 3339 times,
images removed only when nothing uses them, imports from plain-HTTP registries."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

from amberd_process import BIN, Daemon
from rootfs import make_busybox_root


def write_spec(directory: Path, name: str, *runs: str, base: str = "host") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    steps = "".join(f'[[step]]\nname = "s{i}"\nrun = "{run}"\n' for i, run in enumerate(runs, 1))
    path = directory / "spec.toml"
    path.write_text(f'[build]\nname = "{name}"\nbase = "{base}"\n{steps}')
    return path


def amber_json(daemon: Daemon, *args: str) -> dict:
    proc = daemon.amber(*args, "--json")
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    assert proc.stdout.count(b"\n") == 1, proc.stdout  # one object, one line
    return json.loads(proc.stdout)


def a_time(value: object) -> datetime:
    """An RFC 3339 time as amber prints them: UTC, ending in Z."""
    assert isinstance(value, str) and value.endswith("Z"), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    assert abs(parsed.timestamp() - time.time()) < 3600, value  # this build's, not 1970's
    return parsed


def wait_running(daemon: Daemon, build: str) -> None:
    deadline = time.monotonic() + 60
    while amber_json(daemon, "ps")["builds"][0]["status"] != "running":
        assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
        time.sleep(0.1)
    assert amber_json(daemon, "ps")["builds"][0]["id"] == build


def test_every_answer_as_json_with_rfc3339_times(amberd: Daemon):
    spec = write_spec(amberd.root / "ok", "ok", "echo result > out")
    code, built = amberd.build_json(spec)
    assert code == 0 and built["status"] == "success"
    assert a_time(built["created"]) <= a_time(built["finished"])
    bid = built["build"]

    listing = amber_json(amberd, "builds")["builds"]
    assert [b["id"] for b in listing] == [bid]
    for b in listing:
        a_time(b["created"]), a_time(b["finished"])
    assert amberd.amber("builds", "-q").stdout == f"{bid}\n".encode()

    pinned = amber_json(amberd, "pin", "add", "keep", bid)
    assert (pinned["name"], pinned["target"], pinned["kind"]) == ("keep", bid, "build")
    a_time(pinned["created"])
    (listed,) = amber_json(amberd, "pin", "ls")["pins"]
    assert listed["name"] == "keep" and a_time(listed["created"])
    assert amber_json(amberd, "pin", "rm", "keep")["name"] == "keep"
    assert amber_json(amberd, "pin", "ls")["pins"] == []

    archive = amberd.root / "ok.tar"
    exported = amber_json(amberd, "export", bid, "-o", str(archive))
    assert exported["build"] == bid and exported["path"] == str(archive) and archive.is_file()
    assert exported["digest"].startswith("sha256:") and exported["layers"] == 2
    imported = amber_json(amberd, "import", str(archive))
    assert imported["steps"] == ["s1"] and imported["build"] != bid
    deleted = amber_json(amberd, "delete", imported["build"])
    assert deleted == {"build": imported["build"], "deleted": True}

    collected = amber_json(amberd, "gc")
    assert isinstance(collected["freed_bytes"], int) and isinstance(collected["objects"], int)
    status = amber_json(amberd, "status")
    assert status["version"] and a_time(status["last_gc"])
    assert isinstance(status["store_bytes"], int) and status["running"] == 0

    root = amberd.root / "bb"
    make_busybox_root(root)
    image = amber_json(amberd, "image", "import", "bb", f"dir:{root}")
    assert image["name"] == "bb" and len(image["tree"]) == 64
    (shown,) = amber_json(amberd, "image", "ls")["images"]
    assert shown["name"] == "bb" and shown["tree"] == image["tree"] and a_time(shown["created"])
    removed = amber_json(amberd, "image", "rm", "bb")
    assert removed == {"name": "bb", "uid": 0, "tree": image["tree"], "removed": True}
    assert amber_json(amberd, "image", "ls")["images"] == []


def test_ps_q_and_cancel_json_on_a_running_build(amberd: Daemon):
    spec = write_spec(amberd.root / "slow", "slow", "sleep 600")
    started = amberd.amber("build", "--detach", "--json", str(spec))
    assert started.returncode == 0, started.stderr
    bid = json.loads(started.stdout)["build"]
    wait_running(amberd, bid)
    (running,) = amber_json(amberd, "ps")["builds"]
    assert running["id"] == bid and a_time(running["created"])
    assert amberd.amber("ps", "-q").stdout == f"{bid}\n".encode()
    assert amberd.amber("builds", "-q", "--all").stdout == f"{bid}\n".encode()
    cancelled = amber_json(amberd, "cancel", bid)
    assert cancelled == {"build": bid, "cancelled": True, "status": "errored"}
    assert amberd.amber("ps", "-q").stdout == b""
    again = amber_json(amberd, "cancel", bid)
    assert again["cancelled"] is False


def test_builds_all_names_each_builds_user(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text("socket-mode = 0o666\n")
    d = Daemon(daemon_root).start("--config", str(config))
    try:
        assert d.build_json(write_spec(d.root / "r", "roots", "true"))[0] == 0
        theirs = d.root / "user"
        spec = write_spec(theirs, "theirs", "true")
        for path in (theirs, spec):
            os.chown(path, 4242, 4242)
        user = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", str(BIN / "amber")]
        env = dict(d.env, HOME="/tmp")
        built = subprocess.run([*user, "build", str(spec)], capture_output=True, env=env)
        assert built.returncode == 0, built.stderr
        lines = d.amber("builds", "--all").stdout.decode().splitlines()
        assert lines[0].split()[:3] == ["BUILD", "NAME", "USER"]
        rows = {line.split()[1]: line.split()[2] for line in lines[1:] if line[:1].strip()}
        assert rows["roots"] == "root" and rows["theirs"] == "4242"  # no passwd entry: the uid
        mine = d.amber("builds").stdout.decode().splitlines()[0]
        assert "USER" not in mine  # only your own builds: no need to say whose
        # Root's images are the shared names: a user's own import does not replace them.
        root = d.root / "bb"
        make_busybox_root(root)
        assert d.amber("image", "import", "shared", f"dir:{root}").returncode == 0
        refused = subprocess.run([*user, "image", "rm", "shared"], capture_output=True, env=env)
        assert refused.returncode == 1 and b"the shared one is root's" in refused.stderr
        refused = subprocess.run(
            [*user, "image", "rm", "--shared", "shared"], capture_output=True, env=env
        )
        assert refused.returncode == 1 and b"only root may remove a shared" in refused.stderr
        for shared in ([], ["--shared"]):
            imported = subprocess.run(
                [*user, "image", "import", *shared, "shared", f"dir:{theirs}"],
                capture_output=True,
                env=env,
            )
            assert imported.returncode == (1 if shared else 0), imported.stderr
        assert b"only root may import a shared" in imported.stderr
        listed = json.loads(d.amber("image", "ls", "--json").stdout)["images"]
        assert [(i["name"], i["uid"]) for i in listed] == [("shared", 0), ("shared", 4242)]
        still = listed[0]
        assert still["source"] == f"dir:{root}"
    finally:
        assert d.stop() == 0


def test_image_rm_refuses_while_a_pin_or_a_build_uses_it(amberd: Daemon):
    root = amberd.root / "bb"
    make_busybox_root(root)
    assert amberd.amber("image", "import", "bb", f"dir:{root}").returncode == 0
    spec = write_spec(amberd.root / "on-bb", "on-bb", "echo on busybox > f", base="bb")
    code, built = amberd.build_json(spec)
    assert code == 0, built
    assert amberd.amber("pin", "add", "release", built["build"]).returncode == 0
    refused = amberd.amber("image", "rm", "bb")
    assert refused.returncode == 1
    assert b"image bb is used by pin release" in refused.stderr, refused.stderr
    assert amberd.amber("pin", "rm", "release").returncode == 0

    slow = write_spec(amberd.root / "slow-bb", "slow-bb", "sleep 600", base="bb")
    started = amberd.amber("build", "--detach", "--json", str(slow))
    bid = json.loads(started.stdout)["build"]
    wait_running(amberd, bid)
    busy = amberd.amber("image", "rm", "bb", "--json")
    assert busy.returncode == 1 and busy.stdout == b""
    assert f"image bb is the base of build {bid}, which is running".encode() in busy.stderr
    assert amberd.amber("cancel", bid).returncode == 0

    assert amberd.amber("image", "rm", "bb").returncode == 0
    assert b"no images" in amberd.amber("image", "ls").stdout
    gone = amberd.amber("image", "rm", "bb")
    assert gone.returncode == 1 and b"no image 'bb'" in gone.stderr


def test_import_insecure_from_a_plain_http_registry(amberd: Daemon, registry: str, daemon_root):
    spec = write_spec(amberd.root / "f", "pushed", "echo kept > kept && exit 7")
    code, failed = amberd.build_json(spec)
    assert code == 1 and failed["frozen"]
    # 127.1 is 127.0.0.1, but not a name amber takes for loopback: HTTPS unless --insecure.
    ref = f"127.1:{registry.rsplit(':', 1)[1]}/amber/pushed:failed"
    pushed = amberd.amber("export", failed["build"], "--push", ref, "--insecure", "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["ref"] == ref

    other_root = daemon_root.parent / (daemon_root.name + "-second")
    other_root.mkdir(mode=0o755)
    other = Daemon(other_root).start()
    try:
        over_tls = other.amber("import", ref)
        assert over_tls.returncode == 1  # the registry speaks plain HTTP only
        imported = other.amber("import", ref, "--insecure", "--json")
        assert imported.returncode == 0, imported.stderr
        new = json.loads(imported.stdout)
        assert new["failed_step"] == "s1"
        diff = json.loads(other.amber("diff", new["build"], "--json").stdout)
        assert ("added", "/build/kept") in {(c["kind"], c["path"]) for c in diff["changes"]}
    finally:
        assert other.stop() == 0
        subprocess.run(["rm", "-rf", str(other_root)])
