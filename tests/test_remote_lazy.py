"""Lazy pulls from a remote cache, through a proxy that sees every blob asked for.

Host A builds and pushes to a real docker-registry; host B reads it through
``RegistryProxy``. What a user checks: step statuses, the log's notes, that
the registry was (or was not) needed, `amber shell` and `amber store fsck`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from registry_proxy import RegistryProxy, kill_registry, restart_registry
from test_remote import FAILING, SPEC, host, notes, public, statuses, wait_pushed, write_spec
from test_remote_share import keys_of, said, uploaded_or_downloaded
from tools import need

from amber.daemon.build.spec_model import DEFAULT_WORKDIR
from amber.daemon.oci.registry import RegistryClient
from amber.daemon.remote import lazy
from amber.daemon.remote.layout import PACK_TYPE, Layer
from amber.sandbox.digest import hash_bytes
from amber.sandbox.store import Store

WORKDIR = DEFAULT_WORKDIR.strip("/")
EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def manifests(registry: str, tags: list[str]) -> tuple[set[str], set[str]]:
    """The config digests and the layer digests of the results under ``tags``."""
    client = RegistryClient(registry)
    configs, layers = set(), set()
    try:
        for tag in tags:
            doc = json.loads(client.get_manifest("amber/trunk", tag)[0])
            configs.add(doc["config"]["digest"])
            layers.update(d["digest"] for d in doc["layers"])
    finally:
        client.close()
    return configs, layers


@contextlib.contextmanager
def a_and_b(daemon_root: Path, registry: str, *, pull: str = "lazy") -> Iterator[tuple]:
    """Host A pushes to the registry; host B reads A's results through a proxy, pushes nothing."""
    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    with RegistryProxy(registry) as proxy:
        b = host(daemon_root, "ci-b", proxy.address, sign=False, trusted={"ci-a": public(a)},
                 push=False)  # fmt: skip
        try:
            if pull != "lazy":
                b.stop()
                config = b.root / "amberd.toml"
                config.write_text(config.read_text() + f'pull = "{pull}"\n')  # in its [cache]
                b.start("--config", str(config))
            yield a, b, proxy
        finally:
            b.stop()
            a.stop()


def fsck_clean(daemon) -> dict:
    report = json.loads(daemon.amber("store", "fsck", "--json").stdout)
    assert not report["corrupt"] and not report["missing"] and not report["problems"], report
    assert report["temp_files"] == 0, report
    return report


def test_a_fully_cached_build_pulls_only_metadata_and_a_shell_pulls_the_rest(
    daemon_root, registry, tmp_path
):
    with a_and_b(daemon_root, registry) as (a, b, proxy):
        spec = write_spec(daemon_root, SPEC.format(three="3"))
        assert a.build_json(spec)[0] == 0
        _, layers = manifests(registry, wait_pushed(registry, 4))
        code, report = b.build_json(spec)
        assert code == 0 and statuses(report) == ["cached"] * 4
        assert proxy.blob_gets == []  # metadata only, and the manifests carry it: not one blob

        kill_registry(tmp_path / "registry.yml")
        asked = proxy.requests
        code, again = b.build_json(spec)
        assert code == 0 and statuses(again) == ["cached"] * 4
        assert proxy.requests == asked  # a local hit: nobody asked the registry
        shell = b.amber("shell", again["build"], "--", "cat", "one")
        assert shell.returncode != 0 and b"could not be pulled" in shell.stderr, shell.stderr

        # Remote-held results lacking their closure are lazy hits, not garbage nor damage.
        assert b.amber("gc").returncode == 0
        fsck_clean(b)
        code, after_gc = b.build_json(spec)
        assert code == 0 and statuses(after_gc) == ["cached"] * 4

        proc = restart_registry(tmp_path / "registry.yml", registry)
        try:
            shell = b.amber("shell", after_gc["build"], "--", "cat", "one")
            assert shell.returncode == 0 and shell.stdout == b"one\n", shell.stderr
            assert set(proxy.blob_gets) & layers  # pulled on demand, now
            diff = b.amber("diff", after_gc["build"], "--step", "two")
            assert diff.returncode == 0 and b"/build/many/300" in diff.stdout, diff.stderr
            code, linked = b.build_json(spec, "--out-link", str(daemon_root / "out"))
            assert code == 0 and statuses(linked) == ["cached"] * 4, linked.get("error")
            assert (daemon_root / "out" / WORKDIR / "four").read_text() == "one\n3\n"
            fsck_clean(b)
        finally:
            proc.terminate()
            proc.wait()


def test_eager_pulls_every_hit_at_once(daemon_root, registry, tmp_path):
    with a_and_b(daemon_root, registry, pull="eager") as (a, b, proxy):
        spec = write_spec(daemon_root, SPEC.format(three="3"))
        assert a.build_json(spec)[0] == 0
        _, layers = manifests(registry, wait_pushed(registry, 4))
        code, report = b.build_json(spec)
        assert code == 0 and statuses(report) == ["cached"] * 4
        # Every layer of every hit, at hit time (but the empty logs: B has the empty blob).
        assert layers - {EMPTY_SHA256} <= set(proxy.blob_gets)
        kill_registry(tmp_path / "registry.yml")
        shell = b.amber("shell", report["build"], "--", "cat", "one")
        assert shell.returncode == 0 and shell.stdout == b"one\n", shell.stderr
        fsck_clean(b)


def test_a_registry_killed_mid_pull_reruns_the_steps_it_could_not_send(
    daemon_root, registry, tmp_path
):
    with a_and_b(daemon_root, registry) as (a, b, proxy):
        assert a.build_json(write_spec(daemon_root, SPEC.format(three="3")))[0] == 0
        wait_pushed(registry, 4)
        # B changes step three: it runs on step two's state, pulled then; the
        # registry dies 1 MB into the 3 MB file of that state.
        proxy.cut_size, proxy.cut_after = 2_000_000, 1 << 20
        proxy.on_cut = lambda: kill_registry(tmp_path / "registry.yml")
        code, report = b.build_json(write_spec(daemon_root, SPEC.format(three="b"), "b.toml"))
        assert proxy.cut.is_set()
        assert code == 0, report
        # Two's state could not come, nor one's (the registry is gone): both rerun.
        assert statuses(report) == ["ran"] * 4
        said = notes(b, report["build"])
        assert "step two: its cached result could not be fetched" in said, said
        assert "step one: its cached result could not be fetched" in said, said
        shell = b.amber("shell", report["build"], "--", "sh", "-c", "wc -c < big; cat four")
        assert shell.stdout == b"3000000\none\nb\n", shell.stderr
        fsck_clean(b)  # nothing half-pulled or corrupt left behind


def test_a_pull_cut_off_resumes_with_what_it_had_not_got(daemon_root, registry, tmp_path):
    with a_and_b(daemon_root, registry) as (a, b, proxy):
        spec = write_spec(daemon_root, SPEC.format(three="3"))
        assert a.build_json(spec)[0] == 0
        wait_pushed(registry, 4)
        code, report = b.build_json(spec)
        assert code == 0 and statuses(report) == ["cached"] * 4
        key = json.loads(b.amber("show", "--json", report["build"]).stdout)["steps"][1]["key"]
        client = RegistryClient(registry)
        doc = json.loads(client.get_manifest("amber/trunk", "step-" + key)[0])
        client.close()
        big = [d["digest"] for d in doc["layers"] if d["size"] >= 2_000_000]
        assert len(big) == 1  # step one's 3 MB file, in step two's state

        proxy.cut_size, proxy.cut_after = 2_000_000, 1 << 20
        proxy.on_cut = lambda: kill_registry(tmp_path / "registry.yml")
        shell = b.amber("shell", report["build"], "--step", "two", "--", "cat", "one")
        assert proxy.cut.is_set() and shell.returncode != 0, shell.stderr
        assert b"ended after 1048576 of 3000000 bytes" in shell.stderr, shell.stderr
        fsck_clean(b)  # the half of the big blob is not kept

        proxy.cut_size = None
        proc = restart_registry(tmp_path / "registry.yml", registry)
        try:
            asked = len(proxy.blob_gets)
            shell = b.amber("shell", report["build"], "--step", "two", "--", "cat", "one")
            assert shell.returncode == 0 and shell.stdout == b"one\n", shell.stderr
            assert proxy.blob_gets[asked:] == big  # the packs it had applied are not fetched again
            asked = len(proxy.blob_gets)
            assert b.amber("shell", report["build"], "--step", "two", "--", "true").returncode == 0
            assert len(proxy.blob_gets) == asked  # whole here now: nothing asked
            fsck_clean(b)
        finally:
            proc.terminate()
            proc.wait()


def test_a_remote_failure_replays_with_only_its_log_pulled(daemon_root, registry, tmp_path):
    with a_and_b(daemon_root, registry) as (a, b, proxy):
        spec = write_spec(daemon_root, FAILING.replace("echo kept", "echo prepared && echo kept"))
        assert a.build_json(spec)[0] == 1
        configs, _ = manifests(registry, wait_pushed(registry, 2))
        code, report = b.build_json(spec)
        assert code == 1 and statuses(report) == ["cached", "cached-failure"]
        logs = set(proxy.blob_gets) - configs
        assert len(logs) == 1  # the failed step's log layer, and no tree
        kill_registry(tmp_path / "registry.yml")
        log = b.amber("log", report["build"])
        assert b"cc: fatal error: remote-visible" in log.stdout, log.stderr
        # The log of the step that succeeded was not pulled, and cannot be now: a note says so.
        assert b"prepared" not in log.stdout and b"could not be pulled" in log.stdout + log.stderr
        shell = b.amber("shell", report["build"], "--", "cat", "kept")
        assert shell.returncode != 0 and b"could not be pulled" in shell.stderr, shell.stderr
        proc = restart_registry(tmp_path / "registry.yml", registry)
        try:
            log = b.amber("log", report["build"])
            assert b"prepared\n" in log.stdout, log.stderr  # pulled when asked for
        finally:
            proc.terminate()
            proc.wait()


def test_a_layer_whose_size_is_not_its_files_is_refused_unread(daemon_root, registry):
    with a_and_b(daemon_root, registry) as (a, b, proxy):
        assert a.build_json(write_spec(daemon_root, SPEC.format(three="3")))[0] == 0
        tags = wait_pushed(registry, 4)
        # Someone who can write the registry makes step two's big layer say 1 TB. The
        # signature stands (layers are not signed): only the trees say the file's size.
        key_two = json.loads(a.amber("show", "--json", "shared-1").stdout)["steps"][1]["key"]
        client = RegistryClient(registry)
        body, media_type, _ = client.get_manifest("amber/trunk", "step-" + key_two)
        doc = json.loads(body)
        (big,) = [d for d in doc["layers"] if d["size"] == 3_000_000]
        big["size"] = 1 << 40
        client.put_manifest("amber/trunk", "step-" + key_two, json.dumps(doc).encode(), media_type)
        client.close()
        assert len(tags) == 4
        code, report = b.build_json(write_spec(daemon_root, SPEC.format(three="b"), "b.toml"))
        assert code == 0 and statuses(report) == ["cached", "ran", "ran", "ran"], report
        said = notes(b, report["build"])
        assert f"layer {big['digest']} is {1 << 40} bytes, its file 3000000" in said, said
        # Fetched once: for step one's state (its manifest is whole), never for step two's.
        assert proxy.blob_gets.count(big["digest"]) == 1
        fsck_clean(b)


def test_gc_keeps_lazy_hits_for_keep_failed_days_then_a_lookup_finds_them_again(
    daemon_root, registry
):
    with a_and_b(daemon_root, registry) as (a, b, proxy):
        spec = write_spec(daemon_root, SPEC.format(three="3"))
        assert a.build_json(spec)[0] == 0
        wait_pushed(registry, 4)
        assert statuses(b.build_json(spec)[1]) == ["cached"] * 4
        assert b.amber("gc").returncode == 0
        asked = proxy.requests
        assert statuses(b.build_json(spec)[1]) == ["cached"] * 4
        assert proxy.requests == asked  # still known here: no lookup
        assert b.amber("gc", "--keep-failed", "0").returncode == 0
        assert statuses(b.build_json(spec)[1]) == ["cached"] * 4
        assert proxy.requests > asked  # forgotten, and found again in the registry
        fsck_clean(b)


MANY_BIG = """
[build]
name = "many-big"
base = "host"

[[step]]
name = "files"
run = "for i in 1 2 3 4 5 6 7 8 9 10; do head -c 1200000 /dev/urandom > big$i; done"

[[step]]
name = "use"
run = "cat big* | wc -c > total && echo {x} > x"
"""


def test_a_closure_is_pulled_in_parallel_four_layers_at_a_time(daemon_root, registry):
    with a_and_b(daemon_root, registry) as (a, b, proxy):
        assert a.build_json(write_spec(daemon_root, MANY_BIG.format(x=1)))[0] == 0
        wait_pushed(registry, 2)
        proxy.blob_delay = 0.3
        code, report = b.build_json(write_spec(daemon_root, MANY_BIG.format(x=2), "b.toml"))
        assert code == 0 and statuses(report) == ["cached", "ran"], report
        assert proxy.max_in_flight == 4  # ten big files: in parallel, never more than four
        shell = b.amber("shell", report["build"], "--", "cat", "total")
        assert shell.stdout == b"12000000\n", shell.stderr


def test_a_pin_on_remote_hits_tags_them_there_and_downloads_no_layer(daemon_root, registry):
    """A result a remote holds is still a result: pinning it tags it in the
    remote (``pin-USER.NAME.N``) from its manifest; no file comes here."""
    from test_remote_pins import remote_host, repo_tags, wait_tagged

    a = host(daemon_root, "ci-a", registry, sign=True, trusted={})
    with RegistryProxy(registry) as proxy:
        # B reads through the proxy (which sees every blob GET) and tags pins in trunk itself.
        b = remote_host(daemon_root, "ci-b", [(f"http://{proxy.address}/amber/trunk", False),
                                              (f"http://{registry}/amber/trunk", True)],
                        sign=False, trusted={"ci-a": public(a)})  # fmt: skip
        try:
            spec = write_spec(daemon_root, SPEC.format(three="3"))
            assert a.build_json(spec)[0] == 0
            configs, _ = manifests(registry, wait_pushed(registry, 4))
            code, report = b.build_json(spec, "--pin", "kept")
            assert code == 0 and statuses(report) == ["cached"] * 4, report.get("error")
            assert wait_tagged(b, "kept", 4) == [f"pin-root.kept.{i}" for i in range(4)]
            assert not set(proxy.blob_gets) - configs  # the pin read manifests, not one layer
            assert "pin-root.kept.3" in repo_tags(registry)
            listed = b.amber("pin", "ls").stdout.decode()
            assert f"local, http://{registry}/amber/trunk" in listed
        finally:
            b.stop()
            a.stop()


@contextlib.contextmanager
def syncfs_calls(daemon) -> Iterator[list[str]]:
    """The syncfs(2) calls ``daemon`` makes (every thread) while the block runs, by strace."""
    need("strace")
    out = daemon.root / "strace.out"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=syncfs", "-o", str(out),
                               "-p", str(daemon.process.pid)], stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:  # attached
        time.sleep(0.05)
    time.sleep(0.3)
    calls: list[str] = []
    try:
        yield calls
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        calls += [line for line in out.read_text().splitlines() if "syncfs(" in line]


def test_a_pull_says_every_byte_it_downloaded_and_commits_its_layers_together(
    daemon_root, registry
):
    with a_and_b(daemon_root, registry) as (a, b, proxy):
        code, report = a.build_json(write_spec(daemon_root, MANY_BIG.format(x=1)))
        assert code == 0
        wait_pushed(registry, 2)
        key = keys_of(a, report["build"])[0]
        doc = json.loads(RegistryClient(registry).get_manifest("amber/trunk", "step-" + key)[0])
        sizes = {d["digest"]: d["size"] for d in doc["layers"]}
        assert len(sizes) >= 12  # the log, ten big files, a pack or more
        proxy.blob_delay = 0.2  # the layers' downloads overlap
        with syncfs_calls(b) as calls:
            pulled = b.amber("pull", key)
        assert pulled.returncode == 0, said(pulled)
        fetched = [g for g in proxy.blob_gets if g in sizes]
        assert proxy.max_in_flight == 4 and len(fetched) >= 11
        assert uploaded_or_downloaded(said(pulled), "downloaded") == sum(sizes[g] for g in fetched)
        # Layers arrive into batches of their own, committed together: not two syncs a layer.
        assert len(calls) < 2 * len(fetched), calls
        # What arrived is whole: the next step runs on it, with the remote off.
        code, built = b.build_json(write_spec(daemon_root, MANY_BIG.format(x=1)), "--no-remote")
        assert code == 0 and statuses(built) == ["cached", "ran"], built
        shell = b.amber("shell", built["build"], "--", "cat", "total")
        assert shell.stdout == b"12000000\n", shell.stderr
        fsck_clean(b)


def test_a_long_pull_commits_what_arrived_past_a_threshold_not_only_at_its_end(
    tmp_path, monkeypatch
):
    """A pull of millions of objects holds their batches only so long (here: 2 objects)."""
    monkeypatch.setattr(lazy, "FLUSH_OBJECTS", 2)
    store = Store.open(tmp_path / "state")
    arrived = lazy._Arrived(store.tmp_dir)
    contents = [b"object %d\n" % i for i in range(4)]
    for i, data in enumerate(contents):
        batch = store.batch()
        store.put_blob_bytes(data, batch)
        arrived.add(Layer(PACK_TYPE, f"sha256:{i:064x}", 10, None), batch, 10)
    # The third crossed it: the first three are in the store before the pull ends.
    assert [store.has_blob(hash_bytes(d)) for d in contents] == [True, True, True, False]
    done, read = arrived.commit("http://registry/amber/trunk", [])
    assert len(done) == 4 and read == 40 and store.has_blob(hash_bytes(contents[3]))
