"""``docker://REGISTRY/REPO:TAG`` and ``docker://REGISTRY/REPO@sha256:...`` bases.

Pulled with the registry client image import uses (its authentication,
its verification of every document and blob, the host's platform picked
from a multi-platform index), then applied into a tree like any image.

Pulled once: a user's pull is recorded (``storage/pulled.py``) under the
digest the reference named. A reference by digest whose record's tree is
still whole in the store needs no request at all. A tag is resolved again
on every build, with one manifest GET, so a moved ``:latest`` is noticed;
when it still names the digest pulled before, nothing more is fetched.
The step keys come from the tree (the initial tree holds it), never from
the tag, so they are the same for the same image however it was named.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from amber.daemon.oci.auth import Credentials
from amber.daemon.oci.image import apply_image
from amber.daemon.oci.limits import MAX_IMPORT, Budget
from amber.daemon.oci.registry import RegistryClient, RegistrySource, registry_target
from amber.daemon.oci.source import resolve
from amber.daemon.oci.spec import OciError, Reference
from amber.daemon.storage.pulled import Pulled, find_pulled, find_tag, record_pulled
from amber.sandbox.digest import from_hex
from amber.sandbox.store import Store


@dataclass(frozen=True)
class RegistryAccess:
    """What pulling a base needs beyond the store: the user's credentials for its
    registry, and how to tell (holding it first) that a tree is whole in the store."""

    credentials: Credentials | None = None
    insecure: bool = False
    complete: Callable[[bytes], bool] | None = None


@dataclass(frozen=True)
class PullReport:
    """What resolving a ``docker://`` base did, for the build's log and ``amber show``."""

    reference: str  # REGISTRY/REPO:TAG or @DIGEST, as the spec names it
    digest: str  # what the reference resolved to (a manifest or an index)
    manifest: str  # the image manifest used (this platform's)
    pulled: bool  # False: this user's earlier pull was reused
    layers: int = 0
    size: int = 0  # bytes of layers downloaded

    @property
    def pinned(self) -> str:
        """The reference by digest, as a spec can name it to build on exactly this image."""
        target = registry_target(self.reference)
        return f"docker://{target.registry}/{target.name}@{self.digest}"

    def note(self) -> str:
        what = f"base docker://{self.reference} is {self.pinned}"
        if self.manifest != self.digest:
            what += f" (this platform's manifest {self.manifest})"
        if not self.pulled:
            return f"{what}: pulled before, nothing downloaded"
        return f"{what}: pulled {self.layers} layer(s), {self.size} bytes"


class _Prefetched(RegistrySource):
    """A registry source whose first document was already fetched (and checked)."""

    def __init__(self, client: RegistryClient, target: Reference, top: tuple[bytes, str, str]):
        super().__init__(client, target)
        self._top = top

    def top(self) -> tuple[bytes, str, str | None]:
        return self._top


def pull_base(
    store: Store,
    db_path: Path,
    ref: str,
    *,
    uid: int,
    access: RegistryAccess,
    max_size: int = MAX_IMPORT,
) -> tuple[bytes, PullReport]:
    """The root tree of the image ``ref`` names, pulled for ``uid`` unless they have it.

    Blocking (network, store writes): call from a worker thread. Raises
    ``OciError`` saying what went wrong (unknown tag, unreachable registry,
    no image for this platform, a digest that does not match). Builds of one
    user starting together on one image pull it once: the others wait for
    that pull, then find its record.
    """
    target = registry_target(ref)
    complete = access.complete or (lambda t: store.closure_check().missing([t], []) is None)

    def known(digest: str) -> tuple[bytes, PullReport] | None:
        row = find_pulled(db_path, uid, target.registry, target.name, digest)
        if row is None or not complete(from_hex(row.tree)):
            return None
        return from_hex(row.tree), PullReport(ref, digest, row.manifest, pulled=False)

    if target.digest and (found := known(target.digest)) is not None:
        return found
    client = RegistryClient(
        target.registry, insecure=access.insecure, credentials=access.credentials
    )
    try:
        top = _top(client, target, lambda: last_pulled(db_path, uid, target))
        with _pulling((uid, target.registry, target.name, top[2])):
            if (found := known(top[2])) is not None:
                return found
            return _pull(store, db_path, client, ref, target, top, uid, max_size)
    finally:
        client.close()


def _pull(store: Store, db_path: Path, client: RegistryClient, ref: str, target: Reference,
          top: tuple[bytes, str, str], uid: int, max_size: int) -> tuple[bytes, PullReport]:  # fmt: skip
    """Walk from ``top`` to this platform's image, apply it, record it for ``uid``."""
    digest = top[2]
    parts = resolve(_Prefetched(client, target, top))
    image = apply_image(store, parts, budget=Budget(max_size, store.tmp_dir))
    tree = image.trees[-1]
    manifest = parts.manifest_digest or digest
    pulled = Pulled(target.registry, target.name, digest, manifest, tree.hex(), target.tag)
    record_pulled(db_path, uid, pulled)
    size = sum(layer.size or 0 for layer in parts.layers)
    return tree, PullReport(ref, digest, manifest, True, len(parts.layers), size)


class _Guard:
    """One lock per (uid, registry, repository, digest) being pulled, gone when unused."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


_GUARDS: weakref.WeakValueDictionary[tuple, _Guard] = weakref.WeakValueDictionary()
_GUARDS_LOCK = threading.Lock()


@contextlib.contextmanager
def _pulling(key: tuple) -> Iterator[None]:
    with _GUARDS_LOCK:
        guard = _GUARDS.get(key)
        if guard is None:
            guard = _GUARDS[key] = _Guard()
    with guard.lock:
        yield


def last_pulled(db_path: Path, uid: int, target: Reference) -> str | None:
    """The reference by digest of ``uid``'s last pull of ``target``'s tag, if any."""
    digest = find_tag(db_path, uid, target.registry, target.name, target.tag or "latest")
    return f"docker://{target.registry}/{target.name}@{digest}" if digest else None


def _top(
    client: RegistryClient, target: Reference, last: Callable[[], str | None]
) -> tuple[bytes, str, str]:
    """The document the reference names (one GET), its digest checked; a 404 said
    plainly, and a tag that cannot be resolved with the digest it had (``last``)."""
    try:
        return client.get_manifest(target.name, target.reference)
    except OciError as exc:
        status = getattr(exc, "status", None)
        where = f"{target.registry}/{target.name}"
        if status == 404:
            if target.digest:
                raise OciError(f"{where} has no manifest {target.digest}") from None
            raise OciError(f"{where} has no tag {target.tag or 'latest'!r}") from None
        pinned = last() if status is None and not target.digest else None
        if pinned is None:
            raise
        raise OciError(f"{exc}; your last pull of this tag was {pinned}: "
                       "name that to build without the registry") from None  # fmt: skip
