"""scripts/fetch-sources against a local Debian mirror that lists a version it
does not serve: the state a real mirror is in while a security update's
files have not reached it (or have left it)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FETCH = REPO / "scripts" / "fetch-sources"
SUITE = "ambertest"
PACKAGE = "amberfake"


def _orig_tarball(version: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = f"amberfake {version}\n".encode()
        info = tarfile.TarInfo(f"{PACKAGE}-{version}/README")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _files_stanza(files: dict[str, bytes]) -> str:
    md5 = "".join(f" {hashlib.md5(b).hexdigest()} {len(b)} {n}\n" for n, b in files.items())
    sha = "".join(f" {hashlib.sha256(b).hexdigest()} {len(b)} {n}\n" for n, b in files.items())
    return f"Files:\n{md5}Checksums-Sha256:\n{sha}"


def make_mirror(top: Path, served: list[str], listed_only: list[str]) -> dict[str, bytes]:
    """A deb-src repository listing every version; only ``served`` have files.

    Returns the orig tarballs of the served versions by file name."""
    pool = top / "pool" / "main" / "a" / PACKAGE
    pool.mkdir(parents=True)
    paragraphs, served_origs = [], {}
    for version in served + listed_only:
        upstream = version.split("-")[0]
        orig = _orig_tarball(upstream)
        dsc = f"Format: 1.0\nSource: {PACKAGE}\nVersion: {version}\n".encode()
        files = {f"{PACKAGE}_{version}.dsc": dsc, f"{PACKAGE}_{upstream}.orig.tar.gz": orig}
        if version in served:
            for name, data in files.items():
                (pool / name).write_bytes(data)
            served_origs[f"{PACKAGE}_{upstream}.orig.tar.gz"] = orig
        paragraphs.append(
            f"Package: {PACKAGE}\nBinary: {PACKAGE}\nVersion: {version}\n"
            f"Maintainer: amber <amber@example.org>\nArchitecture: any\nFormat: 1.0\n"
            f"Directory: pool/main/a/{PACKAGE}\n" + _files_stanza(files)
        )
    sources = ("\n".join(paragraphs)).encode()
    indexes = {"main/source/Sources": sources, "main/source/Sources.gz": gzip.compress(sources)}
    dist = top / "dists" / SUITE
    (dist / "main" / "source").mkdir(parents=True)
    for name, data in indexes.items():
        (dist / name).write_bytes(data)
    (dist / "Release").write_text(
        f"Suite: {SUITE}\nCodename: {SUITE}\nComponents: main\n"
        "Date: Wed, 02 Dec 2026 00:00:00 UTC\nSHA256:\n"
        + "".join(f" {hashlib.sha256(d).hexdigest()} {len(d)} {n}\n" for n, d in indexes.items())
    )
    return served_origs


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on loopback serving ``tmp_path/mirror``."""
    top = tmp_path / "mirror"
    top.mkdir()
    handler = functools.partial(_Quiet, directory=str(top))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", top
    finally:
        server.shutdown()
        server.server_close()


def fetch(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    sources = tmp_path / "mirror.sources"
    sources.write_text(
        f"Types: deb-src\nURIs: {url}\nSuites: {SUITE}\nComponents: main\nTrusted: yes\n"
    )
    cache = tmp_path / "cache"
    os.makedirs(cache, exist_ok=True)
    os.chmod(tmp_path, 0o755)  # apt's download user writes into the cache
    env = dict(
        os.environ,
        AMBER_APT_SOURCES=str(sources),
        AMBER_DEBIAN_SUITE=SUITE,
        AMBER_TEST_CACHE=str(cache),
    )
    return subprocess.run(
        [sys.executable, str(FETCH), *args], capture_output=True, text=True, env=env, timeout=300
    )


def manifest(tmp_path: Path) -> dict[str, list[str]]:
    lines = (tmp_path / "cache" / "sources" / "MANIFEST").read_text().splitlines()
    return {ln.split()[0]: ln.split()[1:] for ln in lines if not ln.startswith("#")}


def test_newest_version_not_served_falls_back_to_the_next(tmp_path: Path, mirror) -> None:
    url, top = mirror
    origs = make_mirror(top, served=["1.0-1", "1.1-1"], listed_only=["1.2-1+sec1"])
    done = fetch(tmp_path, url, PACKAGE)
    assert done.returncode == 0, done.stderr
    # the newest *served* version, and the fetcher says which one it took and why
    assert "took version 1.1-1 (newer 1.2-1+sec1 not served)" in done.stderr
    filename, sha256, version = manifest(tmp_path)[PACKAGE]
    assert (filename, version) == (f"{PACKAGE}_1.1.orig.tar.gz", "1.1-1")
    data = (tmp_path / "cache" / "sources" / filename).read_bytes()
    assert data == origs[filename]
    assert hashlib.sha256(data).hexdigest() == sha256
    assert done.stdout.split() == [PACKAGE, str(tmp_path / "cache" / "sources" / filename)]


def test_a_pinned_version_is_the_only_one_tried(tmp_path: Path, mirror) -> None:
    url, top = mirror
    make_mirror(top, served=["1.0-1"], listed_only=["1.2-1"])
    done = fetch(tmp_path, url, f"{PACKAGE}=1.2-1")
    assert done.returncode == 1
    assert "1.2-1" in done.stderr and "404" in done.stderr
    assert not (tmp_path / "cache" / "sources" / "MANIFEST").exists()


def test_no_version_served_fails_naming_each(tmp_path: Path, mirror) -> None:
    url, top = mirror
    make_mirror(top, served=[], listed_only=["1.0-1", "2.0-1"])
    done = fetch(tmp_path, url, PACKAGE)
    assert done.returncode == 1
    assert "no version could be downloaded" in done.stderr
    assert f"{PACKAGE}=2.0-1" in done.stderr and f"{PACKAGE}=1.0-1" in done.stderr
