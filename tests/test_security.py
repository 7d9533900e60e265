"""A member of the amber group is not root: the holes a second uid could open, closed.

Each test drives the real `amber` as uid 4242 (``setpriv``) against the
real amberd running as root, doing what an attacker would, and checks what
they would look at: the bytes printed, the file root was tricked into
writing, the mode and capabilities of what was checked out for them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from second_user import MAL, Mal, mal_daemon

from amber.sandbox.beneath import write_beneath

SECRET = b"root-only secret 7f3a"
BUILD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}-[0-9]+")
# struct vfs_cap_data, revision 2: effective, permitted = CAP_SETUID (7)
CAP_SETUID_EP = struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)


@pytest.fixture
def mal(daemon_root: Path) -> Iterator[Mal]:
    with mal_daemon(daemon_root) as mal:
        yield mal


def root_only_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


# --- an OCI layout, written the way any user could ------------------------------------


def tar_layer(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.DIRTYPE, *, mode: int = 0o755, data: bytes | None = None,
          uid: int = 0, link: str = "", xattrs: dict[str, bytes] | None = None):  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, uid, 1_700_000_000
    info.linkname = link
    if data is not None:
        info.size = len(data)
    if xattrs:  # binary values travel as surrogate escapes (tarfile writes hdrcharset=BINARY)
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return info, data


def busybox_entries() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    dirs = ["bin", "dev", "etc", "proc", "root", "sys", "usr", "usr/bin"]
    out = [entry(d) for d in dirs]
    out.append(entry("tmp", mode=0o1777))
    out.append(entry("build", uid=1000))
    out.append(entry("bin/busybox", tarfile.REGTYPE, data=Path("/bin/busybox").read_bytes()))
    out.append(entry("bin/sh", tarfile.SYMTYPE, mode=0o777, link="busybox"))
    return out


def oci_layout(path: Path, layers: list[bytes], labels: dict[str, str]) -> Path:
    """An OCI image layout at ``path`` (uncompressed layers), owned by uid 4242."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layer_descs = [put(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": labels, "WorkingDir": "/build", "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descs]},
        "history": [{"created_by": f"layer{i}"} for i in range(len(layers))],
    }
    config_desc = put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": layer_descs}  # fmt: skip
    manifest_desc = put(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [".", *dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), MAL, MAL)
    return path


# --- 1. build ids come from amberd, never from an image -----------------------------


def test_an_imported_label_cannot_make_amber_log_read_a_file_as_root(mal: Mal):
    """The label chose the build id, the id chose the log path: /etc/shadow for anyone."""
    secret = root_only_file(mal.daemon.root / "shadow", SECRET)
    leak = mal.home / "leak"
    mal.run("mkdir", leak, check=True)
    logs = mal.daemon.state / "logs"
    label = os.path.relpath(leak / "x", logs)  # ../../home-mal/leak/x
    assert label.startswith("../")
    layout = oci_layout(mal.home / "img", [tar_layer(busybox_entries())] * 2,
                        {"org.amber.spec": label, "org.amber.run": "false"})  # fmt: skip
    imported = mal.amber("import", layout)
    assert imported.returncode == 0, imported.stderr
    build = re.search(rb"imported as build (\S+):", imported.stdout).group(1).decode()
    # Where amberd would look for the imported step's log, a link to the secret
    # (only possible where the attacker may write: the test checks both ways).
    where = os.path.normpath(logs / f"{build}.0.log")
    if os.path.realpath(os.path.dirname(where)).startswith(str(mal.home)):
        mal.run("ln", "-s", secret, where, check=True)
    shown = mal.amber("log", build)
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout + shown.stderr
    assert BUILD_ID.fullmatch(build), build
    # The shell's work directory follows the id too: it stays under amberd's own.
    shell = mal.amber("shell", build, "--", "/bin/sh", "-c", "true")
    assert shell.returncode == 0, shell.stderr
    assert list(leak.iterdir()) == [] or all(p.is_symlink() for p in leak.iterdir())


def test_logs_are_root_only(mal: Mal):
    logs = mal.daemon.state / "logs"
    st = os.lstat(logs)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700


# --- 2. root never follows a link a frozen tree holds -------------------------------

HISTORY_SPEC = """
[build]
name = "history"
base = "host"

[[source]]
path = "planted"
dest = "/tmp"

[[step]]
name = "fails"
run = "echo 'owned by mal' && exit 3"
"""


def test_shell_does_not_write_through_a_history_symlink_in_the_tree(mal: Mal):
    target = mal.daemon.root / "root-bashrc"
    target.write_bytes(b"# root's\n")
    os.chmod(target, 0o644)
    project = mal.home / "project"
    mal.run("mkdir", "-p", project / "planted", check=True)
    mal.run("ln", "-s", target, project / "planted" / ".amber_history", check=True)
    (project / "spec.toml").write_text(HISTORY_SPEC)
    os.chown(project / "spec.toml", MAL, MAL)
    built = mal.amber("build", "--json", project / "spec.toml")
    assert built.returncode == 1, built.stderr
    build = json.loads(built.stdout)["build"]
    shell = mal.amber("shell", build, "--", "sh", "-c", "cat /tmp/.amber_history; true")
    assert target.read_bytes() == b"# root's\n"
    st = os.stat(target)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout == b"echo 'owned by mal' && exit 3\n"  # seeded in the shell's own layer


def test_root_writes_nothing_through_a_linked_directory(tmp_path: Path):
    """``write_beneath``, the one way root writes into a tree: a link on the way stops it."""
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    tree.mkdir()
    outside.mkdir()
    (tree / "tmp").symlink_to(outside)
    with pytest.raises(OSError):
        write_beneath(tree, "tmp/.amber_history", b"x", uid=MAL, gid=MAL)
    (tree / "up").symlink_to("..")
    with pytest.raises(OSError):
        write_beneath(tree, "up/file", b"x", uid=MAL, gid=MAL)
    assert list(outside.iterdir()) == [] and not (tmp_path / "file").exists()
    write_beneath(tree, "a/b", b"ok", uid=MAL, gid=MAL)
    st = os.lstat(tree / "a/b")
    assert (tree / "a/b").read_bytes() == b"ok" and (st.st_uid, st.st_gid) == (MAL, MAL)


# --- 3. out-links never hand out privileges -----------------------------------------

CAPS_SPEC = """
[build]
name = "caps"
base = "oci:img"
output = "/out"

[[step]]
name = "noop"
run = "true"
"""


def privileged_layer() -> bytes:
    python = Path("/usr/bin/python3").resolve().read_bytes()
    return tar_layer([
        entry("out"),
        entry("out/pwn", tarfile.REGTYPE, mode=0o4755, data=python,
              xattrs={"security.capability": CAP_SETUID_EP}),
        entry("out/group", tarfile.REGTYPE, mode=0o2755, data=b"#!/bin/sh\n"),
        entry("out/sgid-dir", mode=0o2775),
        entry("out/trusted", tarfile.REGTYPE, mode=0o644, data=b"x",
              xattrs={"trusted.amber-test": b"1", "user.kept": b"yes"}),
    ])  # fmt: skip


def test_out_link_of_an_image_with_capabilities_hands_out_none(mal: Mal):
    project = mal.home / "caps"
    mal.run("mkdir", project, check=True)
    oci_layout(project / "img", [tar_layer(busybox_entries()), privileged_layer()], {})
    (project / "spec.toml").write_text(CAPS_SPEC)
    out = mal.home / "r"
    built = mal.amber("build", "--out-link", out, project / "spec.toml")
    assert built.returncode == 0, built.stderr
    pwn = out / "pwn"
    assert pwn.read_bytes()[:4] == b"\x7fELF"
    escalate = mal.run(pwn, "-c", "import os; os.setuid(0); print('root')")
    assert escalate.returncode != 0 and b"root" not in escalate.stdout
    assert b"PermissionError" in escalate.stderr
    for path in (pwn, out / "group", out / "sgid-dir", out / "trusted"):
        st = os.lstat(path)
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), (path, oct(st.st_mode))
        assert [n for n in os.listxattr(path) if not n.startswith("user.")] == [], path
    assert os.getxattr(out / "trusted", "user.kept") == b"yes"  # user xattrs are the user's


SETUID_SPEC = """
[build]
name = "setuid"
base = "host"
output = "/build/out"

[[step]]
name = "chmod"
run = "mkdir out && echo x > out/s && chmod 4755 out/s && echo y > out/g && chmod 2755 out/g"
"""


def test_root_out_link_keeps_setuid_only_when_asked(mal: Mal):
    spec = mal.daemon.root / "setuid.toml"
    spec.write_text(SETUID_SPEC)
    plain = mal.daemon.root / "plain"
    built = mal.daemon.amber("build", "--out-link", str(plain), str(spec))
    assert built.returncode == 0, built.stderr
    for name in ("s", "g"):
        st = os.lstat(plain / name)
        assert st.st_uid == 0 and not st.st_mode & (stat.S_ISUID | stat.S_ISGID), oct(st.st_mode)
    asked = mal.daemon.root / "asked"
    built = mal.daemon.amber("build", "--out-link", str(asked), "--out-link-privileged", str(spec))
    assert built.returncode == 0, built.stderr
    assert stat.S_IMODE(os.lstat(asked / "s").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(asked / "g").st_mode) == 0o2755


def test_out_link_privileged_is_refused_to_others(mal: Mal):
    project = mal.home / "p"
    mal.run("mkdir", project, check=True)
    (project / "spec.toml").write_text(SETUID_SPEC)
    built = mal.amber("build", "--out-link", mal.home / "r", "--out-link-privileged",
                      project / "spec.toml")  # fmt: skip
    assert built.returncode != 0
    assert b"--out-link-privileged" in built.stderr and b"root" in built.stderr
    assert not (mal.home / "r").exists()
