"""Finding a result in a registry, and bringing one layer of it into the store.

Every failure here is a ``Miss`` with a reason: a remote that is down, a
manifest unsigned or signed by no trusted key, a blob that does not arrive
(whole) or does not match its sha256 or BLAKE3 digest. The caller reruns
the step and notes why; nothing unverified is ever written to the store.
Each layer is its own batch: what arrived and verified stays (a later pull
skips it), a layer cut off midway leaves nothing; ``lazy.py`` commits the
batches of one pull together. Which layers to fetch,
and in parallel, is ``lazy.py``'s business.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import MAX_DOCUMENT, OCI_MANIFEST, OciError, sha256_digest
from amber.daemon.remote import layout, trust
from amber.daemon.remote.config import Remote
from amber.daemon.remote.layout import TREE, Layer, LayoutError, StepManifest
from amber.sandbox import tree as treefmt
from amber.sandbox.batch import Batch
from amber.sandbox.digest import CHUNK, new_hasher
from amber.sandbox.fileio import write_all
from amber.sandbox.store import Store, StoreError
from amber.sandbox.tree import Entry

_REDIRECTS = (301, 302, 303, 307, 308)
#: A tree a pack brought: its entries (decoded to check it) and its bytes.
Arrival = tuple[list[Entry], bytes]


class Miss(Exception):
    """Not a usable hit, and why (for the build's log)."""


@dataclass(frozen=True)
class Found:
    """A trusted result in a remote: its metadata, and the manifest as the registry sent it."""

    result: dict
    manifest: StepManifest
    raw: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)


def lookup(
    client: RegistryClient, remote: Remote, key: str, trusted: dict[str, Ed25519PublicKey]
) -> Found | None:
    """The trusted result ``remote`` has for ``key`` (None: it has none); ``Miss`` if unusable."""
    try:
        answer = client.request("GET", f"/v2/{remote.repository}/manifests/{layout.tag_for(key)}",
                                headers={"Accept": OCI_MANIFEST})  # fmt: skip
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise Miss(f"{remote.url} answered HTTP {answer.status}")
        manifest = layout.parse_manifest(answer.body, key)
        why = trust.check(trusted, remote.trust, manifest.signer, manifest.signature, key,
                          manifest.config_digest)  # fmt: skip
        if why is not None:
            raise Miss(f"the result on {remote.url} is refused: {why}")
        config = _config(client, remote.repository, manifest)
        found = Found(layout.parse_config(config, key), manifest, answer.body)
        layout.check_packs(config, manifest)
        return found
    except (OciError, LayoutError) as exc:
        raise Miss(f"{remote.url}: {exc}") from None


def _config(client: RegistryClient, repo: str, manifest: StepManifest) -> bytes:
    """The result's config: the one the manifest embeds (no second request), else its blob;
    checked against the digest the signature covers either way."""
    data = manifest.config_data
    if data is None:
        return document(client, repo, manifest.config_digest)
    if sha256_digest(data) != manifest.config_digest:
        raise Miss(f"the config the manifest embeds does not match {manifest.config_digest}")
    return data


def document(client: RegistryClient, repo: str, digest: str) -> bytes:
    """A small blob (a config) on the client's kept-alive connection, checked against its
    sha256; one the registry redirects (to object storage) is streamed from there."""
    answer = client.request("GET", f"/v2/{repo}/blobs/{digest}")
    if answer.status in _REDIRECTS:
        return _blob(client, repo, digest, MAX_DOCUMENT)
    if answer.status != 200:
        raise Miss(f"blob {digest} did not arrive: HTTP {answer.status}")
    if sha256_digest(answer.body) != digest:
        raise Miss(f"blob {digest} does not match its sha256 digest")
    return answer.body


def _blob(client: RegistryClient, repo: str, digest: str, limit: int, exact: bool = False) -> bytes:
    """A blob read whole (at most ``limit`` bytes; ``exact``: just that) and checked against its sha256."""
    try:
        with client.stream(f"/v2/{repo}/blobs/{digest}") as body:
            data = body.read(limit + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise Miss(f"blob {digest} did not arrive: {exc}") from None
    if len(data) > limit:
        raise Miss(f"blob {digest} is larger than announced")
    if exact and len(data) < limit:
        raise Miss(f"blob {digest} ended after {len(data)} of {limit} bytes")
    if sha256_digest(data) != digest:
        raise Miss(f"blob {digest} does not match its sha256 digest")
    return data


def fetch_layer(
    store: Store, client: RegistryClient, remote: Remote, layer: Layer, stop: threading.Event,
    batch: Batch | None = None, trees: dict[bytes, Arrival] | None = None,
) -> int:  # fmt: skip
    """One layer's objects into the store; the bytes read.

    A pack's objects, or one blob (a big file, a log), written out as they
    arrive (checked against their BLAKE3 digests first) into ``batch``: the
    caller's, who commits it (``lazy.py``: a pull's layers together) or
    aborts it when this raises; else one of its own, committed here. The
    layer's sha256 is checked once it has all arrived: the batch is never
    committed before. ``stop`` set: give up between chunks (another layer of
    the same pull failed). ``trees``: gets each tree a pack brought.
    """
    if batch is None:
        with store.batch() as own:
            return fetch_layer(store, client, remote, layer, stop, own, trees)
    try:
        if layer.blake3 is not None:
            return _big_blob(store, client, remote.repository, layer, stop, batch)
        return _pack(store, client, remote.repository, layer, stop, batch,
                     {} if trees is None else trees)  # fmt: skip
    except (OciError, LayoutError, treefmt.TreeFormatError) as exc:
        raise Miss(f"{remote.url}: {exc}") from None
    except StoreError as exc:
        raise Miss(f"cannot store what {remote.url} sent: {exc}") from None


def _arriving(
    client: RegistryClient, repo: str, layer: Layer, stop: threading.Event,
    want: Callable[[], int] = lambda: 0,
) -> Iterator[bytes]:  # fmt: skip
    """The layer's bytes as they arrive, never more than its size; at the end a ``Miss``
    unless they are all there and match its sha256. ``want``: bytes the reader needs next."""
    sha, size = hashlib.sha256(), 0
    try:
        with client.stream(f"/v2/{repo}/blobs/{layer.digest}") as body:
            while chunk := body.read(min(max(want(), CHUNK), layer.size - size + 1)):
                size += len(chunk)
                if size > layer.size:
                    raise Miss(f"blob {layer.digest} is larger than announced")
                if stop.is_set():
                    raise Miss("given up: another layer failed")
                sha.update(chunk)
                yield chunk
    except (OSError, http.client.HTTPException) as exc:
        raise Miss(f"blob {layer.digest} did not arrive whole: {exc}") from None
    if size != layer.size:
        raise Miss(f"blob {layer.digest} ended after {size} of {layer.size} bytes")
    if f"sha256:{sha.hexdigest()}" != layer.digest:
        raise Miss(f"blob {layer.digest} does not match its sha256 digest")


def _pack(
    store: Store, client: RegistryClient, repo: str, layer: Layer, stop: threading.Event,
    batch: Batch, trees: dict[bytes, Arrival],
) -> int:  # fmt: skip
    """A pack's objects, each written as soon as it has arrived and matched its BLAKE3."""
    reader = layout.PackReader()
    for chunk in _arriving(client, repo, layer, stop, lambda: reader.need):
        for kind, digest, body in reader.feed(chunk):
            if kind == TREE:
                entries = treefmt.decode(body)
                if store.put_tree(entries, batch) != digest:
                    raise Miss(f"object {digest.hex()[:12]} does not re-encode to its digest")
                trees[digest] = (entries, body)
            else:
                store.put_blob_hashed(digest, body, batch)
    reader.finish()
    return layer.size


def _big_blob(
    store: Store, client: RegistryClient, repo: str, layer: Layer, stop: threading.Event,
    batch: Batch,
) -> int:  # fmt: skip
    """One big file, streamed to a temporary file, both digests checked before it is kept."""
    assert layer.blake3 is not None
    fd, temp = batch.new_temp()
    blake = new_hasher(layer.size)
    try:
        for chunk in _arriving(client, repo, layer, stop):
            blake.update(chunk)
            write_all(fd, chunk)
    except BaseException:
        os.close(fd)
        batch.discard(temp)
        raise
    os.close(fd)
    if blake.digest() != layer.blake3:
        batch.discard(temp)
        raise Miss(f"blob {layer.digest} does not match its BLAKE3 digest")
    batch.adopt_blob(temp, layer.blake3, layer.size)
    return layer.size
