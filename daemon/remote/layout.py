"""How a step result lies in a registry (pure: no I/O, unit-tested).

One OCI manifest per result, tagged ``step-<key>`` (a BLAKE3 hex key is 64
characters; the tag grammar allows 128), ``artifactType``
``application/vnd.amber.step.v1``. Its config blob is the result's metadata
(JSON: status, exit code, before/after trees and log by BLAKE3, host, build
id, time, amber version). Its layers carry the closure of the before and
after trees, and the log:

- *packs*: many trees and small blobs in one registry blob (a 13,000-file
  tree is a handful of uploads, not 13,000). Objects are sorted by BLAKE3
  digest and cut after an object whose digest starts with a rare pattern,
  so two closures that differ by one file share all packs but one or two
  (content-defined: the cuts do not move when an object is added).
- big files: a registry blob of their own, so they dedupe across results.
- the log: a layer of its own, so a host that replays a cached failure
  fetches it alone, without the trees (a lazy pull, ``remote/lazy.py``).

BLAKE3 is amber's identity inside (every object in a pack carries its
digest; a big blob's descriptor names it in an annotation), sha256 only how
the registry addresses blobs. A puller checks both. The manifest stays far
under the registry's 4 MiB: descriptors only for packs and big files.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from amber.daemon.build.state import BuildStatus
from amber.daemon.oci.spec import OCI_MANIFEST, canonical_json, check_digest, sha256_digest
from amber.sandbox.digest import DIGEST_SIZE, HEX_SIZE, hash_bytes

ARTIFACT_TYPE = "application/vnd.amber.step.v1"
CONFIG_TYPE = "application/vnd.amber.step.config.v1+json"
PACK_TYPE = "application/vnd.amber.pack.v1"
BLOB_TYPE = "application/vnd.amber.blob.v1"
LOG_TYPE = "application/vnd.amber.log.v1"
A_KEY = "org.amber.key"
A_SIGNER = "org.amber.signer"
A_SIGNATURE = "org.amber.signature"
A_BLAKE3 = "org.amber.blake3"
TAG_PREFIX = "step-"
FORMAT = 1

#: Files at least this large are blobs of their own.
BIG = 1 << 20
#: A pack is cut when it reaches this size, whatever the digests say.
PACK_MAX = 16 << 20
#: The largest pack a puller reads into memory: a pack passes PACK_MAX by at
#: most one small object and the headers (layers are not signed: bound them).
PACK_LIMIT = PACK_MAX + BIG + (1 << 20)
#: The most packs (and bytes of them) read from a result whose config does not count them.
UNCOUNTED_PACKS = 4096
UNCOUNTED_PACK_BYTES = 8 << 30
#: A pack is cut after an object whose digest's first two bytes are 0 modulo
#: this: about one object in 512, so a pack holds a few hundred small files.
_CUT = 512
_MAGIC = b"AMBERPK1"
_HEAD = struct.Struct(">BQ")  # kind, size; then the digest
TREE, BLOB = 1, 2


class LayoutError(ValueError):
    """A manifest, config or pack that is not what amber pushes."""


def tag_for(key: str) -> str:
    """The tag naming a step key's result: ``step-`` and the 64 hex digits."""
    if len(key) != HEX_SIZE or any(c not in "0123456789abcdef" for c in key):
        raise LayoutError(f"not a step key: {key!r}")
    return TAG_PREFIX + key


@dataclass(frozen=True)
class Obj:
    """One object of a closure: a tree or a blob, by BLAKE3 digest."""

    kind: int
    digest: bytes
    size: int


@dataclass
class LayerPlan:
    """One layer to push: a pack of objects, or one big blob."""

    objects: list[Obj] = field(default_factory=list)
    big: bool = False

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)


def plan_layers(objects: Iterable[Obj]) -> list[LayerPlan]:
    """Split a closure into layers (see the module notes); deterministic."""
    plans: list[LayerPlan] = []
    pack = LayerPlan()
    for obj in sorted(set(objects), key=lambda o: (o.digest, o.kind)):
        if obj.kind == BLOB and obj.size >= BIG:
            plans.append(LayerPlan([obj], big=True))
            continue
        pack.objects.append(obj)
        cut = int.from_bytes(obj.digest[:2], "big") % _CUT == 0
        if cut or pack.size >= PACK_MAX:
            plans.append(pack)
            pack = LayerPlan()
    if pack.objects:
        plans.append(pack)
    return plans


def encode_pack(items: Iterable[tuple[int, bytes, bytes]]) -> bytes:
    """``(kind, digest, data)`` objects as one pack blob."""
    out = [_MAGIC]
    for kind, digest, data in items:
        out += [_HEAD.pack(kind, len(data)), digest, data]
    return b"".join(out)


def decode_pack(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """The objects of a pack, each checked against its BLAKE3 digest."""
    reader = PackReader()
    yield from reader.feed(data)
    reader.finish()


class PackReader:
    """A pack read as it arrives: ``feed`` it chunks, it yields whole objects.

    Each object is checked against its BLAKE3 digest before it is yielded,
    so a puller writes it out while the rest downloads and holds at most one
    object and one chunk in memory, never the whole pack. ``need`` is how
    many bytes the object being read still lacks (read at least that much
    next: a large object then costs one copy, not one per chunk).
    """

    def __init__(self) -> None:
        self._rest = b""
        self._magic = False
        self.need = len(_MAGIC)

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes, bytes]]:
        data = self._rest + chunk if self._rest else chunk
        at = 0
        if not self._magic:
            if len(data) < len(_MAGIC):
                self._rest, self.need = data, len(_MAGIC) - len(data)
                return
            if not data.startswith(_MAGIC):
                raise LayoutError("not an amber pack")
            self._magic, at = True, len(_MAGIC)
        view = memoryview(data)
        head = _HEAD.size + DIGEST_SIZE
        while True:
            if len(data) - at < head:
                self.need = head - (len(data) - at)
                break
            kind, size = _HEAD.unpack_from(data, at)
            if kind not in (TREE, BLOB):
                raise LayoutError("pack object of no known kind")
            end = at + head + size
            if end > len(data):
                self.need = end - len(data)
                break
            digest = data[at + _HEAD.size : at + head]
            body = view[at + head : end]
            if hash_bytes(body) != digest:
                raise LayoutError(
                    f"pack object {digest.hex()[:12]} does not match its BLAKE3 digest"
                )
            yield kind, digest, body.tobytes() if kind == TREE else body
            at = end
        self._rest = data[at:]

    def finish(self) -> None:
        """The pack ended: refuse one cut inside an object (or before its magic)."""
        if self._rest or not self._magic:
            raise LayoutError("pack ends inside an object" if self._magic else "not an amber pack")


def config_blob(
    result: dict[str, Any], amber_version: str, pack_sizes: list[int] | None = None
) -> bytes:
    """The config blob: the result's metadata, canonical JSON; with ``pack_sizes``, how many
    packs the manifest has and their bytes (``check_packs``: the config is what is signed)."""
    doc: dict[str, Any] = {"format": FORMAT, "amber": amber_version, "result": result}
    if pack_sizes is not None:
        doc["packs"] = {"count": len(pack_sizes), "bytes": sum(pack_sizes)}
    return canonical_json(doc)


def check_packs(untrusted_config: bytes, manifest: StepManifest, *, counted: bool = False) -> None:
    """Refuse a manifest whose packs are not the ones its (signed) config counts.

    Layers are not signed: whoever can write the repository could add
    thousands of self-consistent junk packs to a signed manifest, which a
    pull would download and store. A config from before it counted packs
    (an older amber's) bounds them instead; ``counted``: refuses it.
    """
    packs = manifest.packs
    have = (len(packs), sum(p.size for p in packs))
    try:
        signed = json.loads(untrusted_config).get("packs")
        want = None if signed is None else (int(signed["count"]), int(signed["bytes"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LayoutError(f"malformed config: {exc}") from None
    if want is None and (counted or have[0] > UNCOUNTED_PACKS or have[1] > UNCOUNTED_PACK_BYTES):
        raise LayoutError(f"its manifest has {have[0]} packs ({have[1]} bytes) and its config "
                          "does not count them: more than amber reads uncounted")  # fmt: skip
    if want is not None and want != have:
        raise LayoutError(f"its manifest has {have[0]} packs ({have[1]} bytes), its signed "
                          f"config {want[0]} ({want[1]} bytes)")  # fmt: skip


def descriptor(media_type: str, data_digest: str, size: int, **annotations: str) -> dict:
    desc: dict[str, Any] = {"mediaType": media_type, "digest": data_digest, "size": size}
    if annotations:
        desc["annotations"] = dict(annotations)
    return desc


def manifest(key: str, config: bytes, layers: list[dict], signer: str, signature: str) -> bytes:
    """The result's manifest; its config is also inside, as the descriptor's ``data`` (OCI
    1.1's embedded content), so that a lookup is one request, not two."""
    config_descriptor = descriptor(CONFIG_TYPE, sha256_digest(config), len(config))
    config_descriptor["data"] = base64.b64encode(config).decode()
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config_descriptor,
        "layers": layers,
        "annotations": {A_KEY: key, A_SIGNER: signer, A_SIGNATURE: signature},
    }
    return canonical_json(doc)


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # sha256, as the registry names it
    size: int
    blake3: bytes | None  # a big blob's BLAKE3 (packs carry their own)


@dataclass(frozen=True)
class StepManifest:
    key: str
    config_digest: str
    config_size: int
    layers: tuple[Layer, ...]
    signer: str | None
    signature: str | None
    #: The config's bytes as the manifest embeds them (not yet checked against its digest).
    config_data: bytes | None = None

    @property
    def packs(self) -> list[Layer]:
        return [la for la in self.layers if la.media_type == PACK_TYPE]

    @property
    def big_blobs(self) -> list[Layer]:
        """Layers holding one blob each: big files and the log."""
        return [la for la in self.layers if la.blake3 is not None]

    def log_layer(self, log: bytes) -> Layer | None:
        """The layer that holds the log ``log`` (its BLAKE3), if there is one."""
        return next((la for la in self.layers if la.media_type == LOG_TYPE and la.blake3 == log),
                    None)  # fmt: skip


def parse_manifest(untrusted: bytes, key: str) -> StepManifest:
    """A manifest read from a registry, checked for shape (not yet for trust)."""
    try:
        doc = json.loads(untrusted)
        if doc.get("artifactType") != ARTIFACT_TYPE:
            raise LayoutError("not an amber step result (artifactType)")
        notes = doc.get("annotations") or {}
        if notes.get(A_KEY) != key:
            raise LayoutError("its annotation names another step key")
        config = doc["config"]
        if config.get("mediaType") != CONFIG_TYPE:
            raise LayoutError("its config is not an amber step config")
        layers = tuple(_layer(d) for d in doc.get("layers") or [])
        data = config.get("data")
        embedded = None if data is None else base64.b64decode(data, validate=True)
        return StepManifest(key, check_digest(config["digest"]), int(config["size"]), layers,
                            notes.get(A_SIGNER), notes.get(A_SIGNATURE), embedded)  # fmt: skip
    except LayoutError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LayoutError(f"malformed manifest: {exc}") from None


def _layer(d: dict) -> Layer:
    media_type = d["mediaType"]
    if media_type not in (PACK_TYPE, BLOB_TYPE, LOG_TYPE):
        raise LayoutError(f"a layer of unknown type {media_type!r}")
    blake = None
    if int(d["size"]) < 0:
        raise LayoutError(f"a layer of {d['size']} bytes")
    if media_type == PACK_TYPE and not 0 < int(d["size"]) <= PACK_LIMIT:
        raise LayoutError(f"a pack of {d['size']} bytes (amber's are at most {PACK_LIMIT})")
    if media_type in (BLOB_TYPE, LOG_TYPE):
        text = (d.get("annotations") or {}).get(A_BLAKE3, "")
        if len(text) != HEX_SIZE:
            raise LayoutError("a blob or log layer without its BLAKE3 digest")
        blake = bytes.fromhex(text)
    return Layer(media_type, check_digest(d["digest"]), int(d["size"]), blake)


RESULT_FIELDS = {"key": str, "status": str, "exit_code": (int, type(None)), "signal": (int, type(None)),
                 "before_tree": str, "after_tree": str, "log": str, "started": (int, float),
                 "seconds": (int, float), "host": str, "build_id": str, "step": str}  # fmt: skip


def parse_config(untrusted: bytes, key: str) -> dict[str, Any]:
    """The result a config blob describes, every field checked."""
    try:
        doc = json.loads(untrusted)
        result = doc["result"]
        if doc.get("format") != FORMAT or not isinstance(result, dict):
            raise LayoutError(f"config format {doc.get('format')!r} is not {FORMAT}")
    except (ValueError, KeyError, TypeError) as exc:
        raise LayoutError(f"malformed config: {exc}") from None
    for name, kind in RESULT_FIELDS.items():
        if not isinstance(result.get(name), kind) or isinstance(result.get(name), bool):
            raise LayoutError(f"config field {name!r} is missing or of the wrong type")
    if result["key"] != key or result["status"] not in (BuildStatus.SUCCESS, BuildStatus.FAILED):
        raise LayoutError("config names another key, or a status that is not a result")
    for name in ("before_tree", "after_tree", "log"):
        if len(result[name]) != HEX_SIZE:
            raise LayoutError(f"config field {name!r} is not a digest")
        bytes.fromhex(result[name])
    return {n: result[n] for n in RESULT_FIELDS}
