"""The registry layout and the [cache] table: pure logic, no registry."""

from __future__ import annotations

import json

import pytest

from amber.daemon.config import ConfigError, load_config
from amber.daemon.remote import layout
from amber.daemon.remote.layout import BIG, BLOB, TREE, LayoutError, Obj
from amber.sandbox.digest import hash_bytes


def objects(n: int, size: int = 100) -> list[Obj]:
    return [Obj(BLOB, hash_bytes(b"%d" % i), size) for i in range(n)]


def test_small_files_are_packed_into_few_layers_and_big_ones_stand_alone():
    small = objects(13_000)
    big = Obj(BLOB, hash_bytes(b"big"), BIG)
    plans = layout.plan_layers([*small, big, Obj(TREE, hash_bytes(b"t"), 300)])
    assert len(plans) < 60  # a handful of uploads, not 13,000
    assert [p.objects for p in plans if p.big] == [[big]]
    packed = [o for p in plans if not p.big for o in p.objects]
    assert len(packed) == 13_001


def test_a_closure_that_differs_by_one_file_shares_all_packs_but_one_or_two():
    before = layout.plan_layers(objects(5000))
    after = layout.plan_layers([*objects(5000), Obj(BLOB, hash_bytes(b"new"), 100)])
    old = {tuple(p.objects) for p in before}
    changed = [p for p in after if tuple(p.objects) not in old]
    assert 1 <= len(changed) <= 2


def test_a_pack_round_trips_and_refuses_a_changed_byte():
    items = [(BLOB, hash_bytes(b"hello"), b"hello"), (TREE, hash_bytes(b"x"), b"x")]
    data = layout.encode_pack(items)
    assert list(layout.decode_pack(data)) == items
    bad = bytearray(data)
    bad[-1] ^= 1
    with pytest.raises(LayoutError, match="BLAKE3"):
        list(layout.decode_pack(bytes(bad)))


def test_a_pack_read_as_it_arrives_in_any_chunks_gives_the_same_checked_objects():
    items = [(BLOB, hash_bytes(b"x" * n), b"x" * n) for n in (0, 1, 100, 70_000)]
    items.append((TREE, hash_bytes(b"tree"), b"tree"))
    data = layout.encode_pack(items)
    for size in (1, 7, 4096, len(data)):
        reader = layout.PackReader()
        got = []
        for at in range(0, len(data), size):
            got += [(k, d, bytes(b)) for k, d, b in reader.feed(data[at : at + size])]
        reader.finish()
        assert got == items, size
    for cut in (3, len(data) - 1):  # inside the magic, inside the last object
        reader = layout.PackReader()
        list(reader.feed(data[:cut]))
        with pytest.raises(LayoutError, match=r"not an amber pack|ends inside"):
            reader.finish()
    bad = bytearray(data)
    bad[len(data) // 2] ^= 1  # inside the 70,000-byte object
    with pytest.raises(LayoutError, match="BLAKE3"):
        list(layout.PackReader().feed(bytes(bad)))


def test_the_tag_is_within_the_registry_grammar():
    key = "ab" * 32
    tag = layout.tag_for(key)
    assert tag == "step-" + key and len(tag) <= 128
    with pytest.raises(LayoutError):
        layout.tag_for("../etc")


def test_a_manifest_for_100000_files_stays_far_under_4_mib():
    plans = layout.plan_layers(
        objects(100_000) + [Obj(BLOB, hash_bytes(b"%d" % -i), BIG) for i in range(1, 200)]
    )
    layers = [layout.descriptor(layout.PACK_TYPE, "sha256:" + "0" * 64, p.size) for p in plans]
    doc = layout.manifest("ab" * 32, b"{}", layers, "host", "sig")
    assert len(doc) < 1 << 20
    parsed = layout.parse_manifest(doc, "ab" * 32)
    assert parsed.signer == "host" and len(parsed.layers) == len(plans)
    with pytest.raises(LayoutError, match="another step key"):
        layout.parse_manifest(doc, "cd" * 32)
    assert json.loads(doc)["artifactType"] == layout.ARTIFACT_TYPE
    huge = [layout.descriptor(layout.PACK_TYPE, "sha256:" + "0" * 64, 1 << 40)]
    with pytest.raises(LayoutError, match="a pack of"):  # never read into memory
        layout.parse_manifest(layout.manifest("ab" * 32, b"{}", huge, "h", "s"), "ab" * 32)


def test_the_cache_table_is_read_and_mistakes_name_the_option(tmp_path):
    path = tmp_path / "amberd.toml"
    path.write_text(
        '[[cache.remote]]\nurl = "http://127.0.0.1:5000/amber/trunk"\npush = true\ntrust = ["a"]\n'
        '[cache]\npull = "eager"\nremote-failures = "retry"\nsigning-key = "/etc/k"\n'
    )
    cache = load_config(path).cache
    assert cache.remotes[0].repository == "amber/trunk" and cache.remotes[0].push
    assert (cache.pull, cache.remote_failures, str(cache.signing_key)) == (
        "eager",
        "retry",
        "/etc/k",
    )
    for bad, says in (('[cache]\npull = "sometimes"\n', "pull"),
                      ('[[cache.remote]]\nurl = "ftp://x/y"\n', "cache.remote"),
                      ('[cache]\nsigning-key = "relative"\n', "signing-key"),
                      ('[cache]\ncolour = 1\n', "colour")):  # fmt: skip
        path.write_text(bad)
        with pytest.raises(ConfigError, match=says):
            load_config(path)


def test_the_example_cache_tables_uncommented_are_valid(tmp_path):
    from amber.daemon.config import example_config

    text = example_config()
    block = text[text.index("# [[cache.remote]]") :]
    path = tmp_path / "amberd.toml"
    path.write_text("\n".join(line.removeprefix("# ") for line in block.splitlines()))
    cache = load_config(path).cache
    assert cache.remotes[0].trust == ("ci-trunk-1", "ci-trunk-2") and cache.pull == "lazy"


def test_the_log_is_a_layer_of_its_own_found_by_its_blake3():
    log = hash_bytes(b"the log")
    big = {layout.A_BLAKE3: hash_bytes(b"big").hex()}
    layers = [
        layout.descriptor(layout.LOG_TYPE, "sha256:" + "1" * 64, 7, **{layout.A_BLAKE3: log.hex()}),
        layout.descriptor(layout.PACK_TYPE, "sha256:" + "2" * 64, 100),
        layout.descriptor(layout.BLOB_TYPE, "sha256:" + "3" * 64, BIG, **big),
    ]
    parsed = layout.parse_manifest(layout.manifest("ab" * 32, b"{}", layers, "h", "s"), "ab" * 32)
    found = parsed.log_layer(log)
    assert found is not None and found.digest == "sha256:" + "1" * 64 and found.size == 7
    assert parsed.log_layer(hash_bytes(b"another")) is None
    assert [la.size for la in parsed.packs] == [100]
    assert {la.media_type for la in parsed.big_blobs} == {layout.LOG_TYPE, layout.BLOB_TYPE}
    del layers[0]["annotations"]  # a log layer must say which log it is
    with pytest.raises(LayoutError, match="BLAKE3"):
        layout.parse_manifest(layout.manifest("ab" * 32, b"{}", layers, "h", "s"), "ab" * 32)
    layers[0] = layout.descriptor(layout.BLOB_TYPE, "sha256:" + "1" * 64, -1,
                                  **{layout.A_BLAKE3: log.hex()})  # fmt: skip
    with pytest.raises(LayoutError, match="-1 bytes"):
        layout.parse_manifest(layout.manifest("ab" * 32, b"{}", layers, "h", "s"), "ab" * 32)


def test_packs_are_checked_against_the_count_in_the_signed_config():
    def manifest(sizes: list[int]) -> layout.StepManifest:
        packs = [layout.descriptor(layout.PACK_TYPE, "sha256:" + f"{i:064x}", n)
                 for i, n in enumerate(sizes)]  # fmt: skip
        doc = layout.manifest("0" * 64, b"{}", packs, "a", "sig")
        return layout.parse_manifest(doc, "0" * 64)

    counted = layout.config_blob({}, "1", [10, 20])
    layout.check_packs(counted, manifest([10, 20]))
    for sizes in ([10, 20, 30], [10, 21], [10]):
        with pytest.raises(LayoutError, match="its signed config 2 \\(30 bytes\\)"):
            layout.check_packs(counted, manifest(sizes))
    # An older amber's config does not count them: read, within a bound.
    uncounted = layout.config_blob({}, "1")
    layout.check_packs(uncounted, manifest([10] * layout.UNCOUNTED_PACKS))
    with pytest.raises(LayoutError, match="does not count them"):
        layout.check_packs(uncounted, manifest([10] * (layout.UNCOUNTED_PACKS + 1)))
    with pytest.raises(LayoutError, match="does not count them"):
        layout.check_packs(uncounted, manifest([10]), counted=True)
