"""Sources and imports a member of the amber group could turn against amberd.

Each test drives the real `amber` as uid 4242 (``setpriv``) against the real
amberd running as root: a never-ending ``/dev/zero`` source, a local source
swapped for a FIFO after the spec was read, an image that decompresses to
far more than it weighs, a download that stalls while another user needs
the same content, and the question of whether a file exists where the user
cannot look. Each checks what the user (or the admin) would look at: the
build's error, the state directory's size and leftovers, who got served.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from amberd_process import Daemon
from second_user import HANG, MAL, mal_daemon

from amber.sandbox.store import Store


def du(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def leftovers(daemon: Daemon) -> list[str]:
    """Files in the state directory's temporary places."""
    out = []
    for tmp in (Path(Store(daemon.state).tmp_dir), daemon.state / "tmp"):
        if tmp.is_dir():
            out += [str(tmp / name) for name in os.listdir(tmp)]
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 with ``handler``; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def spec(body: str, run: str = "true") -> str:
    return f'[build]\nname = "t"\n\n{body}\n[[step]]\nname = "s"\nrun = "{run}"\n'


# --------------------------------------------------------------------------- sources


def test_a_dev_zero_url_is_refused_and_the_disk_does_not_fill(daemon_root: Path):
    with mal_daemon(daemon_root, 'source-max-size = "2G"\n') as mal:
        before = du(mal.daemon.state)
        zero = spec(f'[[source]]\nurl = "file:///dev/zero"\nsha256 = "{"0" * 64}"\ndest = "z"\n')
        code, out = mal.said("build", mal.write("zero.toml", zero))
        assert code != 0
        assert "/dev/zero is a character device, not a regular file" in out, out
        assert du(mal.daemon.state) - before < 64 << 20
        assert leftovers(mal.daemon) == []


def test_a_source_swapped_for_a_fifo_after_parsing_is_refused(daemon_root: Path):
    """The local source is a file when the spec is read; while the build fetches
    its url source (the server does the swap), it becomes a FIFO nobody writes."""
    data = b"downloaded\n"
    with mal_daemon(daemon_root) as mal:
        local = mal.write("src/local.txt", "a file, for now\n")

        class Swapping(Quiet):
            def do_GET(self) -> None:
                local.unlink()
                os.mkfifo(local)
                os.chown(local, MAL, MAL)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        with serve(Swapping) as url:
            body = (
                f'[[source]]\nurl = "{url}/d.txt"\nsha256 = "{sha256(data)}"\ndest = "d.txt"\n\n'
                '[[source]]\npath = "src/local.txt"\ndest = "local.txt"\n'
            )
            try:
                code, out = mal.said("build", mal.write("fifo.toml", spec(body)))
            finally:
                if local.exists():  # wake a reader a broken amberd left blocked on it
                    os.close(os.open(local, os.O_RDWR | os.O_NONBLOCK))
        assert code != 0
        assert "local.txt is a FIFO, not a regular file" in out, out


def test_a_stalled_download_does_not_hold_another_users_fetch_hostage(daemon_root: Path):
    """uid 4242's build fetches a package from a server that sends headers and
    then nothing; root's build needs the same content from a server that
    works. Root's is served while 4242's download is still stuck (it used to
    wait for it to give up), and 4242's errors after fetch-timeout."""
    data = os.urandom(100_000)
    connected, closed = threading.Event(), threading.Event()
    served_while_stuck: list[bool] = []

    class Stalled(Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.flush()
            connected.set()
            self.rfile.read(1)  # returns when amberd hangs up
            closed.set()

    class Working(Quiet):
        def do_GET(self) -> None:
            served_while_stuck.append(connected.is_set() and not closed.is_set())
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def url_spec(url: str) -> str:
        return spec(f'[[source]]\nurl = "{url}"\nsha256 = "{sha256(data)}"\ndest = "pkg.tgz"\n')

    with (
        mal_daemon(daemon_root, 'fetch-timeout = "20s"\n') as mal,
        serve(Stalled) as stalled,
        serve(Working) as working,
    ):
        stuck = mal.popen("build", mal.write("b.toml", url_spec(f"{stalled}/b/pkg.tgz")))
        try:
            assert connected.wait(HANG)
            root_spec = daemon_root / "root-spec" / "a.toml"
            root_spec.parent.mkdir()
            root_spec.write_text(url_spec(f"{working}/a/pkg.tgz"))
            proc = mal.daemon.amber("build", str(root_spec), timeout=HANG)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert served_while_stuck == [True]
            out, _ = stuck.communicate(timeout=HANG)
        finally:
            stuck.kill()
        assert stuck.returncode != 0
        assert "stalled: nothing arrived for 20s after 0 B (fetch-timeout)" in out.decode()
        assert closed.is_set()


def test_whether_a_file_exists_where_the_user_cannot_look_stays_unknown(daemon_root: Path):
    """Spec paths are looked at as the user: a file in root's 0700 directory and
    a name that is not there give the user the same answer."""
    hidden = daemon_root / "root-only"
    hidden.mkdir(mode=0o700)
    (hidden / "exists.txt").write_text("secret\n")
    with mal_daemon(daemon_root) as mal:
        answers = []
        for name in ("exists.txt", "missing.txt"):
            body = f'[[source]]\npath = "{hidden / name}"\ndest = "x"\n'
            code, out = mal.said("build", mal.write(f"{name}.toml", spec(body)))
            assert code != 0
            answers.append(out.replace(name, "NAME"))
        assert answers[0] == answers[1]
        assert "Permission denied" in answers[0], answers[0]


# --------------------------------------------------------------------------- imports


def oci_archive_bytes(layer: bytes, *, gzip_layer: bool) -> bytes:
    """An OCI archive holding one layer (gzip-compressed, or not)."""

    def sha(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    blob = gzip.compress(layer, 1) if gzip_layer else layer
    media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzip_layer else "")
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": media, "digest": sha(blob), "size": len(blob)}],
    }).encode()  # fmt: skip
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest), "size": len(manifest)}
    ]}).encode()  # fmt: skip
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    for data in (manifest, config, blob):
        files[f"blobs/sha256/{sha(data)[7:]}"] = data
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def zeros_layer(size: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return out.getvalue()


@pytest.mark.parametrize(
    ("how", "command"),
    [("gzip-layer", "import"), ("gzip-archive", "import"), ("gzip-layer", "image-import")],
)
def test_an_image_that_unpacks_past_the_cap_is_refused(daemon_root: Path, how: str, command: str):
    """64 MiB of zeros in a gzip layer, or an uncompressed layer in a gzipped
    archive: a few hundred KiB to send, refused under a 16 MiB import-max-size,
    with nothing left behind in the state directory's tmp."""
    layer = zeros_layer(64 << 20)
    archive = oci_archive_bytes(layer, gzip_layer=how == "gzip-layer")
    if how == "gzip-archive":
        archive = gzip.compress(archive, 1)
    assert len(archive) < 1 << 20
    with mal_daemon(daemon_root, 'import-max-size = "16M"\n') as mal:
        path = mal.write("big.tar", archive)
        args = (
            ("import", path) if command == "import" else ("image", "import", "big", f"oci:{path}")
        )
        code, out = mal.said(*args)
        assert code != 0
        assert "more than 16 MiB (import-max-size)" in out, out
        assert leftovers(mal.daemon) == []
        assert mal.said("image", "ls")[1].count("big") == 0
