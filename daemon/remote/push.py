"""Pushing one result: blobs first (HEAD skips what the registry has), then the manifest."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OCI_MANIFEST, sha256_digest
from amber.daemon.remote import layout, pull
from amber.daemon.remote.config import Remote
from amber.daemon.remote.layout import BLOB, TREE, Obj
from amber.daemon.remote.trust import SigningKey
from amber.daemon.storage.db import Result
from amber.sandbox.digest import from_hex
from amber.sandbox.store import MissingObject, Store


def closure(
    store: Store, trees: list[bytes], blobs: list[bytes], seen: set[bytes] | None = None
) -> list[Obj]:
    """Every tree and blob reachable from ``trees``, and ``blobs``; MissingObject if one is gone.

    ``seen``: digests (trees and blobs) already taken, left out and added to.
    """
    seen = set() if seen is None else seen
    found: list[Obj] = []
    todo = list(trees)
    wanted_blobs = set(blobs)
    while todo:
        digest = todo.pop()
        if digest + b"t" in seen:
            continue
        seen.add(digest + b"t")
        subtrees, refs = store.tree_refs(digest)
        found.append(Obj(TREE, digest, store.tree_path(digest).stat().st_size))
        todo += subtrees
        wanted_blobs.update(refs)
    for digest in wanted_blobs:
        if digest + b"b" in seen:
            continue
        seen.add(digest + b"b")
        try:
            size = store.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise MissingObject("blob", digest) from None
        found.append(Obj(BLOB, digest, size))
    return found


def plan(store: Store, result: Result) -> list[layout.LayerPlan]:
    """The before-tree's closure, packed alone, then what the step added, packed apart.

    Results with the same before-tree (the same steps up to here) share the
    first part whole, so a result differing by one file uploads that file,
    the trees above it, its log and metadata: not the packs it falls into.
    """
    seen: set[bytes] = set()
    log = closure(store, [], [from_hex(result.log)])  # a layer of its own (layout.py)
    before = closure(store, [from_hex(result.before_tree)], [], seen)
    added = closure(store, [from_hex(result.after_tree)], [], seen)
    return [
        layout.LayerPlan(log, big=True),
        *layout.plan_layers(before),
        *layout.plan_layers(added),
    ]


def _read(store: Store, obj: Obj) -> bytes:
    if obj.kind == TREE:
        with open(store.tree_path(obj.digest), "rb") as f:
            return f.read()
    return store.read_blob(obj.digest)


@dataclass
class PushStats:
    """What pushes did, blob by blob: what a user reads in ``amber push``'s summary."""

    bytes_uploaded: int = 0
    blobs_uploaded: int = 0
    blobs_present: int = 0  # the repository had them (HEAD)
    blobs_mounted: int = 0  # a sibling repository lent them (?mount=)


def siblings(remotes: list[Remote], url: str) -> list[str]:
    """Repositories on ``url``'s registry that may lend it blobs: the other configured remotes."""
    target = Remote(url)
    return [r.repository for r in remotes
            if r.registry == target.registry and r.repository != target.repository]  # fmt: skip


class _Sender:
    """Blobs to one repository: skipped if there, mounted from a sibling if it has them."""

    def __init__(self, client: RegistryClient, repo: str, mount_from: list[str], stats: PushStats):
        self.client, self.repo, self.mount_from, self.stats = client, repo, mount_from, stats

    def send(self, digest: str, body: bytes | str, size: int) -> None:
        if self.client.has_blob(self.repo, digest):
            self.stats.blobs_present += 1
            return
        data = body if isinstance(body, bytes) else Path(body)
        if self.client.upload(self.repo, digest, data, size, mount_from=self.mount_from):
            self.stats.blobs_mounted += 1
            return
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += size


def push_result(
    store: Store,
    client: RegistryClient,
    repo: str,
    result: Result,
    key: SigningKey,
    version: str,
    *,
    mount_from: list[str] | None = None,
    stats: PushStats | None = None,
) -> int:
    """Push ``result`` and its closure to ``repo``; the bytes uploaded (manifest included).

    The manifest goes last: the registry refuses one whose blobs it lacks,
    and a reader that finds the tag finds the whole result. Two hosts
    pushing one key at once each put a whole, signed manifest: the tag ends
    on one of them, valid either way.
    """
    stats = stats if stats is not None else PushStats()
    before = stats.bytes_uploaded
    sender = _Sender(client, repo, mount_from or [], stats)
    layers: list[dict] = []
    pack_sizes: list[int] = []
    for i, part in enumerate(plan(store, result)):
        if part.big:
            obj = part.objects[0]
            path = str(store.blob_path(obj.digest))
            digest = _sha256_file(path)
            sender.send(digest, path, obj.size)
            kind = layout.LOG_TYPE if i == 0 else layout.BLOB_TYPE  # plan() puts the log first
            layers.append(layout.descriptor(kind, digest, obj.size,
                                            **{layout.A_BLAKE3: obj.digest.hex()}))  # fmt: skip
            continue
        data = layout.encode_pack((o.kind, o.digest, _read(store, o)) for o in part.objects)
        digest = sha256_digest(data)
        sender.send(digest, data, len(data))
        layers.append(layout.descriptor(layout.PACK_TYPE, digest, len(data)))
        pack_sizes.append(len(data))
    config = layout.config_blob(asdict(result), version, pack_sizes)
    config_digest = sha256_digest(config)
    sender.send(config_digest, config, len(config))
    signature = key.sign(result.key, config_digest)
    doc = layout.manifest(result.key, config, layers, key.name, signature)
    client.put_manifest(repo, layout.tag_for(result.key), doc, OCI_MANIFEST)
    stats.bytes_uploaded += len(doc)
    return stats.bytes_uploaded - before


def already_there(
    client: RegistryClient, repo: str, result: Result, key: SigningKey, version: str
) -> bool:
    """Whether ``repo`` holds this very result, signed by ``key``: a push would change nothing.

    Another host's result for the key, one signed otherwise, or one whose
    config does not count its packs (an older amber's: ``check_packs``) is not it.
    """
    answer = client.request("GET", f"/v2/{repo}/manifests/{layout.tag_for(result.key)}",
                            headers={"Accept": OCI_MANIFEST})  # fmt: skip
    if answer.status != 200:
        return False
    try:
        found = layout.parse_manifest(answer.body, result.key)
        if not key.verifies(result.key, found.config_digest, found.signer, found.signature):
            return False
        config = pull.document(client, repo, found.config_digest)
        layout.check_packs(config, found, counted=True)
        theirs = layout.parse_config(config, result.key)
    except (layout.LayoutError, pull.Miss):
        return False
    ours = asdict(result)
    return theirs == {name: ours[name] for name in theirs}


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return f"sha256:{h.hexdigest()}"
