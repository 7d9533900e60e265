"""amber export / import end to end, checked with podman, skopeo, umoci and a registry."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from amberd_process import Daemon
from rootfs import make_busybox_root
from tools import run

from amber.daemon.oci.digests import pushed_check
from amber.daemon.oci.layer import LayerInfo

SPEC = """
[build]
name = "exported"
base = "bb"
env = { FLAVOUR = "smoky" }

[[step]]
name = "prepare"
run = "mkdir -p src && echo kept > src/kept && echo doomed > src/doomed && mkdir -p src/dir && echo x > src/dir/x"

[[step]]
name = "compile"
cwd = "src"
run = "rm doomed && rm -r dir && echo replaced > dir && printf 'added\\\\000bytes' > added && exit 3"
"""


@pytest.fixture
def frozen(amberd: Daemon) -> tuple[Daemon, str]:
    root = amberd.root / "bbroot"
    make_busybox_root(root)
    imported = amberd.amber("image", "import", "bb", f"dir:{root}")
    assert imported.returncode == 0, imported.stderr
    spec_dir = amberd.root / "spec"
    spec_dir.mkdir()
    (spec_dir / "spec.toml").write_text(SPEC)
    code, report = amberd.build_json(spec_dir / "spec.toml")
    assert code == 1 and report["frozen"], report
    return amberd, report["build"]


@pytest.mark.parametrize("fmt", ["oci", "docker-archive"])
def test_podman_loads_and_runs_the_export(frozen, podman: list[str], fmt: str):
    amberd, build = frozen
    out = amberd.root / f"export-{fmt}.tar"
    done = amberd.amber("export", build, "-o", str(out), "--format", fmt)
    assert done.returncode == 0, done.stderr
    loaded = run([*podman, "load", "-i", str(out)])
    image = f"localhost/amber/{build}:compile"
    assert image in loaded.stdout
    script = (
        'test -f /build/src/added && ! test -e /build/src/doomed && test "$(cat /build/src/dir)" = replaced'
        ' && test "$PWD" = /build/src && test "$FLAVOUR" = smoky'
    )
    run([*podman, "run", "--rm", "--runtime", "runc", "--network=none", "--ulimit", "nofile=20000:20000",
         "--ulimit", "nproc=32768:32768", image, "/bin/sh", "-c", script])  # fmt: skip


def test_skopeo_and_umoci_read_the_export(frozen, tmp_path: Path):
    amberd, build = frozen
    out = amberd.root / "export.tar"
    assert amberd.amber("export", build, "-o", str(out)).returncode == 0
    info = json.loads(run(["skopeo", "inspect", f"oci-archive:{out}"]).stdout)
    labels = info["Labels"]
    assert labels["org.amber.build"] == build and labels["org.amber.step"] == "compile"
    assert labels["org.amber.exit-code"] == "3" and labels["org.amber.key"]
    assert len(info["Layers"]) == 3  # base and sources, then one layer per step
    config = json.loads(run(["skopeo", "inspect", "--config", f"oci-archive:{out}"]).stdout)
    history = [h.get("created_by", "") for h in config["history"]]
    assert history[0] == "amber: base bb and sources", history
    layout = tmp_path / "layout"
    run(["skopeo", "copy", f"oci-archive:{out}", f"oci:{layout}:img"])
    bundle = tmp_path / "bundle"
    run(["umoci", "unpack", "--rootless", "--image", f"{layout}:img", str(bundle)])
    rootfs = bundle / "rootfs"
    assert (rootfs / "build/src/added").read_bytes() == b"added\x00bytes"
    assert not (rootfs / "build/src/doomed").exists()
    assert (rootfs / "build/src/dir").read_text() == "replaced\n"
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), f"whiteout leaked: {name}"


def test_push_to_a_registry(frozen, registry: str):
    amberd, build = frozen
    ref = f"{registry}/amber/{build}:failed"
    done = amberd.amber("export", build, "--push", ref)
    assert done.returncode == 0, done.stderr
    info = json.loads(run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"]).stdout)
    assert info["Labels"]["org.amber.build"] == build


def _manifest_layers(ref: str) -> list[str]:
    raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"]).stdout
    return [layer["digest"] for layer in json.loads(raw)["layers"]]


def _pushed_rows(amberd: Daemon) -> sqlite3.Connection:
    return sqlite3.connect(amberd.state / "layer-digests.db", isolation_level=None)


def test_a_repeated_push_reuses_the_layers_pushed_before(frozen, registry: str, tmp_path: Path):
    """Pushed layers are remembered by their trees; a row is used only where it checks out
    and the registry has its blob, and a push to another repository writes the layers anew."""
    amberd, build = frozen
    ref = f"{registry}/amber/{build}:failed"
    assert amberd.amber("export", build, "--push", ref).returncode == 0
    first = _manifest_layers(ref)
    with _pushed_rows(amberd) as db:
        rows = db.execute("SELECT key, digest, diff_id, size, media_type FROM pushed").fetchall()
        assert sorted(r[1] for r in rows) == sorted(first)
        # Damaged: the first two rows' blobs swapped, their checks left as they were.
        (k0, d0, *_), (k1, d1, *_) = rows[:2]
        db.execute("UPDATE pushed SET digest = ? WHERE key = ?", (d1, k0))
        db.execute("UPDATE pushed SET digest = ? WHERE key = ?", (d0, k1))
    assert amberd.amber("export", build, "--push", ref).returncode == 0
    assert _manifest_layers(ref) == first  # no row used: written and hashed again
    with _pushed_rows(amberd) as db:
        # Swapped again, with checks that agree: rows that are used as they are.
        for (key, _, diff_id, size, media), digest in ((rows[0], d1), (rows[1], d0)):
            check = pushed_check(key, LayerInfo(digest, diff_id, size, media))
            db.execute(
                "UPDATE pushed SET digest = ?, check_ = ? WHERE key = ?", (digest, check, key)
            )
    assert amberd.amber("export", build, "--push", ref).returncode == 0
    swapped = _manifest_layers(ref)
    assert sorted(swapped) == sorted(first) and swapped != first
    with _pushed_rows(amberd) as db:
        db.execute("DELETE FROM pushed")
    assert amberd.amber("export", build, "--push", ref).returncode == 0
    assert _manifest_layers(ref) == first
    # Another repository has none of those blobs: every layer is written and sent again.
    other = f"{registry}/elsewhere/{build}:failed"
    done = amberd.amber("export", build, "--push", other)
    assert done.returncode == 0, done.stderr
    assert sorted(_manifest_layers(other)) == sorted(first)
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{other}", f"oci:{layout}:img"])
    run(["umoci", "unpack", "--rootless", "--image", f"{layout}:img", str(bundle)])
    assert (bundle / "rootfs/build/src/added").read_bytes() == b"added\x00bytes"


def test_import_on_another_machine_gives_the_same_bytes(frozen, daemon_root: Path):
    amberd, build = frozen
    out = amberd.root / "export.tar"
    assert amberd.amber("export", build, "-o", str(out)).returncode == 0
    original = amberd.amber("shell", build, "--", "cat", "/build/src/added")
    assert original.returncode == 0 and original.stdout == b"added\x00bytes"
    # the image base is the whole root: none of the host's system directories
    assert amberd.amber("shell", build, "--", "test", "-e", "/usr/bin/python3").returncode == 1

    other_root = daemon_root.parent / (daemon_root.name + "-second")
    other_root.mkdir(mode=0o755)
    other = Daemon(other_root).start()
    try:
        imported = other.amber("import", str(out))
        assert imported.returncode == 0, imported.stderr
        with other.connect() as conn:
            builds = conn.call("builds")["builds"]
        new_id = builds[0]["id"]
        again = other.amber("shell", new_id, "--", "cat", "/build/src/added")
        assert again.returncode == 0, again.stderr
        assert again.stdout == original.stdout
        cwd = other.amber("shell", new_id, "--", "pwd")
        assert cwd.stdout.strip() == b"/build/src"
        diff = other.amber("diff", new_id)
        assert b"/build/src/added" in diff.stdout and b"doomed" in diff.stdout
        verify = other.amber("verify", new_id)
        assert verify.returncode != 0 and b"was imported from an image" in verify.stderr
    finally:
        other.stop()
        subprocess.run(["rm", "-rf", str(other_root)])


def test_export_on_failure_writes_the_image_as_soon_as_a_step_fails(frozen, podman: list[str]):
    amberd, _ = frozen
    spec = amberd.root / "spec" / "spec.toml"
    out = amberd.root / "on-failure.tar"
    proc = amberd.amber(
        "build",
        "--retry-failed",
        "--export-on-failure",
        "oci",
        "--export-path",
        str(out),
        str(spec),
    )
    assert proc.returncode == 1
    assert out.exists(), proc.stderr
    assert b"exported the state at failure" in proc.stdout + proc.stderr
    loaded = run([*podman, "load", "-i", str(out)])
    assert ":compile" in loaded.stdout
