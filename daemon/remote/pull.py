"""Finding a result in a registry and bringing its closure into the store.

Every failure here is a ``Miss`` with a reason: a remote that is down, a
manifest unsigned or signed by no trusted key, a blob that does not arrive
or does not match its sha256 or BLAKE3 digest. The caller reruns the step
and notes why; nothing unverified is ever written to the store.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import MAX_DOCUMENT, OCI_MANIFEST, OciError, sha256_digest
from amber.daemon.remote import layout, trust
from amber.daemon.remote.config import Remote
from amber.daemon.remote.layout import TREE, LayoutError, StepManifest
from amber.sandbox import tree as treefmt
from amber.sandbox.digest import new_hasher
from amber.sandbox.fileio import write_all
from amber.sandbox.store import Batch, Store, StoreError


class Miss(Exception):
    """Not a usable hit, and why (for the build's log)."""


def lookup(
    client: RegistryClient, remote: Remote, key: str, trusted: dict[str, Ed25519PublicKey]
) -> tuple[dict, StepManifest] | None:
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
        config = _blob(client, remote.repository, manifest.config_digest, MAX_DOCUMENT)
        return layout.parse_config(config, key), manifest
    except (OciError, LayoutError) as exc:
        raise Miss(f"{remote.url}: {exc}") from None


def _blob(client: RegistryClient, repo: str, digest: str, limit: int) -> bytes:
    """A blob read whole (at most ``limit`` bytes) and checked against its sha256."""
    with client.stream(f"/v2/{repo}/blobs/{digest}") as body:
        data = body.read(limit + 1)
    if len(data) > limit:
        raise Miss(f"blob {digest} is larger than announced")
    if sha256_digest(data) != digest:
        raise Miss(f"blob {digest} does not match its sha256 digest")
    return data


def pull_layers(
    store: Store, client: RegistryClient, remote: Remote, manifest: StepManifest
) -> int:
    """Bring every layer's objects into the store (what it has is skipped); bytes read.

    One batch: nothing becomes visible unless every layer arrived and verified.
    """
    read = 0
    try:
        with store.batch() as batch:
            for layer in manifest.layers:
                if layer.blake3 is not None:
                    if not store.has_blob(layer.blake3):
                        read += _big_blob(store, batch, client, remote.repository, layer)
                    continue
                data = _blob(client, remote.repository, layer.digest, layer.size)
                read += len(data)
                for kind, digest, body in layout.decode_pack(data):
                    if kind == TREE:
                        got = store.put_tree(treefmt.decode(body), batch)
                    else:
                        got = store.put_blob_bytes(body, batch)
                    if got != digest:
                        raise Miss(f"object {digest.hex()[:12]} does not re-encode to its digest")
    except (OciError, LayoutError, treefmt.TreeFormatError) as exc:
        raise Miss(f"{remote.url}: {exc}") from None
    except StoreError as exc:
        raise Miss(f"cannot store what {remote.url} sent: {exc}") from None
    return read


def _big_blob(
    store: Store, batch: Batch, client: RegistryClient, repo: str, layer: layout.Layer
) -> int:
    """One big file, streamed to a temporary file, both digests checked before it is kept."""
    fd, temp = batch.new_temp()
    sha, blake, size = hashlib.sha256(), new_hasher(layer.size), 0
    try:
        with client.stream(f"/v2/{repo}/blobs/{layer.digest}") as body:
            while chunk := body.read(1 << 20):
                size += len(chunk)
                if size > layer.size:
                    raise Miss(f"blob {layer.digest} is larger than announced")
                sha.update(chunk)
                blake.update(chunk)
                write_all(fd, chunk)
    except BaseException:
        os.close(fd)
        batch.discard(temp)
        raise
    os.close(fd)
    if f"sha256:{sha.hexdigest()}" != layer.digest or blake.digest() != layer.blake3:
        batch.discard(temp)
        raise Miss(f"blob {layer.digest} does not match its sha256 or BLAKE3 digest")
    batch.adopt_blob(temp, layer.blake3, size)
    return size
