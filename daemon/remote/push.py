"""Pushing one result: blobs first (HEAD skips what the registry has), then the manifest."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OCI_MANIFEST, sha256_digest
from amber.daemon.remote import layout
from amber.daemon.remote.layout import BLOB, TREE, Obj
from amber.daemon.remote.trust import SigningKey
from amber.daemon.storage.db import Result
from amber.sandbox.digest import from_hex
from amber.sandbox.store import MissingObject, Store


def closure(store: Store, trees: list[bytes], blobs: list[bytes]) -> list[Obj]:
    """Every tree and blob reachable from ``trees``, and ``blobs``; MissingObject if one is gone."""
    seen_trees: set[bytes] = set()
    found: dict[bytes, Obj] = {}
    todo = list(trees)
    wanted_blobs = set(blobs)
    while todo:
        digest = todo.pop()
        if digest in seen_trees:
            continue
        seen_trees.add(digest)
        subtrees, refs = store.tree_refs(digest)
        found[digest + b"t"] = Obj(TREE, digest, store.tree_path(digest).stat().st_size)
        todo += subtrees
        wanted_blobs.update(refs)
    for digest in wanted_blobs:
        try:
            size = store.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise MissingObject("blob", digest) from None
        found[digest + b"b"] = Obj(BLOB, digest, size)
    return list(found.values())


def _read(store: Store, obj: Obj) -> bytes:
    if obj.kind == TREE:
        with open(store.tree_path(obj.digest), "rb") as f:
            return f.read()
    return store.read_blob(obj.digest)


def _send(client: RegistryClient, repo: str, digest: str, body: bytes | str, size: int) -> int:
    """Upload unless present; the bytes sent."""
    if client.has_blob(repo, digest):
        return 0
    client.upload(repo, digest, body if isinstance(body, bytes) else Path(body), size)
    return size


def push_result(
    store: Store, client: RegistryClient, repo: str, result: Result, key: SigningKey, version: str
) -> int:
    """Push ``result`` and its closure to ``repo``; the bytes uploaded.

    The manifest goes last: the registry refuses one whose blobs it lacks,
    and a reader that finds the tag finds the whole result.
    """
    objects = closure(store, [from_hex(result.before_tree), from_hex(result.after_tree)], [])
    sent = 0
    layers: list[dict] = []
    log = closure(store, [], [from_hex(result.log)])[0]  # a layer of its own (layout.py)
    for plan in [layout.LayerPlan([log], big=True), *layout.plan_layers(objects)]:
        if plan.big:
            obj = plan.objects[0]
            path = str(store.blob_path(obj.digest))
            digest = _sha256_file(path)
            sent += _send(client, repo, digest, path, obj.size)
            kind = layout.LOG_TYPE if obj is log else layout.BLOB_TYPE
            layers.append(layout.descriptor(kind, digest, obj.size,
                                            **{layout.A_BLAKE3: obj.digest.hex()}))  # fmt: skip
            continue
        data = layout.encode_pack((o.kind, o.digest, _read(store, o)) for o in plan.objects)
        digest = sha256_digest(data)
        sent += _send(client, repo, digest, data, len(data))
        layers.append(layout.descriptor(layout.PACK_TYPE, digest, len(data)))
    config = layout.config_blob(asdict(result), version)
    config_digest = sha256_digest(config)
    sent += _send(client, repo, config_digest, config, len(config))
    signature = key.sign(result.key, config_digest)
    doc = layout.manifest(result.key, config, layers, key.name, signature)
    client.put_manifest(repo, layout.tag_for(result.key), doc, OCI_MANIFEST)
    return sent + len(doc)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return f"sha256:{h.hexdigest()}"
