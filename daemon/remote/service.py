"""What the daemon asks of remote caches: lookups on a local miss, pushes after a step.

Pushes go through a queue in the database, worked by ``serve_pushes`` in
the daemon's nursery, never by the build, in a child process at idle CPU
and I/O priority (``pusher.py``, ``pushproc.py``: a build always goes
first, and the loop never waits for it): a slow or failing registry only
delays the queue (retried with a growing pause, dropped after
``MAX_ATTEMPTS`` with a log line), and a restart finishes what is queued.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING

import trio

from amber.client import __version__
from amber.daemon.build.state import BuildStatus
from amber.daemon.oci.auth import credentials_for
from amber.daemon.oci.errors import RegistryRefused
from amber.daemon.oci.registry import RegistryClient
from amber.daemon.remote import lookups, pull, push, trust
from amber.daemon.remote.config import Remote
from amber.daemon.remote.credentials import load_auth_file
from amber.daemon.remote.lazy import LazyPulls
from amber.daemon.remote.pins import RemotePins
from amber.daemon.remote.pusher import Setup
from amber.daemon.remote.pushproc import PusherProcess
from amber.daemon.storage.db import RemoteRecord, Result
from amber.sandbox.digest import from_hex

if TYPE_CHECKING:
    from amber.daemon.build.build import Build
    from amber.daemon.context import DaemonContext
    from amber.daemon.storage.roots import Hold

log = logging.getLogger("amber.remote")
MAX_ATTEMPTS = 8


class RemoteCache:
    def __init__(self, ctx: DaemonContext):
        self.ctx = ctx
        self.config = ctx.config.cache
        self.signing_key: trust.SigningKey | None = None
        if self.config.signing_key is not None:
            self.signing_key = trust.load_signing_key(self.config.signing_key)
        self.credentials = load_auth_file(self.config.registry_auth_file)
        trust.warm()  # not on the first build's path
        self._wake = trio.Event()
        #: Where every queued push and pin tag runs (never amberd's loop or threads).
        key, auth = self.config.signing_key, self.config.registry_auth_file
        self.pusher = PusherProcess(Setup(str(ctx.config.state_dir), str(key) if key else None,
                                          str(auth) if auth else None, __version__))  # fmt: skip
        self.pins = RemotePins(self)
        self.lazy = LazyPulls(ctx, self.client)

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

    async def prefetch(self, build: Build, keys: list[str]) -> lookups.Prefetched:
        """Every key of ``keys`` not in the local cache asked of the remotes at once
        (``lookups.py``), for ``find`` to take instead of a round trip per step."""
        remotes = self.read_from(build)
        todo = [k for k in keys if self.ctx.db.get_result(k) is None]
        if not remotes or not todo:
            return lookups.Prefetched()
        try:
            trusted = trust.load_trusted(self.config.trusted_keys)
        except trust.TrustError:
            return lookups.Prefetched()  # each step's own lookup says why, as before
        return await lookups.prefetch(
            remotes, todo, lambda c, r, k: pull.lookup(c, r, k, trusted), self.client
        )

    async def find(
        self, build: Build, key: str, known: lookups.Prefetched | None = None
    ) -> tuple[Result, str] | None:
        """A verified remote result for ``key``, recorded with where it lives, and a note.

        Nothing of its closure is pulled here (``settle`` does what the pull
        policy asks). Each remote in order; whatever goes wrong with one is a
        note, then the next. ``known``: answers fetched before (``prefetch``),
        used instead of asking again once their signer is still trusted.
        """
        for remote in self.read_from(build):
            answer = known.take(remote.url, key) if known is not None else None
            try:
                if answer is not None:
                    found = await trio.to_thread.run_sync(  # a file read: off the loop
                        self._still_trusted, remote, key, answer.unwrap()
                    )
                else:
                    found = await trio.to_thread.run_sync(self._find_one, remote, key)
            except pull.Miss as miss:
                build.note(f"remote cache: {miss}; not a hit")
                continue
            except trust.TrustError as exc:
                build.note(f"remote cache: {exc}")
                return None
            if found is None:
                continue
            result = Result(**found.result)
            if result.status == BuildStatus.FAILED and (
                build.retry_failed or self.config.remote_failures == "retry"
            ):
                continue
            record = RemoteRecord(remote.url, found.digest, found.raw)
            self.ctx.db.put_result(result, record)
            return result, self.origin(result, record)
        return None

    def _still_trusted(
        self, remote: Remote, key: str, found: pull.Found | None
    ) -> pull.Found | None:
        """A prefetched answer, checked again against the trusted keys as they are now:
        a key removed from trusted-keys since the prefetch no longer counts."""
        if found is None:
            return None
        manifest = found.manifest
        trusted = trust.load_trusted(self.config.trusted_keys)
        why = trust.check(trusted, remote.trust, manifest.signer, manifest.signature, key,
                          manifest.config_digest)  # fmt: skip
        if why is not None:
            raise pull.Miss(f"the result on {remote.url} is refused: {why}")
        return found

    @staticmethod
    def origin(result: Result, record: RemoteRecord) -> str:
        return f"cached (remote) from host {result.host}, build {result.build_id}, via {record.url}"

    def _find_one(self, remote: Remote, key: str) -> pull.Found | None:
        client = self.client(remote)
        try:
            return pull.lookup(client, remote, key, trust.load_trusted(self.config.trusted_keys))
        finally:
            client.close()

    def client(self, remote: Remote, timeout: float = 30) -> RegistryClient:
        """A client for ``remote``'s registry, with amberd's own login for it if any
        (the one place that makes them).

        A remote named by URL alone (a pull, from its record) is the
        configured one of that URL when there is one.
        """
        remote = next((r for r in self.config.remotes if r.url == remote.url), remote)
        return RegistryClient(remote.registry, insecure=remote.insecure, timeout=timeout,
                              credentials=credentials_for(self.credentials, remote.registry))  # fmt: skip

    # -- closures (lazy.py) ----------------------------------------------------

    async def settle(self, result: Result, hold: Hold) -> str | None:
        """A recorded remote result whose closure is not (all) here: a hit, and its note.

        Pulls what the policy asks: its log if it is a failure to replay; with
        ``pull = "eager"`` its whole closure. None: no remote holds it.
        Raises ``pull.Miss`` when what must be pulled cannot be.
        """
        record = self.ctx.db.get_remote(result.key)
        if record is None:
            return None
        if self.config.pull == "eager":
            await self.ensure_local([from_hex(result.before_tree), from_hex(result.after_tree)],
                                    [from_hex(result.log)], hold=hold)  # fmt: skip
        elif result.status == BuildStatus.FAILED:
            await self.ensure_local([], [from_hex(result.log)], hold=hold)
        return self.origin(result, record)

    async def ensure_local(
        self, trees: Iterable[bytes] = (), logs: Iterable[bytes] = (), *, hold: Hold | None = None
    ) -> int:
        """Make trees and logs whole in the store, pulling from remotes (``LazyPulls.ensure_local``)."""
        return await self.lazy.ensure_local(trees, logs, hold=hold)

    # -- pushes ----------------------------------------------------------------

    def enqueue(self, build: Build, key: str) -> None:
        """Queue a result (success or failure, never errored) for the build's push remotes."""
        for url in self.write_to(build):
            self.ctx.db.queue_push(key, url)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def serve_pushes(self) -> None:
        """Push what is queued, one result at a time, then pin tags (remote/pins.py), for ever."""
        try:
            await self._serve_pushes()
        finally:
            self.pusher.close()

    async def _serve_pushes(self) -> None:
        pause = 1.0
        if any(r.push for r in self.config.remotes):  # at once, for ps, and no wait at first push
            try:
                await self.pusher.start()
            except OSError as exc:
                log.warning("cannot start the push process (will retry): %s", exc)
        while True:
            rows = self.ctx.db.pending_pushes()
            if not rows and not self.pins.pending():
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            done = 0
            for key, url, attempts in rows:
                done += await self._push_one(key, url, attempts)
            done += await self.pins.work()
            if not done:  # every one failed: the registry is down, wait
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
        job = {"op": "push", "url": url, "result": asdict(result),
               "mount_from": push.siblings(self.config.remotes, url)}  # fmt: skip
        try:
            sent = await self.pusher.run(job)
        except RegistryRefused as exc:  # read-only, or not ours to write: never retried
            log.warning("push of %s to %s refused, not retried: %s", key, url, exc)
            db.push_done(key, url)
            return True
        except Exception as exc:  # any other end is a failed attempt: never the daemon's end
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
