"""Bringing a remote result's closure into the store only when something needs it.

A remote hit records the result and where it lives (the ``remote_results``
table: remote, manifest) after fetching nothing but the manifest and the
config (and, for a failure to replay, its log: a layer of its own). The
trees come later, through ``ensure_local``, which every consumer calls: a
step about to run on top of a remote result (its after-tree only), a shell,
diff, export or out-link of a remote-only state, ``amber log`` of a remote
step. With ``pull = "eager"`` a hit calls it at once, as before.

A pull is resumable: a tree whose closure is in the store costs no request,
packs a pull applied before are skipped (``remote_packs``, emptied by GC),
and big blobs are fetched only when the tree needs them and the store lacks
them (a big blob cut off midway starts again). Layers are fetched
``LAYERS_AT_ONCE`` at a time, each on a worker thread of its own, each
written as it arrives into a batch of its own (``pull.fetch_layer``); the
layers that arrived are committed together (``_Arrived``). Whatever fails
is a ``pull.Miss`` with a reason: for a build, the step whose result could not be fetched reruns
(``executor.py``); for a shell or export, the user reads why.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OciError
from amber.daemon.remote import layout, pull
from amber.daemon.remote.config import Remote
from amber.daemon.remote.layout import Layer, LayoutError, StepManifest
from amber.daemon.remote.pull import Miss
from amber.daemon.remote.reach import Reach
from amber.daemon.storage.db import RemoteRecord
from amber.sandbox.batch import Batch, commit_all
from amber.sandbox.fileio import start_syncfs
from amber.sandbox.store import StoreError

if TYPE_CHECKING:
    from amber.daemon.context import DaemonContext
    from amber.daemon.storage.roots import Hold
    from amber.sandbox.closure import ClosureCheck
    from amber.sandbox.store import Store

#: Layers of one pull fetched at once.
LAYERS_AT_ONCE = 4
#: Layers that arrived are committed before the pull ends past this many objects or bytes:
#: a pull of millions of objects holds their batches (names, pending trees) that long only.
FLUSH_OBJECTS = 200_000
FLUSH_BYTES = 4 << 30
#: A log may pass step-log-max by the line saying it was truncated.
LOG_SLACK = 64 << 10


class LazyPulls:
    """The daemon's one way to make a remote result's trees or log local."""

    def __init__(self, ctx: DaemonContext, client: Callable[[Remote], RegistryClient]):
        self.ctx = ctx
        self.client_for = client

    async def ensure_local(
        self, trees: Iterable[bytes] = (), logs: Iterable[bytes] = (), *, hold: Hold | None = None
    ) -> int:
        """Make each tree's closure and each log whole in the store; the bytes pulled.

        Pulls from the remote results that hold them, under ``hold`` (a
        writer: a build's) or a writer of its own. Raises ``Miss`` with the
        reason when one cannot be made whole.
        """
        trees, logs = list(dict.fromkeys(trees)), list(dict.fromkeys(logs))
        if hold is None:
            with self.ctx.roots.writer("remote pull") as own:
                return await self._ensure(own, trees, logs)
        return await self._ensure(hold, trees, logs)

    async def _ensure(self, hold: Hold, trees: list[bytes], logs: list[bytes]) -> int:
        await trio.to_thread.run_sync(hold.add, trees, logs)  # held before it is checked
        check = self.ctx.store.closure_check(record=self.ctx.complete)
        pulled = 0
        for tree in trees:
            if await trio.to_thread.run_sync(check.missing, [tree], []) is not None:
                pulled += await self._from_sources(hold, check, tree=tree)
        for log in logs:
            if not await trio.to_thread.run_sync(self.ctx.store.has_blob, log):
                pulled += await self._from_sources(hold, check, log=log)
        return pulled

    async def _from_sources(
        self, hold: Hold, check: ClosureCheck, *, tree: bytes | None = None,
        log: bytes | None = None,
    ) -> int:  # fmt: skip
        """Pull from the first remote result recorded as holding ``tree`` (or ``log``) that can."""
        what = f"tree {tree.hex()[:12]}" if tree is not None else f"log {log.hex()[:12]}"  # type: ignore[union-attr]
        sources = self.ctx.db.remote_sources(tree=tree.hex() if tree else None,
                                             log=log.hex() if log else None)  # fmt: skip
        if not sources:
            raise Miss(f"{what} is not complete in the store, and no remote cache holds it")
        reasons = []
        for result, record in sources:
            try:
                manifest = layout.parse_manifest(record.manifest, result.key)
                if tree is not None:
                    return await self._pull_tree(hold, check, record, manifest, tree)
                assert log is not None
                return await self._pull_log(hold, record, manifest, log)
            except LayoutError as exc:
                reasons.append(f"{record.url}: {exc}")
            except Miss as exc:
                reasons.append(str(exc))
        raise Miss("; ".join(reasons))

    async def _pull_log(self, hold: Hold, record: RemoteRecord, manifest: StepManifest,
                        log: bytes) -> int:  # fmt: skip
        layer = manifest.log_layer(log)
        if layer is None:
            raise Miss(f"the result on {record.url} has no layer for its log")
        if layer.size > self.ctx.config.step_log_max + LOG_SLACK:
            raise Miss(
                f"the log on {record.url} is {layer.size} bytes, more than step-log-max here"
            )
        return await self._fetch(hold.store, Remote(record.url), [layer])

    async def _pull_tree(
        self, hold: Hold, check: ClosureCheck, record: RemoteRecord, manifest: StepManifest,
        tree: bytes, *, skip_applied: bool = True,
    ) -> int:  # fmt: skip
        """Packs (less those applied before), then the big blobs the tree lacks (``reach.py``),
        committed together; then a check."""
        db, remote = self.ctx.db, Remote(record.url)
        applied = db.applied_packs() if skip_applied else set()
        packs = [p for p in manifest.packs if p.digest not in applied]
        bigs = {la.blake3: la for la in manifest.big_blobs if la.media_type != layout.LOG_TYPE}
        reach = Reach(hold.store, tree, bigs)  # type: ignore[arg-type]
        read = await self._fetch(hold.store, remote, packs, on_done=db.pack_applied, reach=reach)
        missing = await trio.to_thread.run_sync(check.missing, [tree], [])
        if missing is None:
            return read
        if skip_applied and len(packs) < len(manifest.packs):
            # A pack applied before lost objects since (removed behind amber's back): again, whole.
            db.forget_applied_packs()
            return read + await self._pull_tree(hold, check, record, manifest, tree,
                                                skip_applied=False)  # fmt: skip
        raise Miss(f"the result on {record.url} does not hold the whole tree ({missing})")

    async def _fetch(
        self, store: Store, remote: Remote, layers: list[Layer],
        on_done: Callable[[str], None] | None = None, reach: Reach | None = None,
    ) -> int:  # fmt: skip
        """Fetch ``layers``, then the big files ``reach`` found the trees they brought need.

        ``LAYERS_AT_ONCE`` at a time, the first failure stops the rest. Each
        layer arrives into a batch of its own (one that fails leaves nothing); those that arrived are
        committed together at the end, even when another failed or the pull
        is cancelled, so a later pull skips them (``on_done``, for each of
        ``layers`` committed): two syncfs a pull, not two a layer.
        """
        arrived = _Arrived(store.tmp_dir)
        failures: list[Miss] = []
        try:
            await self._fetch_into(store, remote, layers, arrived, failures, reach)
            if reach is not None and not failures:
                more = await trio.to_thread.run_sync(reach.rest)
                await self._fetch_into(store, remote, more, arrived, failures)
        finally:
            with trio.CancelScope(shield=True):
                done, read = await trio.to_thread.run_sync(arrived.commit, remote.url, failures)
            for layer in done if on_done is not None else ():
                if layer in layers:
                    on_done(layer.digest)  # type: ignore[misc]
        if failures:
            raise failures[0]
        return read

    async def _fetch_into(
        self, store: Store, remote: Remote, layers: list[Layer], arrived: _Arrived,
        failures: list[Miss], reach: Reach | None = None,
    ) -> None:  # fmt: skip
        """Fetch ``layers`` into ``arrived``, each on a worker thread (the trees they bring
        walked by ``reach``); failures noted."""
        if not layers:
            return
        limiter = trio.CapacityLimiter(LAYERS_AT_ONCE)
        stop = threading.Event()
        clients: queue.SimpleQueue[RegistryClient] = queue.SimpleQueue()

        def one_sync(layer: Layer) -> None:
            try:
                client = clients.get_nowait()
            except queue.Empty:
                client = self.client_for(remote)
            batch, trees = store.batch(), {}
            try:
                read = pull.fetch_layer(store, client, remote, layer, stop, batch, trees)
                if reach is not None:
                    reach.arrived(trees)
            except BaseException:
                batch.abort()
                raise
            finally:
                clients.put(client)
            arrived.add(layer, batch, read)

        async def one(layer: Layer) -> None:
            if stop.is_set():
                return
            try:
                await trio.to_thread.run_sync(one_sync, layer, limiter=limiter,
                                              abandon_on_cancel=True)  # fmt: skip
            except (Miss, OciError, StoreError, OSError) as exc:
                failures.append(exc if isinstance(exc, Miss) else Miss(f"{remote.url}: {exc}"))
                stop.set()

        try:
            async with trio.open_nursery() as nursery:
                for layer in layers:
                    nursery.start_soon(one, layer)
        finally:
            stop.set()  # cancelled: abandoned threads stop at their next chunk
            while not clients.empty():
                clients.get_nowait().close()


class _Arrived:
    """The layers of one fetch that arrived whole, in batches waiting to be committed together.

    Each arrival starts a flush of the filesystem in the background (one at
    a time), so the disk writes what arrived while the rest downloads and the
    commit's syncfs has little left to wait for. Past ``FLUSH_OBJECTS`` or
    ``FLUSH_BYTES`` what arrived is committed at once (two more syncfs), so a
    huge pull does not hold every batch until it ends. A thread abandoned by a
    cancelled pull may finish its layer after the commit: its batch is
    aborted then (nothing of it left in ``tmp/``).
    """

    def __init__(self, tmp_dir: str) -> None:
        self._tmp_dir = tmp_dir
        self._lock = threading.Lock()
        self._batches: list[tuple[Layer, Batch, int]] | None = []
        self._flush: threading.Thread | None = None
        self._done: list[Layer] = []  # committed already (past FLUSH_OBJECTS or FLUSH_BYTES)
        self._read = 0

    def add(self, layer: Layer, batch: Batch, read: int) -> None:
        with self._lock:
            if self._batches is not None:
                self._batches.append((layer, batch, read))
                if (sum(b.written for _, b, _ in self._batches) > FLUSH_OBJECTS
                        or sum(b.bytes_written for _, b, _ in self._batches) > FLUSH_BYTES):  # fmt: skip
                    self._commit_now()
                elif self._flush is None or not self._flush.is_alive():
                    with contextlib.suppress(OSError):  # only a head start for the commit's
                        self._flush = start_syncfs(self._tmp_dir)
                return
        batch.abort()

    def _commit_now(self) -> None:
        """Commit the batches that arrived so far (a ``StoreError`` or ``OSError``: aborted)."""
        batches, self._batches = self._batches or [], []
        try:
            commit_all([batch for _, batch, _ in batches])
        except BaseException:
            for _, batch, _ in batches:
                batch.abort()
            raise
        self._done += [layer for layer, _, _ in batches]
        self._read += sum(read for _, _, read in batches)

    def commit(self, url: str, failures: list[Miss]) -> tuple[list[Layer], int]:
        """Commit every batch that arrived; the layers and the bytes read (a failure noted)."""
        with self._lock:
            try:
                self._commit_now()
            except (StoreError, OSError) as exc:
                failures.insert(0, Miss(f"cannot store what {url} sent: {exc}"))
            self._batches = None
            return self._done, self._read
