"""Sources: downloads fetched once, verified, mirrored; stamps; the Heads failure, end to end.

Integration tests drive a real amberd with the real `amber` command; the
HTTP servers are real too (127.0.0.1, a free port, a thread) and count the
requests they answer. The pure parts (candidates, progress, ingesting) are
tested directly at the top.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import blake3
import pytest
from amberd_process import Daemon
from sources import source_tarball

from amber.daemon.build.fetch import (
    DigestMismatch,
    Progress,
    SourceError,
    candidate_urls,
    ingest,
    open_url,
)
from amber.daemon.build.sources import lay_out
from amber.daemon.build.spec import Source, parse_spec
from amber.sandbox.asuser import User
from amber.sandbox.sandboxspec import BUILD_UID
from amber.sandbox.store import Store
from amber.sandbox.tree import EMPTY_TREE


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- pure parts


def test_mirrors_are_prefixes_for_the_file_name():
    url = "https://zlib.net/fossils/zlib-1.2.13.tar.gz"
    assert candidate_urls(url, ["http://m1/pkgs", "file:///srv/mirror/"]) == [
        "http://m1/pkgs/zlib-1.2.13.tar.gz",
        "file:///srv/mirror/zlib-1.2.13.tar.gz",
        url,
    ]
    # file:// sources are local: never mirrored.
    assert candidate_urls("file:///x/a.tar", ["http://m1"]) == ["file:///x/a.tar"]
    # The name is taken as written in the URL (escapes kept), the query left out.
    assert candidate_urls("http://h/d/a%20b.tgz?x=1", ["http://m"])[0] == "http://m/a%20b.tgz"
    # A name that decodes to a path would climb out of a file:// mirror read as root.
    for sneaky in ("http://h/..%2F..%2Fetc%2Fshadow", "http://h/d/%2E%2E", "http://h/d/"):
        assert candidate_urls(sneaky, ["file:///srv/mirror"]) == [sneaky]


def test_progress_every_tenth_at_most_once_a_second():
    said: list[str] = []
    now = [0.0]
    progress = Progress(said.append, "source[1] x", 1000, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 0.1  # 10 s in all, 1% every 0.1 s
        progress.update(step * 10)
    assert len(said) == 10
    assert said[0].startswith("source[1] x: 10% of 1000 B (")
    assert said[-1].startswith("source[1] x: 100% of 1000 B")

    fast: list[str] = []
    progress = Progress(fast.append, "y", 1000, clock=lambda: 0.5)
    progress.update(1000)
    assert fast == []  # done within a second: nothing between start and end notes


def test_progress_without_a_size_every_five_seconds():
    said: list[str] = []
    now = [0.0]
    progress = Progress(said.append, "z", None, clock=lambda: now[0])
    for second in range(1, 21):
        now[0] = float(second)
        progress.update(second << 20)
    assert [s.split(": ")[1].split(" (")[0] for s in said] == [
        "5.0 MiB so far",
        "10.0 MiB so far",
        "15.0 MiB so far",
        "20.0 MiB so far",
    ]


def test_ingest_keeps_only_verified_content(store: Store):
    data = os.urandom(3 << 20)
    good = Source(dest="/build/x", url="http://h/x", sha256=sha256(data))
    with store.batch() as batch:
        got = ingest(
            store, io.BytesIO(data), good, "http://h/x", "source[1]", len(data), lambda _: None,
            batch,
        )  # fmt: skip
    assert got.blob == blake3.blake3(data).digest() and got.sha256 == good.sha256
    assert store.read_blob(got.blob) == data

    other = os.urandom(1000)
    bad = Source(dest="/build/x", url="http://h/x", sha256="0" * 64)
    with pytest.raises(DigestMismatch) as caught, store.batch() as batch:
        ingest(
            store, io.BytesIO(other), bad, "http://h/x", "source[1]", None, lambda _: None, batch
        )
    assert caught.value.expected == "0" * 64 and caught.value.actual == sha256(other)
    assert not store.has_blob(blake3.blake3(other).digest())
    assert os.listdir(store.tmp_dir) == []


def test_file_urls_are_read_as_the_client(daemon_root: Path):
    readable = write(daemon_root / "open.tar", "anyone may read this")
    secret = write(daemon_root / "secret.tar", "root only")
    secret.chmod(0o600)
    nobody = User(65534, 65534)
    with open_url(f"file://{readable}", user=nobody) as (stream, size):
        assert stream.read() == b"anyone may read this" and size == 20
    with (
        pytest.raises(SourceError, match="as uid 65534: Permission denied"),
        open_url(f"file://{secret}", user=nobody),
    ):
        pass
    with open_url(f"file://{secret}", user=User(0, 0)) as (stream, _):
        assert stream.read() == b"root only"


def spec_in(directory: Path, body: str):
    text = f'[build]\nname = "t"\n\n{body}\n[[step]]\nname = "s"\nrun = "true"\n'
    return parse_spec(text, str(directory / "spec.toml"), directory)


def entry_at(store: Store, root: bytes, path: str):
    return store.lookup_path(root, path.strip("/").encode())


def test_directories_made_for_a_source_outside_the_workdir_stay_roots(store: Store, tmp_path):
    """A source at /opt/tool/x.conf must not hand /opt/tool to the build user;
    one at /build/sub/y gets a directory the build user can write."""
    write(tmp_path / "x.conf", "conf\n")
    write(tmp_path / "y", "y\n")
    spec = spec_in(
        tmp_path,
        '[[source]]\npath = "x.conf"\ndest = "/opt/tool/x.conf"\n\n'
        '[[source]]\npath = "y"\ndest = "/build/sub/y"\n',
    )
    tree = lay_out(store, EMPTY_TREE, spec, {}, uid=0, gid=0).tree
    for path in ("/opt", "/opt/tool"):
        assert entry_at(store, tree, path).uid == 0, path
    assert entry_at(store, tree, "/build/sub").uid == BUILD_UID
    assert entry_at(store, tree, "/build").uid == BUILD_UID


def test_a_verified_package_gets_its_stamp_and_a_replaced_one_loses_it(store: Store, tmp_path):
    data = b"package bytes\n"
    write(tmp_path / "pkg.tar", data.decode())
    os.utime(tmp_path / "pkg.tar", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    digest = sha256(data)
    package = f'[[source]]\npath = "pkg.tar"\nsha256 = "{digest}"\ndest = "packages/pkg.tar"\nstamp = "packages/.pkg_verify"\n'
    spec = spec_in(tmp_path, package)
    layout = lay_out(store, EMPTY_TREE, spec, {}, uid=0, gid=0)
    assert layout.findings == []
    stamp = entry_at(store, layout.tree, "/build/packages/.pkg_verify")
    assert store.read_blob(stamp.ref) == f"{digest}  pkg.tar\n".encode()
    # As new as the package, so make's "stamp: package" rule has nothing to redo.
    pkg = entry_at(store, layout.tree, "/build/packages/pkg.tar")
    assert stamp.mtime_ns == pkg.mtime_ns  # file sources have a fixed mtime: content, not copy time
    assert (stamp.uid, stamp.mode) == (1000, 0o644)

    # A checkout laid over the work directory *after* the package replaces it;
    # the stale stamp the checkout carries must not survive.
    write(tmp_path / "checkout" / "packages" / ".pkg_verify", "an old stamp")
    spec = spec_in(tmp_path, package + '\n[[source]]\npath = "checkout"\ndest = "."\n')
    layout = lay_out(store, EMPTY_TREE, spec, {}, uid=0, gid=0)
    assert [(f.kind, f.path) for f in layout.findings] == [
        ("stale-source-stamp", "/build/packages/.pkg_verify")
    ]
    assert "/build/packages/pkg.tar is missing" in layout.findings[0].reason
    assert entry_at(store, layout.tree, "/build/packages/.pkg_verify") is None


def test_downloads_have_a_fixed_mtime_so_the_tree_is_reproducible(store: Store, tmp_path):
    data = b"downloaded"
    spec = spec_in(tmp_path, f'[[source]]\nurl = "http://h/a.tgz"\nsha256 = "{sha256(data)}"\n')
    with store.batch() as batch:
        got = ingest(
            store, io.BytesIO(data), spec.sources[0], "http://h/a.tgz", "s", None, lambda _: None,
            batch,
        )  # fmt: skip
    first = lay_out(store, EMPTY_TREE, spec, {0: got}, uid=0, gid=0).tree
    again = lay_out(store, EMPTY_TREE, spec, {0: got}, uid=0, gid=0).tree
    assert first == again
    entry = entry_at(store, first, "/build/a.tgz")
    assert (entry.mtime_ns, entry.ref, entry.size) == (0, got.blob, len(data))


# --------------------------------------------------------------------------- HTTP servers


class Served:
    """A real HTTP server on 127.0.0.1 serving ``files`` (path -> bytes), counting requests."""

    def __init__(self, files: dict[str, bytes], *, delay: float = 0.0) -> None:
        self.files = files
        self.delay = delay  # seconds between 64 KiB chunks, to make a download slow
        self.requests: Counter[str] = Counter()
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests[self.path] += 1
                data = served.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for start in range(0, len(data), 1 << 16):
                    self.wfile.write(data[start : start + (1 << 16)])
                    if served.delay:
                        time.sleep(served.delay)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@contextlib.contextmanager
def serving(files: dict[str, bytes], **kwargs) -> Iterator[Served]:
    served = Served(files, **kwargs)
    try:
        yield served
    finally:
        with contextlib.suppress(OSError):
            served.stop()


def dead_url() -> str:
    """An http URL nobody listens on (a port that was free a moment ago)."""
    served = Served({})
    url = served.url
    served.stop()
    return url


def steps_of(report: dict) -> list[str]:
    return [s["status"] for s in report["steps"]]


def download_spec(
    directory: Path, url: str, digest: str, run: str = "cat data.bin | wc -c"
) -> Path:
    return write(
        directory / "spec.toml",
        f"""
[build]
name = "download"

[[source]]
url = "{url}"
sha256 = "{digest}"
dest = "packages/data.bin"
stamp = "packages/.data_verify"

[[step]]
name = "use"
run = "ls -la packages; cat packages/.data_verify; {run.replace("data.bin", "packages/data.bin")}"
""",
    )


NAMES_RUN = r"""for f in src/*; do printf %s "$f" | od -An -tx1 | tr -d ' \n'; echo; done
python3 -c 'import glob, os; print(os.getxattr(glob.glob("src/caf*")[0], "user.origin").hex())'"""


def test_a_directory_source_keeps_every_name_byte_for_byte(amberd: Daemon):
    """Names a checkout may hold (not UTF-8, quotes, backslashes, control characters,
    non-ASCII) and an xattr come through the reading helper's JSON exactly."""
    names = [b"caf\xe9", "na\u00efve \u2603".encode(), b'q"uote\\back', b"tab\there\x01"]
    tree = amberd.root / "checkout"
    tree.mkdir()
    for name in names:
        (tree / os.fsdecode(name)).write_bytes(name)
    os.setxattr(tree / os.fsdecode(names[0]), "user.origin", b"\x00\xffkept")
    spec = amberd.root / "names.toml"
    spec.write_text(f'[build]\nname = "names"\nbase = "host"\n[[source]]\npath = "{tree}"\n'
                    f"dest = \"src\"\n\n[[step]]\nname = \"list\"\nrun = '''{NAMES_RUN}'''\n")  # fmt: skip
    code, report = amberd.build_json(spec)
    assert code == 0, report
    log = amberd.amber("log", report["build"]).stdout.decode()
    for name in names:
        assert (b"src/" + name).hex() in log, (name, log)
    assert b"\x00\xffkept".hex() in log, log


# --------------------------------------------------------------------------- downloads


def test_downloaded_once_across_ten_builds_and_offline_afterwards(amberd: Daemon):
    data = os.urandom(300_000)
    with serving({"/pkgs/data.bin": data}) as server:
        spec = download_spec(amberd.root / "dl", f"{server.url}/pkgs/data.bin", sha256(data))
        for number in range(10):
            code, report = amberd.build_json(spec)
            assert code == 0, report
            assert steps_of(report) == ["ran" if number == 0 else "cached"]
        assert server.requests == {"/pkgs/data.bin": 1}
        first = report["build"]

    log = amberd.amber("log", first)
    assert b"300000" in log.stdout
    assert f"{sha256(data)}  data.bin".encode() in log.stdout  # the verification stamp

    # Server gone, daemon restarted (the index is on disk), a step changed so
    # that it really runs over the source again.
    amberd.stop()
    amberd.start()
    write(spec, spec.read_text().replace("wc -c", "wc -c; echo offline"))
    code, report = amberd.build_json(spec)
    assert code == 0, report
    assert steps_of(report) == ["ran"]
    out = amberd.amber("log", report["build"]).stdout
    assert b"300000" in out and b"offline" in out


def test_a_wrong_digest_fails_before_any_step(amberd: Daemon):
    data = b"not what upstream published\n"
    wrong = sha256(b"what upstream published\n")
    with serving({"/x.tar.gz": data}) as server:
        spec = download_spec(amberd.root / "bad", f"{server.url}/x.tar.gz", wrong, run="touch ran")
        proc = amberd.amber("build", str(spec))
        code, report = amberd.build_json(spec)
        out = (proc.stdout + proc.stderr).decode()
        assert proc.returncode == 1
        assert wrong in out and sha256(data) in out  # both digests, in the plain output
        assert code == 1
        assert report["status"] == "failed" and report["frozen"] is False
        assert report["failed_step"] is None
        assert steps_of(report) == ["skipped"]
        assert f"sha256 mismatch: expected {wrong}, got {sha256(data)}" in report["error"]
        # Nothing was cached or kept: with the right digest it builds at once.
        spec.write_text(spec.read_text().replace(wrong, sha256(data)))
        code, report = amberd.build_json(spec)
        assert code == 0 and steps_of(report) == ["ran"], report
        assert server.requests == {"/x.tar.gz": 3}


def test_a_local_file_with_a_wrong_digest_fails_too(amberd: Daemon):
    directory = amberd.root / "local"
    write(directory / "pkg.tar", "local content\n")
    spec = write(
        directory / "spec.toml",
        f"""
[build]
name = "local"

[[source]]
path = "pkg.tar"
blake3 = "{"ab" * 32}"

[[step]]
name = "never"
run = "true"
""",
    )
    code, report = amberd.build_json(spec)
    assert code == 1 and report["status"] == "failed" and steps_of(report) == ["skipped"]
    actual = blake3.blake3(b"local content\n").hexdigest()
    assert report["error"].startswith(f"source[1] {directory / 'pkg.tar'}: blake3 mismatch: ")
    assert f"expected {'ab' * 32}, got {actual}" in report["error"]


def test_first_mirror_down_second_works(daemon_root: Path):
    data = os.urandom(50_000)
    with serving({"/mirror/pkg-1.0.tar.gz": data}) as mirror, serving({}) as origin:
        config = write(
            daemon_root / "amberd.toml",
            f'mirrors = ["{dead_url()}/gone", "{mirror.url}/mirror/"]\n',
        )
        daemon = Daemon(daemon_root).start("--config", str(config))
        try:
            spec = download_spec(daemon_root / "m", f"{origin.url}/up/pkg-1.0.tar.gz", sha256(data))
            proc = daemon.amber("build", str(spec))
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert mirror.requests == {"/mirror/pkg-1.0.tar.gz": 1}
            assert origin.requests == {}  # the source's own URL was never needed
            out = (proc.stdout + proc.stderr).decode()
            assert "/gone/pkg-1.0.tar.gz: " in out  # the dead mirror, noted
            assert f"fetched 48.8 KiB from {mirror.url}/mirror/pkg-1.0.tar.gz" in out
        finally:
            assert daemon.stop() == 0


def test_a_mirror_with_other_content_is_passed_over(daemon_root: Path):
    data = os.urandom(10_000)
    with serving({"/pkg.tgz": b"tampered"}) as mirror, serving({"/up/pkg.tgz": data}) as origin:
        config = write(daemon_root / "amberd.toml", f'mirrors = ["{mirror.url}"]\n')
        daemon = Daemon(daemon_root).start("--config", str(config))
        try:
            spec = download_spec(daemon_root / "m", f"{origin.url}/up/pkg.tgz", sha256(data))
            proc = daemon.amber("build", str(spec))
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert mirror.requests == {"/pkg.tgz": 1} and origin.requests == {"/up/pkg.tgz": 1}
            assert f"has other content (sha256 {sha256(b'tampered')})" in proc.stdout.decode()
        finally:
            assert daemon.stop() == 0


def test_large_downloads_show_progress(amberd: Daemon):
    data = os.urandom(4 << 20)  # 64 chunks of 64 KiB, 40 ms apart: about 2.5 s
    with serving({"/big.bin": data}, delay=0.04) as server:
        spec = download_spec(amberd.root / "big", f"{server.url}/big.bin", sha256(data))
        proc = amberd.amber("build", str(spec))
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stdout.decode().splitlines() if "% of 4.0 MiB" in line]
    assert 1 <= len(progress) <= 10, proc.stdout.decode()


def test_an_unreachable_source_errors_the_build(amberd: Daemon):
    spec = download_spec(amberd.root / "gone", f"{dead_url()}/x.tgz", "0" * 64)
    code, report = amberd.build_json(spec)
    assert code == 1 and report["status"] == "errored"  # outside the spec: may pass later
    assert "could not fetch it" in report["error"]


# --------------------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('[[source]]\npath = "f"\ndest = "../../../etc/x"\n', "source[1].dest"),
        ('[[source]]\npath = "f"\nstamp = "/../../x"\n', "source[1].stamp"),
        ('[[stamp]]\npath = "b/.c"\ncovers = "../b"\n', "stamp[1].covers"),
        ('[[stamp]]\npath = "b/.c"\ncovers = "/etc/b"\n', "stamp[1].covers"),
        ('[[stamp]]\npath = "../.c"\ncovers = "b"\n', "stamp[1].path"),
    ],
)
def test_paths_leaving_the_tree_are_spec_errors(amberd: Daemon, table: str, key: str):
    directory = amberd.root / "leave"
    write(directory / "f", "x")
    spec = write(
        directory / "spec.toml",
        f'[build]\nname = "leave"\n\n{table}\n[[step]]\nname = "s"\nrun = "true"\n',
    )
    proc = amberd.amber("build", str(spec))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert key.encode() in proc.stderr
    assert b"leaves" in proc.stderr or b"'..'" in proc.stderr
    assert json.loads(amberd.amber("builds", "--json").stdout)["builds"] == []


# --------------------------------------------------------------------------- the Heads failure

MAKEFILE = """\
# A Heads-like package build: each stage leaves a stamp, and make trusts it.
pkg := @pkg@
TAR := packages/$(pkg)@EXT@

all: out/libz.a

packages/.$(pkg)_verify: $(TAR)
\techo "$(SHA)  $(TAR)" | sha256sum -c -
\ttouch $@

build/$(pkg)/.patched: packages/.$(pkg)_verify
\tmkdir -p build
\ttar -xf $(TAR) -C build
\tcd build/$(pkg) && patch -p1 < ../../patches/$(pkg).patch
\ttouch $@

build/$(pkg)/.configured: build/$(pkg)/.patched
\tcd build/$(pkg) && ./configure --static
\ttouch $@

build/$(pkg)/.build: build/$(pkg)/.configured
\t$(MAKE) -C build/$(pkg) libz.a
\ttouch $@

out/libz.a: build/$(pkg)/.build
\tmkdir -p out
\tcp build/$(pkg)/libz.a $@
"""

STAMP_RULES = """
[[stamp]]                         # the extracted, patched tree: build/{1}
path = "build/*/.patched"

[[stamp]]
path = "build/*/.configured"
covers = "build/{1}/configure.log"

[[stamp]]
path = "build/*/.build"
covers = "build/{1}/libz.a"

[[stamp]]
path = "packages/.{name}_verify"
covers = "packages/{name}.tar.*"
"""


def package_of(tarball: Path) -> tuple[str, str]:
    """The tarball's top directory (zlib-1.2.13.dfsg, zlib-1.3.1, ...) and its
    ".tar.*" suffix: whichever zlib scripts/fetch-sources took."""
    with tarfile.open(tarball) as tar:
        top = {name.split("/", 1)[0] for name in tar.getnames()}
    assert len(top) == 1, top
    return top.pop(), ".tar" + tarball.name.rsplit(".tar", 1)[1]


def make_patch(tarball: Path, work: Path) -> str:
    """A real patch for zlib: change README, create a new file (as Heads' patches do)."""
    pkg, _ = package_of(tarball)
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(f"{pkg}/README")
        assert member is not None
        readme = member.read().decode()
    write(work / "a" / "README", readme)
    patched = re.sub(r"^(zlib \S+)", r"\1 (patched)", readme, count=1, flags=re.M)
    assert patched != readme
    write(work / "b" / "README", patched)
    write(work / "b" / "AMBER-PATCHED", "applied by the stamp test\n")
    diff = subprocess.run(["diff", "-ruN", "a", "b"], cwd=work, capture_output=True, text=True)
    assert diff.returncode == 1, diff.stderr
    return diff.stdout


def make_checkout(root: Path, tarball: Path, patch: str, state: str) -> Path:
    """A working copy as a CI cache would restore it.

    - "patched-without-stamps": build/pkg extracted and patched, every stamp gone
      (packages/ was not restored);
    - "stamps-without-tree": the stamps of every stage, but not what they vouch for.
    """
    checkout = root / state
    pkg, ext = package_of(tarball)
    makefile = MAKEFILE.replace("@pkg@", pkg).replace("@EXT@", ext)
    write(checkout / "Makefile", makefile.replace("$(SHA)", sha256(tarball.read_bytes())))
    write(checkout / "patches" / f"{pkg}.patch", patch)
    if state == "patched-without-stamps":
        (checkout / "build").mkdir()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(checkout / "build")], check=True)
        subprocess.run(
            ["patch", "-p1", "-i", str(checkout / "patches" / f"{pkg}.patch")],
            cwd=checkout / "build" / pkg,
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
    else:
        for stamp in (f"packages/.{pkg}_verify", f"build/{pkg}/.patched",
                      f"build/{pkg}/.configured", f"build/{pkg}/.build"):  # fmt: skip
            write(checkout / stamp, "")
            time.sleep(0.01)  # each stage after the one before, as make left them
    subprocess.run(["chown", "-R", "1000:1000", str(checkout)], check=True)  # the build user's
    return checkout


def make_outside_amber(checkout: Path, tarball: Path, work: Path) -> subprocess.CompletedProcess:
    """The same Makefile in a plain directory: the package downloaded next to the restored state."""
    plain = work / f"plain-{checkout.name}"
    shutil.copytree(checkout, plain, symlinks=True)
    pkg, ext = package_of(tarball)
    package = plain / "packages" / f"{pkg}{ext}"
    package.parent.mkdir(exist_ok=True)
    shutil.copyfile(tarball, package)
    os.utime(package, (946684800, 946684800))  # older than any restored stamp
    return subprocess.run(
        "make -j2 </dev/null",
        shell=True,
        cwd=plain,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # no controlling terminal: patch takes its default answers
    )


@pytest.mark.parametrize("state", ["patched-without-stamps", "stamps-without-tree"])
def test_the_heads_failure_reproduced_outside_and_fixed_inside(
    amberd: Daemon, tmp_path: Path, state: str
):
    tarball = source_tarball("zlib")
    pkg, ext = package_of(tarball)
    patch = make_patch(tarball, tmp_path / "patch")
    checkout = make_checkout(amberd.root / "heads", tarball, patch, state)

    outside = make_outside_amber(checkout, tarball, tmp_path)
    assert outside.returncode != 0, outside.stdout + outside.stderr
    said = outside.stdout + outside.stderr
    if state == "patched-without-stamps":
        # make extracted again over the patched tree and patch hit what it had done before.
        assert "patch -p1" in said and "AMBER-PATCHED" in said
        assert "already exists" in said or "previously applied" in said
    else:
        # make trusted the stamps and skipped every stage whose products are missing.
        assert "tar -xf" not in said and "./configure" not in said
        assert "libz.a" in said and "No such file" in said

    spec = write(
        amberd.root / "heads" / f"{state}.toml",
        f"""
[build]
name = "heads-{state}"

[[source]]                        # the checkout, with whatever the cache restored
path = "{state}"
dest = "."

[[source]]                        # the package, fetched by amber and verified
url = "file://{tarball}"
sha256 = "{sha256(tarball.read_bytes())}"
dest = "packages/{pkg}{ext}"
stamp = "packages/.{pkg}_verify"

[[step]]
name = "make"
run = "make -j2 && ls -l out/libz.a"
{STAMP_RULES}""",
    )
    verify = amberd.amber("verify", str(spec))
    assert verify.returncode == 1, verify.stdout + verify.stderr

    code, report = amberd.build_json(spec)
    assert code == 0, amberd.amber("log", report["build"]).stdout.decode()[-3000:]
    assert steps_of(report) == ["ran"]

    log = amberd.amber("log", report["build"])
    notes = log.stdout.decode()  # amber log prints its notes with the log
    build_dir = f"/build/build/{pkg}"
    if state == "patched-without-stamps":
        assert (
            f"amber: removed {build_dir}: product without its stamp {build_dir}/.patched "
            "(stamp rule build/*/.patched)"
        ) in notes
        assert (
            f"product without its stamp {build_dir}/.patched (path={build_dir}, "
            "kind=stale-product, rule=build/*/.patched)"
        ) in verify.stdout.decode()
    else:
        for stamp, why in (
            (".patched", f"{build_dir} is empty apart from stamps"),
            (".configured", f"{build_dir}/configure.log is missing"),
            (".build", f"{build_dir}/libz.a is missing"),
        ):
            assert (
                f"amber: removed {build_dir}/{stamp}: stamp without its products: {why} "
                f"(stamp rule build/*/{stamp})"
            ) in notes
    made = log.stdout.decode()
    assert "patching file AMBER-PATCHED" in made and "out/libz.a" in made
    # The build's own state is consistent: nothing to report.
    checked = amberd.amber("verify", report["build"])
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --------------------------------------------------------------------------- amber verify


def test_verify_reports_without_changing_anything(amberd: Daemon):
    directory = amberd.root / "verify"
    write(directory / "checkout" / "build" / "lua" / "lua.h", "stale, no stamp")
    write(directory / "checkout" / "packages" / ".data_verify", "restored by a cache")
    subprocess.run(["chown", "-R", "1000:1000", str(directory / "checkout")], check=True)
    rules = """
[[stamp]]
path = "build/*/.patched"

[[stamp]]
path = "packages/.{name}_verify"
covers = "packages/{name}.bin"
"""
    never_fetched = f"""
[[source]]
url = "{dead_url()}/data.bin"
sha256 = "{"0" * 64}"
dest = "packages/data.bin"
stamp = "packages/.data_verify"
"""
    spec = write(
        directory / "spec.toml",
        f"""
[build]
name = "verify"

[[source]]
path = "checkout"
dest = "."
{never_fetched}
[[step]]
name = "half"
run = "mkdir -p build/zlib && echo half > build/zlib/zlib.h && exit 1"
{rules}""",
    )
    proc = amberd.amber("verify", str(spec))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.decode().splitlines()
    # The url source is not fetched, but checked as a build would have it:
    # its stamp in the checkout is no problem.
    assert lines == [
        "product without its stamp /build/build/lua/.patched (path=/build/build/lua, "
        "kind=stale-product, rule=build/*/.patched)"
    ]
    assert b"is not in the store yet" in proc.stderr
    report = json.loads(amberd.amber("verify", "--json", str(spec)).stdout)
    assert [p["kind"] for p in report["problems"]] == ["stale-product"]
    assert "tree" not in report  # stand-ins are no tree to build from
    assert json.loads(amberd.amber("builds", "--json").stdout)["builds"] == []

    # A frozen failure: a stage in progress has products without a stamp.
    spec.write_text(spec.read_text().replace(never_fetched, ""))
    code, failed = amberd.build_json(spec)
    assert code == 1 and failed["status"] == "failed" and failed["frozen"]
    state = json.loads(amberd.amber("verify", "--json", failed["build"]).stdout)
    assert state["state"] == "state after step half"
    assert [(p["kind"], p["path"]) for p in state["problems"]] == [
        ("stale-product", "/build/build/zlib")
    ]
    assert "/build/build/lua" not in json.dumps(state)  # the build removed it before the step

    local = write(directory / "pkg.bin", "content")
    spec.write_text(
        spec.read_text().replace(
            "[[step]]",
            f'[[source]]\npath = "{local}"\nsha256 = "{"1" * 64}"\ndest = "packages/x.bin"\n\n[[step]]',
            1,
        )
    )
    proc = amberd.amber("verify", str(spec))
    assert proc.returncode == 1
    assert f"expected {'1' * 64}, got {sha256(b'content')}".encode() in proc.stdout
