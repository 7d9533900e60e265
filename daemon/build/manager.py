"""Builds in flight: submission, the job limit, cancellation, lookup.

Builds run in the daemon's own nursery under a capacity limiter, so a
client's disconnect never stops one, and at most ``jobs`` run at once, at
most ``jobs-per-user`` of them one uid's; the rest wait as ``queued``.
"""

from __future__ import annotations

import functools
import logging
import os

import trio

from amber.daemon.build.build import Build
from amber.daemon.build.buildid import make_build_id
from amber.daemon.build.executor import Executor
from amber.daemon.build.limits import Limits
from amber.daemon.build.records import new_build_records
from amber.daemon.build.spec import Spec
from amber.daemon.build.state import BuildState, BuildStatus
from amber.daemon.context import DaemonContext
from amber.daemon.errors import Busy

log = logging.getLogger("amber.manager")


class BuildManager:
    def __init__(self, ctx: DaemonContext, nursery: trio.Nursery):
        self.ctx = ctx
        self.nursery = nursery
        self.limiter = trio.CapacityLimiter(ctx.config.jobs)
        #: Each uid's share of the job slots: one user's queue never fills them all.
        self.user_limiters: dict[int, trio.CapacityLimiter] = {}
        self.limits = Limits(ctx.config.step_memory_max, ctx.config.step_pids_max)
        self.live: dict[str, Build] = {}
        self.accepting = True

    def submit(self, spec: Spec, spec_path: str, *, uid: int, gid: int, **options) -> Build:
        if not self.accepting:
            raise Busy("amberd is shutting down; try again when it is back")
        seq = self.ctx.db.next_seq()
        build = Build(
            id=make_build_id(spec.name, seq),
            uid=uid,
            gid=gid,
            spec=spec,
            spec_path=spec_path,
            **options,
        )
        record, steps = new_build_records(build, seq)
        self.ctx.db.insert_build(record, steps)
        build.keep_note = functools.partial(self.ctx.db.add_build_note, build.id)
        self.live[build.id] = build
        self.nursery.start_soon(self._run, build)
        log.info("build %s queued (uid %d, %d steps)", build.id, uid, len(spec.steps))
        return build

    async def _run(self, build: Build) -> None:
        started = False
        try:
            share = self.user_limiters.setdefault(
                build.uid, trio.CapacityLimiter(self.ctx.config.user_jobs)
            )
            with build.cancel_scope:
                # The uid's share first: its builds beyond it wait without
                # holding (or queueing ahead for) a slot another uid could use.
                async with share, self.limiter:
                    started = True
                    log.info("build %s started", build.id)
                    await Executor(self.ctx, build, limits=self.limits).run()
        except Exception:
            # A bug in one build must never take the daemon (and everyone
            # else's builds) down: the executor has already marked it errored.
            log.exception("build %s: internal error", build.id)
        finally:
            if not started:  # cancelled while queued
                state = BuildState(self.ctx.db, build)
                state.errored(
                    "cancelled before it started" if build.cancelled else "daemon stopped"
                )
                state.finish()
            for fd in (build.out_link_dir, build.export_dir):
                if fd is not None:
                    os.close(fd)
            build.out_link_dir = build.export_dir = None
            log.info("build %s finished: %s", build.id, build.status)
            # Keep it visible briefly for clients that reattach right away.
            self.nursery.start_soon(self._forget, build.id)

    async def _forget(self, build_id: str) -> None:
        await trio.sleep(30)
        self.live.pop(build_id, None)

    def get(self, build_id: str) -> Build | None:
        return self.live.get(build_id)

    def cancel(self, build: Build) -> None:
        build.cancelled = True
        build.cancel_scope.cancel()

    def running(self) -> list[Build]:
        return [b for b in self.live.values() if BuildStatus(b.status).live]

    async def stop(self, grace: float) -> None:
        """Stop accepting; let running steps finish within ``grace``; cancel the rest.

        With ``ctx.stopping`` set no build starts another step, so a build
        ends when its running step does (``errored`` if steps were left).
        Cancelled steps end ``errored`` and are never cached. Safe to call
        again while a call is waiting, e.g. with ``grace=0`` to hurry it.
        """
        self.accepting = False
        self.ctx.stopping = True
        with trio.move_on_after(grace):
            for build in list(self.live.values()):
                if build.status == BuildStatus.QUEUED:
                    build.cancel_scope.cancel()
            for build in list(self.live.values()):
                await build.done.wait()
        late = [b for b in self.live.values() if not b.done.is_set()]
        if late:
            log.warning(
                "cancelling %d build(s) whose running step did not finish in %g s: %s",
                len(late),
                grace,
                ", ".join(b.id for b in late),
            )
        for build in late:
            build.cancel_scope.cancel()
        for build in late:
            await build.done.wait()
        self.limits.close()
