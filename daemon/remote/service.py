"""What the daemon asks of remote caches: lookups on a local miss, pushes after a step.

Pushes go through a queue in the database, worked by ``serve_pushes`` in
the daemon's nursery, never by the build: a slow or failing registry only
delays the queue (retried with a growing pause, dropped after
``MAX_ATTEMPTS`` with a log line), and a restart finishes what is queued.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from amber.client import __version__
from amber.daemon.build.state import BuildStatus
from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OciError
from amber.daemon.remote import pull, push, trust
from amber.daemon.remote.config import Remote
from amber.daemon.storage.db import Result
from amber.sandbox.digest import from_hex
from amber.sandbox.store import StoreError

if TYPE_CHECKING:
    from amber.daemon.build.build import Build
    from amber.daemon.context import DaemonContext
    from amber.sandbox.store import Store

log = logging.getLogger("amber.remote")
MAX_ATTEMPTS = 8


class RemoteCache:
    def __init__(self, ctx: DaemonContext):
        self.ctx = ctx
        self.config = ctx.config.cache
        self.signing_key: trust.SigningKey | None = None
        if self.config.signing_key is not None:
            self.signing_key = trust.load_signing_key(self.config.signing_key)
        self._wake = trio.Event()

    # -- which remotes ---------------------------------------------------------

    def read_from(self, build: Build) -> list[Remote]:
        if build.no_remote:
            return []
        if build.cache_from:
            known = {r.url: r for r in self.config.remotes}
            return [known.get(build.cache_from, Remote(build.cache_from))]
        return list(self.config.remotes)

    def write_to(self, build: Build) -> list[str]:
        if build.no_remote or self.signing_key is None:
            return []
        if build.cache_to:
            return [build.cache_to]
        return [r.url for r in self.config.remotes if r.push]

    # -- lookups ---------------------------------------------------------------

    async def find(self, build: Build, key: str, store: Store) -> tuple[Result, str] | None:
        """A verified remote result for ``key``, its closure now in ``store``, and a note.

        Each remote in order; whatever goes wrong with one is a note, then the next.
        """
        for remote in self.read_from(build):
            try:
                found = await trio.to_thread.run_sync(
                    self._find_one, remote, key, store, build.retry_failed
                )
            except pull.Miss as miss:
                build.note(f"remote cache: {miss}; not a hit")
                continue
            except trust.TrustError as exc:
                build.note(f"remote cache: {exc}")
                return None
            if found is not None:
                result = Result(**found)
                self.ctx.db.put_result(result)
                return (
                    result,
                    f"cached (remote) from host {result.host}, build {result.build_id}, via {remote.url}",
                )
        return None

    def _find_one(self, remote: Remote, key: str, store: Store, retry_failed: bool) -> dict | None:
        client = RegistryClient(remote.registry, insecure=remote.insecure, timeout=30)
        try:
            found = pull.lookup(client, remote, key, trust.load_trusted(self.config.trusted_keys))
            if found is None:
                return None
            result, manifest = found
            if result["status"] == BuildStatus.FAILED and (
                retry_failed or self.config.remote_failures == "retry"
            ):
                return None
            pull.pull_layers(store, client, remote, manifest)
            missing = store.closure_check().missing(
                [from_hex(result["before_tree"]), from_hex(result["after_tree"])],
                [from_hex(result["log"])],
            )
            if missing:
                raise pull.Miss(f"the result on {remote.url} is incomplete ({missing})")
            return result
        finally:
            client.close()

    # -- pushes ----------------------------------------------------------------

    def enqueue(self, build: Build, key: str) -> None:
        """Queue a result (success or failure, never errored) for the build's push remotes."""
        for url in self.write_to(build):
            self.ctx.db.queue_push(key, url)
        self._wake.set()

    async def serve_pushes(self) -> None:
        """Push what is queued, one result at a time, for ever."""
        pause = 1.0
        while True:
            rows = self.ctx.db.pending_pushes()
            if not rows:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            failures = 0
            for key, url, attempts in rows:
                if not await self._push_one(key, url, attempts):
                    failures += 1
            if failures == len(rows):  # every one failed: the registry is down, wait
                await trio.sleep(pause)
                pause = min(pause * 2, 300.0)
            else:
                pause = 1.0

    async def _push_one(self, key: str, url: str, attempts: int) -> bool:
        db = self.ctx.db
        result = db.get_result(key)
        if result is None or self.signing_key is None:
            db.push_done(key, url)  # collected meanwhile: nothing to push
            return True
        remote = Remote(url, push=True)
        try:
            sent = await trio.to_thread.run_sync(self._push_sync, remote, result)
        except (OciError, StoreError, OSError) as exc:
            if attempts + 1 >= MAX_ATTEMPTS:
                log.warning(
                    "push of %s to %s given up after %d attempts: %s", key, url, attempts + 1, exc
                )
                db.push_done(key, url)
            else:
                log.info("push of %s to %s failed (will retry): %s", key, url, exc)
                db.push_failed(key, url)
            return False
        log.info("pushed %s to %s (%d bytes)", key, url, sent)
        db.push_done(key, url)
        return True

    def _push_sync(self, remote: Remote, result: Result) -> int:
        assert self.signing_key is not None
        client = RegistryClient(remote.registry, insecure=remote.insecure, timeout=60)
        try:
            return push.push_result(
                self.ctx.store, client, remote.repository, result, self.signing_key, __version__,
                mount_from=push.siblings(self.config.remotes, remote.url),
            )  # fmt: skip
        finally:
            client.close()
