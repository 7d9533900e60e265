"""Pins across hosts: a pinned result is tagged in the remotes this host writes.

A registry's garbage collector keeps what a tag references and nothing
else, and a ``step-KEY`` tag may be re-pointed (another host pushing the
same key) or pruned by an operator. So ``amber build --pin NAME`` (and
``amber pin add NAME BUILD``) also tags each step result of the pin in
every remote this host pushes to (``push = true``, or ``--cache-to``):
the same manifest bytes PUT again under ``pin-USER.NAME.N`` (N: the
result's place in the build, 0 first). Only the manifest is read and
written, never the closure, so a remote hit is pinned there without being
downloaded. A manifest is tagged only if the result it describes is the
one pinned here (same states and log): a ``step-KEY`` re-pointed to some
other host's result of the key is not what the user pinned.

Tags are scoped by the pin owner's user name (``pin-bob.release.0``):
hosts sharing a remote rarely agree on uids, but a fleet's accounts agree
on names (LDAP, or the same provisioning), so bob's pin ``release`` is the
same tags from every host, and user mal, who cannot write ``pin-bob.*``
through amber on any host, cannot move or remove it. A user name that is
not ``[a-z0-9_][a-z0-9_-]*`` (so that the first ``.`` ends it) is written
``uidN``. Pin names going to a remote must be tag characters
(``[A-Za-z0-9_][A-Za-z0-9._-]*``) and fit the 128-character tag.
Whoever holds the registry credential can write any tag: the scoping
keeps amber's users apart, registry permissions keep hosts apart.

Removing a pin (``amber pin rm``, or moving it to a build with fewer
results) must remove the tags it made but not the manifest: a distribution
2.8 registry has no tag deletion (``DELETE .../manifests/DIGEST`` drops
the manifest under every tag, the ``step-KEY`` one included). So the tag is
re-pointed to a tombstone, an empty amber artifact (no layers, the empty
config): the step tag keeps its manifest, and once no tag references the
pinned manifest the registry's GC collects it. A tag found pointing at
another manifest than the one this host tagged (moved from another host)
is left alone.

The work is queued in the database (``remote_pins``) and done by the push
worker after the pushes of the same keys, so a pin made by the build that
ran the steps is tagged once they are pushed, and a restart finishes it.
"""

from __future__ import annotations

import json
import logging
import pwd
import re
from dataclasses import asdict
from typing import TYPE_CHECKING

from amber.daemon.errors import BadArgs
from amber.daemon.oci.errors import RegistryRefused
from amber.daemon.oci.spec import (
    MAX_DOCUMENT,
    OCI_MANIFEST,
    OciError,
    sha256_digest,
)
from amber.daemon.remote import layout, pull
from amber.daemon.remote.layout import LayoutError
from amber.daemon.storage.db import Result

if TYPE_CHECKING:
    from amber.daemon.oci.registry import RegistryClient
    from amber.daemon.remote.service import RemoteCache

log = logging.getLogger("amber.remote")

PIN_PREFIX = "pin-"
TOMBSTONE_TYPE = "application/vnd.amber.pin-removed.v1"
EMPTY_CONFIG = b"{}"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
MAX_TAG = 128
MAX_ATTEMPTS = 8
_PIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_USER = re.compile(r"[a-z0-9_][a-z0-9_-]*")


def pin_user(uid: int) -> str:
    """The owner part of a remote pin tag: the user's name here, or ``uidN``."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"
    return name if _USER.fullmatch(name) else f"uid{uid}"


def pin_tag(uid: int, name: str, index: int) -> str:
    """``pin-USER.NAME.INDEX``; ``BadArgs`` if NAME cannot be (part of) a registry tag."""
    tag = f"{PIN_PREFIX}{pin_user(uid)}.{name}.{index}"
    if not _PIN_NAME.fullmatch(name) or len(tag) > MAX_TAG:
        raise BadArgs(
            f"pin {name!r} would be tagged in a remote cache as {tag[: MAX_TAG + 8]!r}: a pin "
            "name going to a remote is letters, digits, '_', '.' and '-' (not first), and "
            f"short enough for a {MAX_TAG}-character tag"
        )
    return tag


def tombstone() -> bytes:
    """The manifest a removed pin's tag is re-pointed to: an empty amber artifact."""
    config = {"mediaType": EMPTY_TYPE, "digest": sha256_digest(EMPTY_CONFIG), "size": 2}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": TOMBSTONE_TYPE,
           "config": config, "layers": []}  # fmt: skip
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# -- talking to the registry (in a worker thread) ----------------------------------------


def tag_result(client: RegistryClient, repo: str, result: Result, tag: str) -> str:
    """Tag the manifest of ``step-KEY`` as ``tag`` if it is ``result``; its digest.

    Raises ``LookupError`` if the remote has no (or another) result for the key.
    """
    answer = client.request("GET", f"/v2/{repo}/manifests/{layout.tag_for(result.key)}",
                            headers={"Accept": OCI_MANIFEST})  # fmt: skip
    if answer.status == 404:
        raise LookupError("the remote has no result for it (never pushed there?)")
    if answer.status in (401, 403):
        raise RegistryRefused(f"reading its manifest: HTTP {answer.status}")
    if answer.status != 200:
        raise OciError(f"reading its manifest: HTTP {answer.status}")
    body = answer.body
    manifest = layout.parse_manifest(body, result.key)
    found = layout.parse_config(
        pull._blob(client, repo, manifest.config_digest, MAX_DOCUMENT), result.key
    )
    ours = (result.before_tree, result.after_tree, result.log)
    if (found["before_tree"], found["after_tree"], found["log"]) != ours:
        raise LookupError(f"its step tag holds another result of the key (from {found['host']})")
    return client.put_manifest(repo, tag, body, OCI_MANIFEST)


def untag(client: RegistryClient, repo: str, tag: str, digest: str | None) -> str:
    """Re-point ``tag`` at the tombstone unless it now names another manifest; what happened."""
    answer = client.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    if answer.status == 404:
        return "already gone"
    now = answer.headers.get("Docker-Content-Digest")
    if digest is not None and now is not None and now != digest:
        return f"left alone: it now names {now} (moved from another host?)"
    config_digest = sha256_digest(EMPTY_CONFIG)
    if not client.has_blob(repo, config_digest):
        client.upload(repo, config_digest, EMPTY_CONFIG, len(EMPTY_CONFIG))
    client.put_manifest(repo, tag, tombstone(), OCI_MANIFEST)
    return "re-pointed to the tombstone"


# -- the queue -----------------------------------------------------------------------------


class RemotePins:
    """The ``remote_pins`` rows of a daemon, and the work they ask for."""

    def __init__(self, cache: RemoteCache):
        self.cache = cache
        self.db = cache.ctx.db

    def urls_for(self, *, no_remote: bool = False, cache_to: str | None = None) -> list[str]:
        """Where a pin is tagged: the remotes this host (or the build) pushes to."""
        if no_remote:
            return []
        if cache_to:
            return [cache_to]
        return [r.url for r in self.cache.config.remotes if r.push]

    def check_name(self, name: str, uid: int, *, no_remote: bool = False,
                   cache_to: str | None = None, **_: object) -> None:  # fmt: skip
        """Refuse, before anything is built or recorded, a name no remote tag can carry."""
        if self.urls_for(no_remote=no_remote, cache_to=cache_to):
            pin_tag(uid, name, 0)

    def pin(self, name: str, uid: int, keys: list[str], urls: list[str]) -> None:
        """Tag ``keys`` (in build order) as pin ``name`` of ``uid`` in ``urls``; untag the rest."""
        wanted = {(url, pin_tag(uid, name, i)): key for url in urls for i, key in enumerate(keys)}
        for row in self.db.remote_pins(name):
            if (row["url"], row["tag"]) not in wanted:
                self.db.set_remote_pin_state(row["url"], row["tag"], "untag")
        for (url, tag), key in wanted.items():
            self.db.put_remote_pin(name, url, tag, key)
        self.cache.wake()

    def unpin(self, name: str) -> None:
        for row in self.db.remote_pins(name):
            self.db.set_remote_pin_state(row["url"], row["tag"], "untag")
        self.cache.wake()

    def where(self, name: str) -> list[dict]:
        """For ``pin ls``: each remote a pin is (being) tagged in, with its tags and state."""
        by_url: dict[str, dict] = {}
        for row in self.db.remote_pins(name):
            if row["state"] == "untag":
                continue
            entry = by_url.setdefault(row["url"], {"url": row["url"], "tags": [], "states": []})
            entry["tags"].append(row["tag"])
            entry["states"].append(row["state"] + (f": {row['note']}" if row["note"] else ""))
        return list(by_url.values())

    def pending(self) -> list[dict]:
        return [r for r in self.db.remote_pins(None) if r["state"] in ("tag", "untag")]

    async def work(self) -> int:
        """Do the queued tagging and untagging; how many rows were settled."""
        settled = 0
        for row in self.pending():
            if row["state"] == "tag" and self.db.push_pending(row["key"], row["url"]):
                continue  # its result is not in the remote yet
            settled += await self._one(row)
        return settled

    async def _one(self, row: dict) -> int:
        result = self.db.get_result(row["key"]) if row["state"] == "tag" else None
        try:
            said = await self.cache.pusher.run({
                "op": "pin", "result": asdict(result) if result is not None else None,
                "row": {k: row[k] for k in ("url", "state", "tag", "digest")},
            })  # fmt: skip
            outcome = "done"
        except (LookupError, LayoutError, pull.Miss, RegistryRefused) as exc:
            outcome, said = "gave up", str(exc)
        except Exception as exc:  # OciError, OSError, or anything else: a failed attempt
            retry = row["attempts"] + 1 < MAX_ATTEMPTS
            outcome, said = ("retry", str(exc)) if retry else ("gave up", f"gave up: {exc}")
        if not self._unchanged(row):
            return 1  # moved or removed while we talked to the registry: next round
        return self._settle(row, outcome, said)

    def _unchanged(self, row: dict) -> bool:
        now = [
            r
            for r in self.db.remote_pins(row["name"])
            if (r["url"], r["tag"]) == (row["url"], row["tag"])
        ]
        return bool(now) and (now[0]["state"], now[0]["key"]) == (row["state"], row["key"])

    def _settle(self, row: dict, outcome: str, said: str) -> int:
        """Record what became of ``row``; 1 if it is settled, 0 if it waits for a retry."""
        url, tag = row["url"], row["tag"]
        if outcome == "retry":
            log.info("pin tag %s in %s failed (will retry): %s", tag, url, said)
            self.db.remote_pin_failed(url, tag, said)
            return 0
        if outcome == "gave up":
            log.warning("pin tag %s in %s: %s", tag, url, said)
        if row["state"] == "untag":
            if outcome == "done":
                log.info("pin tag %s in %s: %s", tag, url, said)
            self.db.delete_remote_pin(url, tag)
        elif outcome == "done":
            log.info("tagged %s in %s as %s", row["key"], url, tag)
            self.db.set_remote_pin_state(url, tag, "tagged", digest=said)
        else:
            self.db.set_remote_pin_state(url, tag, "failed", note=said)
        return 1
