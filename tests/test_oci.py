"""OCI export, push and import, checked with the tools users load images with.

Two layers built from real directories (busybox as /bin/sh, a symlink, hard
links, xattrs, nanosecond mtimes; then a deleted file, a directory emptied
and refilled, a file replaced by a directory) are exported in both formats
and read by skopeo, umoci and podman (vfs storage, which shows a leaked 0:0
device that overlay storage would hide), pushed to a real docker-registry,
and imported back to the same tree digests. Hostile archives are refused
without the store gaining a tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from tools import need, run

from amber.daemon.oci import tar as oci_tar
from amber.daemon.oci.apply import TreeBuilder
from amber.daemon.oci.base import import_oci_base
from amber.daemon.oci.gzip import ParallelGzip
from amber.daemon.oci.image import export_image, read_image
from amber.daemon.oci.layer import write_layer
from amber.daemon.oci.registry import PushStats, push_image
from amber.daemon.oci.spec import ImageConfig, OciError, make_reference, parse_reference
from amber.sandbox import tree as treefmt
from amber.sandbox.importer import import_directory
from amber.sandbox.store import Store
from amber.sandbox.tree import Entry

NS = 1_600_000_000_123_456_789
REF = "amber/b1:step-2"
CONFIG = ImageConfig(
    env={"PATH": "/bin", "CFLAGS": "-O2"},
    workdir="/work",
    labels={"amber.build": "b1", "amber.step": "step-2", "amber.exit-code": "2"},
    created="2024-05-01T12:00:00Z",
    history=["base", "step step-2"],
)
PLAIN_CONFIG = ImageConfig(created="2024-05-01T12:00:00Z")


# -- the image under test ---------------------------------------------------------


def make_layer1(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    os.symlink("busybox", root / "bin/sh")
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("hello\n")
    (root / "deleted").write_text("to be deleted\n")
    (root / "replaced").mkdir()
    (root / "replaced/old").write_text("old content\n")
    (root / "replaced/sub").mkdir()
    (root / "replaced/sub/deep").write_text("deep\n")
    (root / "becomes-dir").write_text("a file for now\n")
    (root / "keep").write_text("kept, hard linked\n")
    os.link(root / "keep", root / "keep-hard")
    os.symlink("etc/motd", root / "motd-link")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "etc/motd", "user.origin", b"\xffbinary\x00value")
    os.chown(root / "etc/motd", 1234, 5678)
    os.utime(root / "etc/motd", ns=(NS, NS))
    (root / ("long-" + "n" * 200)).write_text("long name\n")
    (root / "big").write_bytes(os.urandom(3 << 20))


def make_layer2(root: Path) -> None:
    (root / "deleted").unlink()
    (root / "added").write_text("the failed step wrote this\n")
    os.utime(root / "added", ns=(NS + 1, NS + 1))
    shutil.rmtree(root / "replaced")
    (root / "replaced").mkdir()
    (root / "replaced/new").write_text("new content\n")
    (root / "becomes-dir").unlink()
    (root / "becomes-dir").mkdir()
    (root / "becomes-dir/inside").write_text("inside\n")
    os.link(root / "added", root / "added-hard")
    os.link(root / "keep", root / "keep-third")  # joins a group from layer 1
    with open(root / "etc/motd", "a") as f:
        f.write("modified\n")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    """A state dir with the two layer trees: ``(state_dir, tree1, tree2)``."""
    base = tmp_path_factory.mktemp("image")
    store = Store.open(base / "state")
    l1 = base / "l1"
    make_layer1(l1)
    t1 = import_directory(store, l1)
    l2 = base / "l2"
    subprocess.run(["cp", "-a", str(l1), str(l2)], check=True)  # keeps hard links
    make_layer2(l2)
    t2 = import_directory(store, l2)
    return base / "state", t1, t2


@pytest.fixture
def source(image) -> tuple[Store, list[tuple[bytes | None, bytes]], bytes]:
    state, t1, t2 = image
    return Store.open(state), [(None, t1), (t1, t2)], t2


@pytest.fixture(scope="module")
def exports(image, tmp_path_factory) -> dict[str, Path]:
    """Each format exported once, uncompressed and gzip."""
    state, t1, t2 = image
    store = Store.open(state)
    out = tmp_path_factory.mktemp("exports")
    files = {}
    for fmt in ("oci", "docker-archive"):
        for comp in ("none", "gzip"):
            path = out / f"{fmt}-{comp}.tar"
            export_image(
                store, [(None, t1), (t1, t2)], CONFIG, path, fmt, ref=REF, compression=comp
            )  # type: ignore[arg-type]
            files[f"{fmt}-{comp}"] = path
    return files


def tree_count(store: Store) -> int:
    return sum(len(os.listdir(store.tree_dir / d)) for d in os.listdir(store.tree_dir))


# -- round trip ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["oci-none", "oci-gzip", "docker-archive-none", "docker-archive-gzip"]
)
def test_import_of_export_gives_the_same_trees(exports, image, tmp_path: Path, kind: str):
    _, t1, t2 = image
    store = Store.open(tmp_path / "other")
    imported = read_image(exports[kind], store)
    assert imported.trees == [t1, t2]
    assert store.closure_check().missing([t2]) is None
    assert imported.name == "localhost/amber/b1:step-2"
    assert imported.config.env == CONFIG.env
    assert imported.config.workdir == "/work"
    assert imported.config.cmd == ["/bin/sh"]
    assert imported.config.labels == CONFIG.labels
    assert imported.config.history == CONFIG.history
    assert import_oci_base(store, exports[kind]) == t2


def test_compressed_archives_and_zstd_layers_import(exports, image, tmp_path: Path):
    _, _, t2 = image
    gzipped = tmp_path / "image.tar.gz"
    gzipped.write_bytes(gzip.compress(exports["oci-none"].read_bytes(), 1))
    assert read_image(gzipped, Store.open(tmp_path / "a")).trees[-1] == t2
    need("zstd")
    store = Store.open(tmp_path / "b")
    layer = layer_tar((member("etc", tarfile.DIRTYPE), b""), (member("etc/hello"), b"hi\n"))
    zstd = subprocess.run(["zstd", "-q", "-c"], input=layer, capture_output=True, check=True).stdout
    tree = import_oci_base(store, oci_archive(tmp_path / "z.tar", zstd, diff_id_of=layer))
    assert listing(store, tree) == {"etc": b"", "etc/hello": b"hi\n"}


def test_layer_content_whiteouts_and_metadata(exports):
    with tarfile.open(exports["oci-none"]) as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(
            outer.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:])  # type: ignore[arg-type]
        )
        docker = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        layers = []
        for d in manifest["layers"]:
            data = outer.extractfile("blobs/sha256/" + d["digest"][7:]).read()  # type: ignore[union-attr]
            with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                layers.append(layer.getmembers())
    assert docker[0]["RepoTags"] == ["localhost/amber/b1:step-2"]
    assert [p[13:] for p in docker[0]["Layers"]] == [d["digest"][7:] for d in manifest["layers"]]
    first = {m.name: m for m in layers[0]}
    second = {m.name: m for m in layers[1]}
    assert first["keep-hard"].islnk() and first["keep-hard"].linkname == "keep"
    assert first["bin/sh"].issym() and first["fifo"].isfifo()
    motd = first["etc/motd"]
    assert (motd.uid, motd.gid) == (1234, 5678)
    assert motd.pax_headers["mtime"] == "1600000000.123456789"
    assert "SCHILY.xattr.user.origin" in motd.pax_headers
    assert {".wh.deleted", "replaced/.wh..wh..opq", "becomes-dir/.wh..wh..opq"} <= set(second)
    assert second["added-hard"].islnk() and second["added-hard"].linkname == "added"
    assert second["keep-third"].isfile()  # its group's first member is in layer 1
    assert "replaced/new" in second and "replaced/old" not in second
    assert "bin/busybox" not in second  # unchanged: not repeated
    for layer in layers:
        assert not [m.name for m in layer if m.ischr() or m.isblk()]


def test_export_leaves_out_devices_sockets_and_whiteout_names(store: Store, tmp_path: Path):
    with store.batch() as batch:
        blob = store.put_blob_bytes(b"x", batch)
        f = Entry(b"f", treefmt.FILE, 0o644, 0, 0, 0, 1, blob)
        wh = Entry(b"gone", treefmt.CHR, 0, 0, 0, 0, 0, b"", 0)
        sock = Entry(b"sock", treefmt.SOCK, 0o755, 0, 0, 0, 0)
        fake = Entry(b".wh.trick", treefmt.FILE, 0o644, 0, 0, 0, 1, blob)
        null = Entry(b"null", treefmt.CHR, 0o666, 0, 0, 0, 0, b"", os.makedev(1, 3))
        root = store.put_tree(sorted([f, wh, sock, fake, null]), batch)
    buf = io.BytesIO()
    info = write_layer(store, None, root, buf, compression="none")
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as layer:
        names = layer.getnames()
    assert names == ["f"]
    assert info.skipped == 4
    assert info.digest == info.diff_id == "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()


def test_whiteout_lookalike_names_are_left_out_with_what_they_hold(store: Store):
    with store.batch() as batch:
        blob = store.put_blob_bytes(b"x", batch)
        f = Entry(b"f", treefmt.FILE, 0o644, 0, 0, 0, 1, blob)
        inner = store.put_tree([f], batch)
        trick = Entry(b".wh.dir", treefmt.DIR, 0o755, 0, 0, 0, 0, inner)
        d = Entry(b"d", treefmt.DIR, 0o755, 0, 0, 0, 0, store.put_tree([trick, f], batch))
        before = store.put_tree([d], batch)
        after = store.put_tree([d._replace(ref=store.put_tree([f], batch), mtime_ns=1)], batch)
    layers = []
    for old, new in ((None, before), (before, after)):
        buf = io.BytesIO()
        write_layer(store, old, new, buf, compression="none")
        layers.append(buf.getvalue())
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
            assert not [n for n in tar.getnames() if "wh.dir" in n]
    assert listing(store, apply_all(store, *layers)) == {"d": b"", "d/f": b"x"}


def test_layers_are_deterministic_whatever_the_thread_count(source):
    store, layers, _ = source
    outs = []
    for threads in (1, 3):
        buf = io.BytesIO()
        info = write_layer(store, None, layers[0][1], buf, compression="gzip", threads=threads)
        outs.append((info.digest, info.diff_id))
        assert (
            "sha256:" + hashlib.sha256(gzip.decompress(buf.getvalue())).hexdigest() == info.diff_id
        )
    assert outs[0] == outs[1]


def test_parallel_gzip_is_plain_gzip():
    data = os.urandom(1 << 20) + b"abc" * 1_000_000 + bytes(3 << 20)
    out = bytearray()
    gz = ParallelGzip(out.extend, level=1, threads=2, block_size=256 << 10)
    for i in range(0, len(data), 100_000):
        gz.write(data[i : i + 100_000])
    gz.close()
    assert gzip.decompress(bytes(out)) == data
    run = subprocess.run(["gzip", "-dc"], input=bytes(out), capture_output=True, check=True)
    assert run.stdout == data


def test_export_to_an_open_file(source, tmp_path: Path):
    """What a root daemon does with a file descriptor the client passed."""
    store, layers, t2 = source
    path = tmp_path / "passed.tar"
    with open(path, "wb") as f:
        result = export_image(store, layers, PLAIN_CONFIG, f, "docker-archive")
    assert result.path is None and result.size == path.stat().st_size
    assert read_image(path, Store.open(tmp_path / "s")).trees[-1] == t2


def test_duplicate_layers_are_stored_once(source, tmp_path: Path):
    store, _, t2 = source
    path = tmp_path / "dup.tar"
    result = export_image(store, [(None, t2), (t2, t2), (t2, t2)], PLAIN_CONFIG, path)
    assert result.layers[1].digest == result.layers[2].digest
    with tarfile.open(path) as outer:
        names = outer.getnames()
    assert len(names) == len(set(names))
    assert read_image(path, Store.open(tmp_path / "s")).trees == [t2, t2, t2]


# -- third-party tools ------------------------------------------------------------------


def test_skopeo_inspects_the_oci_archive(exports):
    need("skopeo")
    for kind in ("oci-none", "oci-gzip"):
        run = subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{exports[kind]}"],
            capture_output=True,
            text=True,
            check=True,
        )
        info = json.loads(run.stdout)
        assert info["Labels"]["amber.build"] == "b1"
        assert len(info["Layers"]) == 2
        assert "PATH=/bin" in info["Env"]


@pytest.mark.parametrize("kind", ["oci-gzip", "docker-archive-none"])
def test_umoci_unpack_applies_deletions(exports, image, tmp_path: Path, kind: str):
    need("skopeo", "umoci")
    transport = "oci-archive" if kind.startswith("oci") else "docker-archive"
    layout = tmp_path / "layout"
    subprocess.run(
        ["skopeo", "copy", "-q", f"{transport}:{exports[kind]}", f"oci:{layout}:t"], check=True
    )
    # skopeo's layout directory imports too, to the same tree.
    assert read_image(layout, Store.open(tmp_path / "s"), tag="t").trees[-1] == image[2]
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:t", str(bundle)], check=True, capture_output=True
    )
    rootfs = bundle / "rootfs"
    assert (rootfs / "added").read_text() == "the failed step wrote this\n"
    assert not (rootfs / "deleted").exists()
    assert sorted(os.listdir(rootfs / "replaced")) == ["new"]
    assert (rootfs / "becomes-dir/inside").is_file()
    assert (rootfs / "etc/motd").read_text() == "hello\nmodified\n"
    assert os.stat(rootfs / "added").st_ino == os.stat(rootfs / "added-hard").st_ino
    leaked = [
        os.path.join(d, n)
        for d, dirs, files in os.walk(rootfs)
        for n in dirs + files
        if stat.S_ISCHR(os.lstat(os.path.join(d, n)).st_mode)
    ]
    assert leaked == []


@pytest.mark.parametrize("kind", ["oci-none", "docker-archive-gzip"])
def test_podman_loads_and_runs_the_export(exports, podman: list[str], kind: str):
    need("runc")
    load = run([*podman, "load", "-i", str(exports[kind])])
    assert "localhost/amber/b1:step-2" in load.stdout
    script = (
        "test -f /added && ! test -e /deleted && test ! -e /replaced/old"
        ' && test "$(cat /replaced/new)" = "new content" && test -f /becomes-dir/inside'
        ' && test "$PWD" = /work && test "$CFLAGS" = -O2'
    )
    run(
        [
            *podman, "run", "--rm", "--runtime", "runc", "--network=none",
            "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
            "localhost/amber/b1:step-2", "/bin/sh", "-c", script,
        ]
    )  # fmt: skip


def test_podman_save_is_an_oci_base(exports, podman: list[str], tmp_path: Path, store: Store):
    run([*podman, "load", "-i", str(exports["oci-gzip"])])
    for fmt in ("oci-archive", "docker-archive"):
        saved = tmp_path / f"saved-{fmt}.tar"
        run([*podman, "save", "--format", fmt, "-o", str(saved), "localhost/amber/b1:step-2"])
        tree = import_oci_base(store, saved)
        assert store.lookup_path(tree, b"added") is not None
        assert store.lookup_path(tree, b"deleted") is None
        assert store.lookup_path(tree, b"replaced/old") is None
        assert store.lookup_path(tree, b"bin/sh").ref == b"busybox"  # type: ignore[union-attr]


# -- registry -------------------------------------------------------------------------------


def test_push_is_seen_by_skopeo_and_skips_existing_blobs(source, registry: str, tmp_path: Path):
    need("skopeo")
    store, layers, t2 = source
    ref = f"{registry}/amber/b1:step-2"
    first = PushStats()
    digest = push_image(store, layers, CONFIG, ref, stats=first, tmp_dir=tmp_path)
    assert (first.blobs_uploaded, first.blobs_skipped) == (3, 0)
    run = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(run.stdout)
    assert info["Digest"] == digest
    assert info["Labels"]["amber.step"] == "step-2"

    cache: dict = {}
    again = PushStats()
    assert push_image(store, layers, CONFIG, ref, stats=again, layer_cache=cache) == digest
    assert (again.blobs_uploaded, again.blobs_skipped) == (0, 3)
    assert again.layers_built == 2
    cached = PushStats()
    push_image(store, layers, CONFIG, ref, stats=cached, layer_cache=cache)
    assert (cached.blobs_uploaded, cached.layers_built) == (0, 0)

    # Another repository: blobs go up again, this time in small PATCH chunks.
    chunked = PushStats()
    other = f"{registry}/amber/other:x"
    push_image(store, layers, CONFIG, other, stats=chunked, chunk_size=256 << 10)
    assert chunked.blobs_uploaded == 3

    for pulled_ref in (ref, other, f"{registry}/amber/b1@{digest}"):
        pulled = read_image(pulled_ref, Store.open(tmp_path / "pulled"))
        assert pulled.trees[-1] == t2
        assert pulled.manifest_digest == digest


def test_pull_of_a_missing_image_is_a_clear_error(registry: str, store: Store):
    with pytest.raises(OciError, match="HTTP 404"):
        read_image(f"{registry}/nothing/here:latest", store)


# -- hostile archives ----------------------------------------------------------------------------


def oci_archive(path: Path, *layers: bytes, diff_id_of: bytes | None = None) -> Path:
    """An OCI archive of ``layers`` (uncompressed tars, unless ``diff_id_of``
    gives the tar the only layer was compressed from)."""

    def sha(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    diff_ids = [sha(diff_id_of)] if diff_id_of is not None else [sha(x) for x in layers]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    layer_type = "application/vnd.oci.image.layer.v1.tar"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": layer_type, "digest": sha(x), "size": len(x)} for x in layers],
        }
    ).encode()  # fmt: skip
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest), "size": len(manifest)}],
        }
    ).encode()  # fmt: skip
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    for blob in (manifest, config, *layers):
        files[f"blobs/sha256/{sha(blob)[7:]}"] = blob
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def layer_tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, type_: bytes = tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def raw_header(name: bytes, type_: bytes = b"0", size: int = 0) -> bytes:
    """A header tarfile would refuse to write (e.g. an absolute name kept as is)."""
    return oci_tar.header(name, type_, size=size)


HOSTILE = {
    "dotdot": (layer_tar((member("../escape"), b"x")), "'..' component"),
    "dotdot-deep": (layer_tar((member("a/../../escape"), b"x")), "'..' component"),
    "absolute": (raw_header(b"/etc/passwd", size=1) + b"x".ljust(512, b"\0") + bytes(1024), "absolute path"),
    "symlink-then-write": (
        layer_tar((member("evil", tarfile.SYMTYPE, linkname="/etc"), b""), (member("evil/passwd"), b"root::0:0::/:/bin/sh\n")),
        "is a symlink, not a directory",
    ),
    "chardev": (layer_tar((member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b"")), "device node"),
    "overlay-whiteout": (layer_tar((member("gone", tarfile.CHRTYPE), b"")), "device node"),
    "blockdev": (layer_tar((member("sda", tarfile.BLKTYPE, devmajor=8), b"")), "device node"),
    "duplicate": (layer_tar((member("f"), b"one"), (member("f"), b"two")), "duplicate entry"),
    "huge-pax": (layer_tar((member("f", pax_headers={"comment": "x" * (2 << 20)}), b"x")), "PAX header of"),
    "long-name": (layer_tar((member("d/" * 2100 + "f"), b"x")), "over 4096"),
    "long-component": (layer_tar((member("x" * 300), b"x")), "over 255"),
    "hardlink-missing": (layer_tar((member("h", tarfile.LNKTYPE, linkname="etc/shadow"), b"")), "not in the image"),
    "hardlink-escape": (layer_tar((member("h", tarfile.LNKTYPE, linkname="../../etc/shadow"), b"")), "'..' component"),
    "hardlink-through-symlink": (
        layer_tar((member("evil", tarfile.SYMTYPE, linkname="/etc"), b""), (member("h", tarfile.LNKTYPE, linkname="evil/shadow"), b"")),
        "is a symlink, not a directory",
    ),
    "whiteout-through-symlink": (
        layer_tar((member("evil", tarfile.SYMTYPE, linkname="/etc"), b""), (member("evil/.wh.passwd"), b"")),
        "is a symlink, not a directory",
    ),
    "sparse": (layer_tar((member("s", tarfile.GNUTYPE_SPARSE), b"")), "unsupported tar entry type"),
    "truncated": (raw_header(b"f", size=100_000) + b"x" * 1000, "ends inside"),
    "garbage": (b"not a tar at all" * 64, "checksum"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused(case: str, tmp_path: Path, store: Store):
    layer, message = HOSTILE[case]
    archive = oci_archive(tmp_path / "hostile.tar", layer)
    trees_before = tree_count(store)
    with pytest.raises(OciError, match=message):
        read_image(archive, store)
    assert tree_count(Store.open(store.state_dir)) == trees_before
    assert os.listdir(store.tmp_dir) == []
    assert not (tmp_path / "etc").exists() and not (tmp_path / "escape").exists()


def test_devices_can_be_dropped_instead_of_refused(tmp_path: Path, store: Store):
    layer = layer_tar(
        (member("dev", tarfile.DIRTYPE), b""),
        (member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
        (member("dev/sda", tarfile.BLKTYPE, devmajor=8), b""),
        (member("etc/os-release"), b"ID=debian\n"),
    )
    archive = oci_archive(tmp_path / "rootfs.tar", layer)
    with pytest.raises(OciError, match="device node"):
        import_oci_base(store, archive)
    tree = import_oci_base(store, archive, devices="drop")
    assert sorted(listing(store, tree)) == ["dev", "etc", "etc/os-release"]


def test_a_missing_file_is_not_taken_for_a_registry(store: Store, tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_image(str(tmp_path / "nothing.tar"), store)
    with pytest.raises(FileNotFoundError):
        read_image("busybox:latest", store)


def test_a_refused_layer_leaves_no_tree_behind_even_in_memory(tmp_path: Path, store: Store):
    """Layer 1 is fine, layer 2 is not: nothing of layer 1 may count as stored
    (the Store caches trees it was given, so they are given only at the end)."""
    good = layer_tar((member("etc", tarfile.DIRTYPE), b""), (member("etc/ok"), b"ok"))
    bad = layer_tar((member("../escape"), b"x"))
    with pytest.raises(OciError, match="layer 2 of 2"):
        read_image(oci_archive(tmp_path / "bad.tar", good, bad), store)
    tree = import_oci_base(store, oci_archive(tmp_path / "good.tar", good))
    assert store.tree_path(tree).exists()
    assert Store.open(store.state_dir).closure_check().missing([tree]) is None


def test_a_symlink_from_a_lower_layer_is_never_followed(store: Store):
    with store.batch() as batch:
        builder = TreeBuilder(store, batch)
        builder.apply(io.BytesIO(layer_tar((member("lib", tarfile.SYMTYPE, linkname="/etc"), b""))))
        with pytest.raises(OciError, match="symlinks in a layer are never followed"):
            builder.apply(io.BytesIO(layer_tar((member("lib/x.so"), b"x"))))
        batch.abort()


def test_tampered_layer_is_refused(exports, tmp_path: Path, store: Store):
    """A blob that does not match its digest fails even when the tar is sound."""
    bad = tmp_path / "tampered.tar"
    with tarfile.open(exports["oci-none"]) as src, tarfile.open(bad, "w") as dst:
        manifest_name = (
            "blobs/sha256/" + json.load(src.extractfile("index.json"))["manifests"][0]["digest"][7:]
        )  # type: ignore[arg-type]
        layer_name = (
            "blobs/sha256/" + json.load(src.extractfile(manifest_name))["layers"][1]["digest"][7:]
        )  # type: ignore[arg-type]
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            if info.name == layer_name:
                data = data.replace(b"the failed step wrote this", b"THE FAILED STEP WROTE THIS")  # type: ignore[union-attr]
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    with pytest.raises(OciError, match="does not match its digest"):
        read_image(bad, store)


# -- whiteout semantics, layer by layer -----------------------------------------------------------


def apply_all(store: Store, *layers: bytes) -> bytes:
    with store.batch() as batch:
        builder = TreeBuilder(store, batch)
        for layer in layers:
            builder.apply(io.BytesIO(layer))
        tree = builder.digest()
        builder.store_trees()
        return tree


def listing(store: Store, tree: bytes) -> dict[str, bytes]:
    out = {}
    for path, e in store.walk(tree):
        out[path.decode()] = store.read_blob(e.ref) if e.kind == treefmt.FILE else b""
    return out


def test_whiteouts_hide_only_lower_layers_wherever_they_appear(store: Store):
    base = layer_tar(
        (member("d", tarfile.DIRTYPE), b""),
        (member("d/old"), b"old"),
        (member("d/sub", tarfile.DIRTYPE), b""),
        (member("d/sub/deep"), b"deep"),
        (member("x"), b"x"),
        (member("y"), b"y"),
    )
    # The opaque marker comes after this layer's own entries; the whiteout of x
    # comes before x is written again: both must hide lower content only.
    upper = layer_tar(
        (member("d/new"), b"new"),
        (member("d/sub/fresh"), b"fresh"),
        (member("d/.wh..wh..opq"), b""),
        (member(".wh.x"), b""),
        (member("x"), b"x2"),
        (member(".wh.y"), b""),
        (member(".wh.never-existed"), b""),
    )
    tree = apply_all(store, base, upper)
    assert listing(store, tree) == {
        "d": b"", "d/new": b"new", "d/sub": b"", "d/sub/fresh": b"fresh", "x": b"x2",
    }  # fmt: skip


def test_type_changes_and_implicit_parents(store: Store):
    base = layer_tar(
        (member("a", tarfile.DIRTYPE), b""), (member("a/f"), b"f"), (member("b"), b"b")
    )
    upper = layer_tar((member("a"), b"now a file"), (member("b/c/d"), b"implicit parents"))
    with pytest.raises(OciError, match="'/b' is a file, not a directory"):
        apply_all(store, base, upper)
    upper = layer_tar(
        (member("a"), b"now a file"), (member("b", tarfile.DIRTYPE), b""), (member("b/c/d"), b"d")
    )
    tree = apply_all(store, base, upper)
    assert listing(store, tree) == {"a": b"now a file", "b": b"", "b/c": b"", "b/c/d": b"d"}
    conflict = layer_tar((member("n/f"), b"f"), (member("n"), b"a file over a filled directory"))
    with pytest.raises(OciError, match="replaces a directory the same layer filled"):
        apply_all(store, conflict)


def test_hard_links_share_a_group_label(store: Store):
    tree = apply_all(
        store,
        layer_tar((member("a"), b"same"), (member("b", tarfile.LNKTYPE, linkname="a"), b"")),
    )
    a, b = store.get_tree(tree)
    assert a.link == b.link == b"a" and a.ref == b.ref


def test_overlay_xattrs_are_dropped(store: Store):
    tree = apply_all(
        store,
        layer_tar(
            (
                member(
                    "d",
                    tarfile.DIRTYPE,
                    pax_headers={
                        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
                        "SCHILY.xattr.user.ok": "1",
                    },
                ),
                b"",
            )
        ),
    )
    (d,) = store.get_tree(tree)
    assert d.xattrs == ((b"user.ok", b"1"),)


# -- tar reader details -------------------------------------------------------------------------------


def test_reader_handles_gnu_long_names_and_base256():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("l" * 300)
        info.size = 3
        info.uid = 8**8  # base-256 in GNU format
        info.mtime = -10
        tar.addfile(info, io.BytesIO(b"abc"))
    reader = oci_tar.TarReader(io.BytesIO(buf.getvalue()))
    (m,) = list(reader)[:1]
    assert m.name == b"l" * 300 and m.uid == 8**8 and m.mtime_ns == -10 * 10**9


def test_an_export_name_is_made_valid(source, tmp_path: Path):
    store, layers, _ = source
    result = export_image(
        store, layers, PLAIN_CONFIG, tmp_path / "x.tar", ref="amber/Zlib 3:Build Step"
    )
    assert result.name == "localhost/amber/zlib-3:Build-Step"
    assert read_image(tmp_path / "x.tar", Store.open(tmp_path / "s")).name == result.name


def test_references():
    ref = parse_reference("127.0.0.1:5000/amber/b1:step")
    assert (ref.registry, ref.name, ref.tag) == ("127.0.0.1:5000", "amber/b1", "step")
    assert make_reference("Build 7/Heads", "make all!") == "build-7/heads:make-all-"
    parse_reference(make_reference("__x__", "..y"))
    with pytest.raises(OciError):
        parse_reference("UPPER/case:tag")


# -- one index walk for layouts and registries ---------------------------------------


def nested_index_image() -> tuple[dict[str, bytes], bytes, dict[str, tuple[bytes, str]]]:
    """An image whose top index names, with a *manifest* media type (as some tools
    write it), a multi-platform index of two images: this machine's and another's.

    Returns the blobs by digest, the top index, and the documents to put in a
    registry: digest -> (bytes, media type), in an order a registry accepts.
    """
    from amber.daemon.oci.spec import machine_architecture

    def sha(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def desc(data: bytes, media_type: str, **more) -> dict:
        return {"mediaType": media_type, "digest": sha(data), "size": len(data), **more}

    blobs: dict[str, bytes] = {}
    documents: dict[str, tuple[bytes, str]] = {}
    entries = []
    host = machine_architecture()
    for arch in (host, "arm64" if host != "arm64" else "amd64"):
        layer = layer_tar((member(f"{arch}.txt", mode=0o644), f"the {arch} image\n".encode()))
        config = json.dumps({"architecture": arch, "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()  # fmt: skip
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": desc(config, "application/vnd.oci.image.config.v1+json"),
            "layers": [desc(layer, "application/vnd.oci.image.layer.v1.tar")],
        }).encode()  # fmt: skip
        blobs.update({sha(layer): layer, sha(config): config, sha(manifest): manifest})
        documents[sha(manifest)] = (manifest, "application/vnd.oci.image.manifest.v1+json")
        entries.append(desc(manifest, "application/vnd.oci.image.manifest.v1+json",
                            platform={"architecture": arch, "os": "linux"}))  # fmt: skip
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": entries}).encode()  # fmt: skip
    blobs[sha(nested)] = nested
    documents[sha(nested)] = (nested, "application/vnd.oci.image.index.v1+json")
    mislabelled = desc(nested, "application/vnd.oci.image.manifest.v1+json",
                       annotations={"org.opencontainers.image.ref.name": "latest"})  # fmt: skip
    top = json.dumps({"schemaVersion": 2, "manifests": [mislabelled]}).encode()
    return blobs, top, documents


def test_a_layout_and_a_registry_walk_a_nested_index_alike(registry: str, tmp_path: Path):
    """The same image in a layout and in a registry gives the same tree: this
    machine's, found through an index entry whose media type calls the nested
    multi-platform index a manifest. (The layout went by the entry's media
    type and refused "an index" where the registry went by the document.)"""
    from amber.daemon.oci.registry import RegistryClient
    from amber.daemon.oci.spec import OCI_INDEX, machine_architecture

    blobs, top, documents = nested_index_image()
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for digest, data in blobs.items():
        (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    (layout / "index.json").write_bytes(top)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    client = RegistryClient(registry)
    try:
        for digest, data in blobs.items():
            if digest not in documents:
                client.upload("nested/img", digest, data, len(data))
        for digest, (data, media_type) in documents.items():
            client.put_manifest("nested/img", digest, data, media_type)
        client.put_manifest("nested/img", "latest", top, OCI_INDEX)
    finally:
        client.close()

    store = Store.open(tmp_path / "s")
    from_layout = read_image(layout, store).trees[-1]
    from_registry = read_image(f"{registry}/nested/img:latest", store).trees[-1]
    assert from_layout == from_registry
    host = machine_architecture()
    assert set(listing(store, from_layout)) == {f"{host}.txt"}
    assert listing(store, from_layout)[f"{host}.txt"] == f"the {host} image\n".encode()


def test_an_image_with_too_many_entries_is_refused(store: Store):
    """The tree being built is in memory: its entry count is bounded."""
    many = layer_tar(*[(member(f"f{i}", mode=0o644), b"") for i in range(11)])
    with store.batch() as batch:
        TreeBuilder(store, batch, max_entries=11).apply(io.BytesIO(many))
    with store.batch() as batch, pytest.raises(OciError, match="more entries than amber keeps"):
        TreeBuilder(store, batch, max_entries=10).apply(io.BytesIO(many))
