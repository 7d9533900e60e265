"""Running one build: keys, cache, sandboxed steps, snapshots, results.

For each step, in order: compute its key from the previous key; a cached
result counts only when everything its after-tree needs is in the store,
or a remote cache holds it (a lazy hit: its trees are pulled when a step
runs on them; when that pull fails, the step that made them reruns); else
the step reruns and the log says why. A cached success moves the
build's state to that result's after-tree without running anything; a
cached failure freezes the build at once (unless ``--retry-failed``). A miss
runs the step in a sandbox over the build's overlay mount, which is opened
lazily on the current state, so a fully cached rebuild never mounts at all.
After a step the mount is snapshotted: that tree is the step's after-tree
and the next step's before-tree.

``success`` and ``failed`` (non-zero exit, or a signal the build raised) are
cached; a step that was cancelled, timed out, cut off by a daemon stop,
stopped by the OOM killer or failed on a full state directory is
``errored`` and never cached.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from contextlib import suppress

import trio

from amber.daemon.build.bases import ResolvedBase, resolve_base
from amber.daemon.build.beside import deferring, run_beside
from amber.daemon.build.build import Build
from amber.daemon.build.fetch import DigestMismatch, FetchLimits, fetch_sources
from amber.daemon.build.keys import initial_key, step_key
from amber.daemon.build.limits import Limits, StepLimits
from amber.daemon.build.logs import BlobLog
from amber.daemon.build.phases import Phases
from amber.daemon.build.registry_base import RegistryAccess
from amber.daemon.build.sources import lay_out
from amber.daemon.build.state import BuildState, BuildStatus, StepStatus
from amber.daemon.build.stepio import StepLog, StepOutcome, run_sandboxed
from amber.daemon.build.unresult import not_a_result
from amber.daemon.context import DaemonContext
from amber.daemon.errors import DaemonError
from amber.daemon.remote.lookups import Prefetched
from amber.daemon.remote.pull import Miss
from amber.daemon.storage.db import Result
from amber.daemon.storage.roots import build_state
from amber.daemon.userthreads import run_as_user
from amber.sandbox.batch import Batch
from amber.sandbox.digest import from_hex
from amber.sandbox.fscontrol import FilesystemError, OverlayMount
from amber.sandbox.sandboxerror import SandboxError
from amber.sandbox.store import StoreError
from amber.sandbox.userns import IdMap, IdPoolExhausted

log = logging.getLogger("amber.build")
HOST = socket.gethostname()


class BuildErrored(Exception):
    """The build stopped for a reason outside the build (not cached)."""


class StateUnavailable(Exception):
    """A step's before-tree is not whole in the store and could not be pulled (why)."""


class Executor:
    def __init__(self, ctx: DaemonContext, build: Build, limits: Limits | None = None):
        self.ctx = ctx
        self.build = build
        self.spec = build.spec
        self.mount: OverlayMount | None = None
        self._mount_cm = None
        self.mount_tree: bytes | None = None
        #: The tree the mount was opened on: every snapshot is it plus the upper.
        self.mount_lower: bytes | None = None
        self.base: ResolvedBase | None = None
        # Remembers the trees found complete during this build (all held),
        # and asks the daemon's record before walking one (complete.py).
        self.presence = ctx.store.closure_check(record=ctx.complete)
        self.state = BuildState(ctx.db, build)
        self.limits = limits
        #: This build's own host id range, from its first mount until it ends.
        self.ids: IdMap | None = None
        #: The remotes' answers for this build's keys, asked at once before the first step;
        #: forgotten when a step runs (a later key may be pushed meanwhile: asked again then).
        self._lookups: Prefetched | None = None
        #: Step index -> where its remote hit came from (the step's note).
        self._remote_notes: dict[int, str] = {}
        #: Keys whose cached result this build will not use: its closure could not be pulled.
        self._refused: set[str] = set()
        #: After-trees of hits whose closure is (maybe) at a remote only: pulled before use.
        self._lazy_trees: set[bytes] = set()
        #: Where the build's time went outside its steps (``amber show --json``).
        self.phases = Phases()
        #: The mount's timings until a step that ran on it records them.
        self._mount_timings: dict[str, float] | None = None
        #: A step (index, mount, result, after-tree) whose snapshot still commits in the
        #: background: recorded at ``_settle``.
        self._unsettled: tuple[int, OverlayMount, Result, bytes] | None = None

    # -- the whole build ----------------------------------------------------

    async def run(self) -> None:
        b = self.build
        db = self.ctx.db
        self.state.start()
        # A writer hold from here to the end: GC keeps what this build holds
        # and quarantines, rather than deletes, what it might reuse unheld.
        self.hold = self.ctx.roots.writer(f"build {b.id}", build_id=b.id)
        self.phases.add("queued", time.time() - b.created)
        try:
            try:
                await self._run_steps()
            finally:
                with trio.CancelScope(shield=True), self.phases.timed("unmount"):
                    # A later step errored: the step before it is still cached.
                    with suppress(FilesystemError):
                        await self._settle()
                    await self._close_mount()
                if self.ids is not None:  # its processes and mount are gone
                    self.ctx.id_pool.release(self.ids)
        except BuildErrored as exc:
            self._errored(str(exc))
        except trio.Cancelled:
            self._errored("cancelled" if b.cancelled else "the daemon is stopping")
            raise
        except DaemonError as exc:
            self._errored(exc.message)
        except (FilesystemError, StoreError, SandboxError, OSError) as exc:
            log.exception("build %s: infrastructure failure", b.id)
            self._errored(f"infrastructure failure: {exc}")
        finally:
            if BuildStatus(b.status).live:
                # Cancellation may arrive wrapped in an exception group (trio's
                # strict groups), so name the reason by what is true, not by
                # the exception's shape.
                if b.cancelled:
                    self._errored("cancelled")
                elif self.ctx.stopping:
                    self._errored("the daemon is stopping")
                else:
                    self._errored("internal error")
            try:
                with trio.CancelScope(shield=True):
                    # A last checkpoint before anything reads what the build
                    # recorded (an export), so that it is whole and outlives
                    # the hold through a GC cycle running now (see roots.py).
                    await trio.to_thread.run_sync(self.hold.checkpoint, *build_state(db, b.id))
                if b.frozen and b.export_on_failure:
                    try:
                        await self.ctx.on_frozen(b)
                    except Exception as exc:  # an export problem never changes the build's result
                        log.exception("build %s: export on failure", b.id)
                        self.build.note(f"export on failure did not complete: {exc}")
                if b.pin and b.status != BuildStatus.SUCCESS:
                    why = f"the build {b.status}; `amber pin add {b.pin} {b.id}` pins it anyway"
                    b.note(f"not pinned as {b.pin}: {why}")
            finally:
                self.hold.release()
            log.debug("build %s phases: %s", b.id, self.phases.describe())
            self.state.finish(self.phases.to_json())

    def _errored(self, reason: str) -> None:
        self.state.errored(reason)

    async def _run_steps(self) -> None:
        b, spec, db = self.build, self.spec, self.ctx.db
        with self.phases.timed("resolve_base"):
            self.base = await self._resolve_base()
        # Held for the build: a kept lower of the base may serve its mounts (sharedlower.py).
        await trio.to_thread.run_sync(self.hold.add, [self.base.tree])
        if self.base.pulled is not None:
            b.note(self.base.pulled.note())
            db.update_build(b.id, base_digest=self.base.pulled.digest)
        with self.phases.timed("sources"):
            laid = await self._lay_out()
        if laid is None:
            return  # a source failed verification: the build failed before any step
        tree, batch = laid
        key = initial_key(base_key=self.base.key, initial_tree=tree.hex(), workdir=spec.workdir,
                          salt=spec.key_salt)  # fmt: skip
        keys = []
        for step in spec.steps:
            key = step_key(key, step.definition(), spec.step_env(step), spec.key_salt)
            keys.append(key)
        # The initial tree becomes durable (two syncfs) while the remotes are asked.
        await run_beside(lambda: self._commit(batch), lambda: self._prefetch(keys))
        db.update_build(b.id, base_tree=tree.hex(), base_owner=self.base.owner)
        final = await self._steps(keys, tree)
        if final is not None:
            with self.phases.timed("finish"):
                self.state.succeeded(final)
                await self.ctx.on_success(b, final)

    async def _commit(self, batch: Batch) -> None:
        try:
            with self.phases.timed("sources.commit"):
                await trio.to_thread.run_sync(batch.commit)
        except BaseException:
            batch.abort()
            raise

    async def _prefetch(self, keys: list[str]) -> None:
        if self.ctx.remote is not None:  # every key at once, not a round trip per step
            with self.phases.timed("remote_lookup"):
                self._lookups = await self.ctx.remote.prefetch(self.build, keys)

    async def _steps(self, keys: list[str], tree: bytes) -> bytes | None:
        """Each step from the first: a hit or a run; the final tree (None: it failed).

        ``states[i]`` is step i's before-tree. A step that would run on a
        state that cannot be made local (a remote result whose pull failed)
        sends the build back to the step that made that state, which reruns
        with its cache hit refused, and so on back (``_walk_back``).
        """
        b, db = self.build, self.ctx.db
        states: list[bytes] = [tree]
        index = 0
        while index < len(keys):
            key = keys[index]
            del states[index + 1 :]
            db.update_step(b.id, index, key=key)
            with self.phases.timed("cache"):
                hit = None if key in self._refused else await self._cached(index, key)
            if hit is not None:  # settled by ``_cached``: the step before is recorded
                if hit.status == BuildStatus.FAILED:
                    await self._replay_failure(index, hit)
                    return None
                note = self._remote_notes.pop(index, None)
                states.append(from_hex(hit.after_tree))
                self.state.step_done(index, StepStatus.CACHED, hit, from_hex(hit.before_tree),
                                     states[-1], note)  # fmt: skip
                index += 1
                continue
            try:
                after, failed = await self._run_step(index, key, states[index])
            except StateUnavailable as exc:
                index = self._walk_back(index, keys, str(exc))
                continue
            if failed:
                return None
            states.append(after)
            index += 1
        await self._settle()
        return states[-1]

    def _walk_back(self, index: int, keys: list[str], why: str) -> int:
        """Step ``index`` cannot start: its before-tree, made by the step before, is not
        local and cannot be pulled. That step reruns (its hit refused); returns its index."""
        if index == 0:
            raise BuildErrored(
                f"the initial state of the build is not complete in the store: {why}"
            )
        name = self.spec.steps[index - 1].name
        self._refused.add(keys[index - 1])
        self.build.note(
            f"step {name}: its cached result could not be fetched ({why}); rerunning it"
        )
        return index - 1

    def _held_complete(self, tree: bytes) -> bool:
        """Whether ``tree`` is whole in the store, held first (a pulled base's record)."""
        self.hold.add([tree])
        return self.presence.missing([tree], []) is None

    async def _resolve_base(self) -> ResolvedBase:
        b, spec = self.build, self.spec
        return await run_as_user(  # an oci:/dir: base is read by the user's helper
            b.uid,
            functools.partial(
                resolve_base,
                self.hold.store,
                self.ctx.db,
                str(spec.base),
                uid=b.uid,
                gid=b.gid,
                groups=b.groups,
                import_max_size=self.ctx.config.import_max_size,
                registry=RegistryAccess(b.credentials, complete=self._held_complete),
            ),
        )

    async def _lay_out(self) -> tuple[bytes, Batch] | None:
        """The first step's tree: base, sources (fetched if need be), stamps put right;
        and the batch holding what it wrote, for ``_commit``.

        What the stamp rules removed goes to the build's notes, kept for
        ``amber log``. A source whose digest does not match is the spec's
        fault, not the machine's: the build *fails* (not frozen, nothing
        cached, every step skipped) and None is returned. A source nobody
        could serve raises ``SourceError``: the build errors.
        """
        assert self.base is not None
        b, ctx = self.build, self.ctx
        gid = ctx.peer_gid(b)
        batch = self.hold.store.batch()
        try:
            limits = FetchLimits.of(ctx.config)
            fetched = await fetch_sources(self.hold.store, ctx.db, self.spec, mirrors=ctx.config.mirrors,
                                          uid=b.uid, gid=gid, groups=b.groups, note=self.build.note,
                                          limits=limits)  # fmt: skip
            layout = await run_as_user(  # local sources are read by the user's helper
                b.uid, functools.partial(lay_out, self.hold.store, self.base.tree, self.spec, fetched, uid=b.uid, gid=gid,
                                  groups=b.groups, max_size=limits.max_size, batch=batch)
            )  # fmt: skip
        except BaseException as exc:
            batch.abort()
            if not isinstance(exc, DigestMismatch):
                raise
            self.build.note(exc.message)
            self.state.failed(exc.message, "not run: a source failed verification")
            return None
        for finding in layout.findings:
            self.build.note(finding.note())
        return layout.tree, batch

    # -- cache ----------------------------------------------------------------

    async def _cached(self, index: int, key: str) -> Result | None:
        result = self.ctx.db.get_result(key)
        # A step boundary: checkpoint what the build relies on so far (see
        # roots.py) before anything is checked or used.
        state = build_state(self.ctx.db, self.build.id)
        if result is None:
            await trio.to_thread.run_sync(self.hold.checkpoint, *state)
            result = await self._remote_hit(index, key)
            if result is None:
                return None
        name = self.spec.steps[index].name
        if result.status == BuildStatus.FAILED and self.build.retry_failed:
            await trio.to_thread.run_sync(self.hold.checkpoint, *state)
            self.build.note(f"step {name}: rerunning a cached failure (--retry-failed)")
            return None
        # The step before may still be committing objects this result needs:
        # its commit ends before they are looked for (a miss has no result).
        await self._settle()
        missing = await trio.to_thread.run_sync(self._missing, result, state)
        if missing and not await self._lazy_hit(index, result):
            self.build.note(
                f"step {name}: cached result of build {result.build_id} is incomplete in the store ({missing}); rerunning"
            )
            return None
        return result

    async def _remote_hit(self, index: int, key: str) -> Result | None:
        """After a local miss: a remote result, recorded with where it lives (or None)."""
        if self.ctx.remote is None:
            return None
        found = await self.ctx.remote.find(self.build, key, self._lookups)
        if found is None:
            return None
        result, self._remote_notes[index] = found
        return result

    async def _lazy_hit(self, index: int, result: Result) -> bool:
        """A result not whole here is still a hit when a remote holds it (remote/lazy.py).

        What the pull policy wants now (a failure's log; with ``eager``, the
        whole closure) is pulled; when that fails the step is a miss, and the
        log says why.
        """
        if self.ctx.remote is None:
            return False
        try:
            note = await self.ctx.remote.settle(result, self.hold)
        except Miss as exc:
            name = self.spec.steps[index].name
            self.build.note(
                f"step {name}: the remote result could not be pulled ({exc}); rerunning"
            )
            self._remote_notes.pop(index, None)
            return False
        if note is None:
            return False
        self._remote_notes.setdefault(index, note)
        self._lazy_trees.add(from_hex(result.after_tree))
        return True

    def _missing(self, result: Result, state: tuple[set[bytes], set[bytes]]) -> str | None:
        """What a result needs that the store lacks (None: complete).

        Holds the result (with the build's ``state``) first: once held, GC
        leaves it alone, so what is found present here stays present, and a
        row of the completeness record found then stays true (complete.py).
        """
        trees, blobs = state
        self.hold.checkpoint(
            trees | {from_hex(result.before_tree), from_hex(result.after_tree)},
            blobs | {from_hex(result.log)},
        )
        return self.presence.missing(
            [from_hex(result.before_tree), from_hex(result.after_tree)], [from_hex(result.log)]
        )

    async def _replay_failure(self, index: int, hit: Result) -> None:
        b = self.build
        name = self.spec.steps[index].name
        b.emit_log(name, BlobLog(self.ctx.store, from_hex(hit.log)))
        where = self._remote_notes.pop(index, None)
        origin = f"{where}" if where else f"from build {hit.build_id}"
        note = f"{origin}; --retry-failed runs it again"
        self.state.step_done(
            index,
            StepStatus.CACHED_FAILURE,
            hit,
            from_hex(hit.before_tree),
            from_hex(hit.after_tree),
            note,
        )
        self.state.freeze(index)

    # -- running a step --------------------------------------------------------

    async def _ensure_mount(self, index: int, tree: bytes) -> OverlayMount:
        if self.mount is not None and self.mount_tree == tree:
            return self.mount
        await self._make_local(index, tree)
        if self.mount is not None:
            # A later cache hit moved the state: start over on its tree.
            await self._settle()
            await self._close_mount()
        if self.ids is None:
            try:
                self.ids = self.ctx.id_pool.acquire()
            except IdPoolExhausted as exc:
                raise BuildErrored(str(exc)) from None
        work = self.ctx.work_dir("", self.build.id)
        base = self.base.tree if self.base is not None else None
        cm = self.ctx.lowers.open(self.ctx.store.state_dir, tree, work, ids=self.ids,
                                  fs_mode=self.ctx.fs_mode.name, base=base)  # fmt: skip
        self.mount = await cm.__aenter__()
        self._mount_cm = cm
        self.mount_tree = self.mount_lower = tree
        self._mount_timings = self.mount.timings
        return self.mount

    async def _make_local(self, index: int, tree: bytes) -> None:
        """The tree step ``index`` runs on, whole in the store: a remote result's is pulled
        now, and the log says so (what a user checks: which state came from where)."""
        if self.ctx.remote is None or tree not in self._lazy_trees:
            return  # proved whole when it was found
        try:
            pulled = await self.ctx.remote.ensure_local([tree], hold=self.hold)
        except Miss as exc:
            raise StateUnavailable(str(exc)) from None
        self._lazy_trees.discard(tree)
        made_by = self.spec.steps[index - 1].name if index else "the base"
        self.build.note(f"step {self.spec.steps[index].name}: pulled the state it runs on "
                        f"(the result of step {made_by}) from the remote cache, {pulled} bytes")  # fmt: skip

    async def _close_mount(self) -> None:
        """Stop the filesystem process and unmount (safe to call when none)."""
        cm, self._mount_cm, self.mount = self._mount_cm, None, None
        if cm is not None:
            await cm.__aexit__(None, None, None)

    async def _run_step(self, index: int, key: str, before: bytes) -> tuple[bytes, bool]:
        b, spec = self.build, self.spec
        step = spec.steps[index]
        if self.ctx.stopping:
            raise BuildErrored("the daemon is stopping")
        phases = Phases()
        with phases.timed("mount"):
            mount = await self._ensure_mount(index, before)
        if self._mount_timings is not None:  # this step opened it: its parts
            phases.update(self._mount_timings, "mount.")
            self._mount_timings = None
        state = b.steps[index]
        self._lookups = None  # answers from before this run may be stale by its end
        self.state.step_running(index, before)
        log_path = self.ctx.step_log_path(b.id, index)
        step_log = StepLog(log_path, self.ctx.store, self.ctx.config.step_log_max)
        b.emit_log(step.name, step_log)
        outcome = await self._beside_settle(index, mount, step_log, phases)
        phases.add("sandbox_start", outcome.start_seconds)
        phases.add("run", outcome.seconds - outcome.start_seconds)
        phases.add("sandbox_end", outcome.end_seconds)
        failed = outcome.exit_code != 0
        # A step another follows commits its snapshot while the next one runs.
        defer = not failed and index + 1 < len(spec.steps) and deferring()
        with phases.timed("snapshot"):
            snap = await mount.snapshot(defer=defer)
        state.snapshot_seconds = snap.stats.seconds
        self.mount_tree = snap.tree
        with phases.timed("log"):
            log_digest = await trio.to_thread.run_sync(step_log.store, self.hold.store)
        record_started = time.perf_counter()
        if step_log.truncated:
            b.note(f"step {step.name}: log truncated at {step_log.limit} bytes (step-log-max)")
        result = Result(
            key=key,
            status=(BuildStatus.FAILED if failed else BuildStatus.SUCCESS).value,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            before_tree=before.hex(),
            after_tree=snap.tree.hex(),
            log=log_digest.hex(),
            started=state.started,
            seconds=outcome.seconds,
            host=HOST,
            build_id=b.id,
            step=step.name,
        )
        if defer:
            self._unsettled = (index, mount, result, snap.tree)
        else:
            self._record(result, snap.tree)
        status = StepStatus.FAILED if failed else StepStatus.RAN
        phases.add("record", time.perf_counter() - record_started)
        log.debug("build %s step %s phases: %s", b.id, step.name, phases.describe())
        self.state.step_done(index, status, result, before, snap.tree, phases=phases.to_json())
        if failed:
            self.state.freeze(index)
        return snap.tree, failed

    async def _beside_settle(
        self, index: int, mount: OverlayMount, step_log: StepLog, phases: Phases
    ) -> StepOutcome:
        """Run step ``index`` while the step before's snapshot commits; that step is
        recorded as soon as it has (so a crash during this one still finds it cached)."""
        if self._unsettled is None:
            return await self._sandboxed(index, mount, step_log)
        return await run_beside(
            lambda: self._settle(phases), lambda: self._sandboxed(index, mount, step_log)
        )

    async def _settle(self, phases: Phases | None = None) -> None:
        """Record the step whose snapshot committed in the background, once it has: a crash
        before leaves it unrecorded (it reruns), never a result whose tree is not stored."""
        pending, self._unsettled = self._unsettled, None
        if pending is None:
            return
        index, mount, result, tree = pending
        try:
            commit_seconds = await mount.settle()
        except FilesystemError as exc:
            # Its "ran" was told before the commit ended: its row must not keep an
            # after-tree the store never got (``amber show``/``shell`` would offer it).
            self.state.step_unstored(index, f"its snapshot could not be stored: {exc}")
            raise
        if phases is not None:
            phases.add("settle.commit", commit_seconds)
        self._record(result, tree)

    def _record(self, result: Result, after: bytes) -> None:
        """A step's result into the cache (its after-tree committed to the store)."""
        self.ctx.db.put_result(result)
        if self.ctx.remote is not None:  # pushed in the background, never waited for
            self.ctx.remote.enqueue(self.build, result.key)
        self.presence.known_complete(after, over=self.mount_lower)

    async def _sandboxed(self, index: int, mount: OverlayMount, step_log: StepLog) -> StepOutcome:
        """Run step ``index`` in its sandbox, under its limits; a run that is no result errors."""
        b, spec = self.build, self.spec
        step = spec.steps[index]
        assert self.base is not None
        limited = StepLimits(self.limits, f"{b.id}.{index}")
        try:
            outcome = await run_sandboxed(
                mount.root,
                step=step,
                env=spec.step_env(step),
                binds=self.base.binds,
                ids=self.ids,
                output=step_log,
                on_start=limited.apply,
            )
        finally:
            step_log.close()
            oom_kills = limited.close()
        b.steps[index].seconds = outcome.seconds
        why = not_a_result(step.name, step.timeout, outcome, oom_kills, limited.memory_max,
                           self.ctx.store.state_dir)  # fmt: skip
        if why is not None:
            step_log.discard()
            raise BuildErrored(why)
        return outcome
