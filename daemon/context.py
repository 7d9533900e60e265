"""What every part of the daemon shares: configuration, store, database, GC roots."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amber.daemon.build.buildid import check_build_id
from amber.daemon.config import Config
from amber.daemon.errors import NotFound
from amber.daemon.remote.pull import Miss
from amber.daemon.storage import pins
from amber.daemon.storage.complete import CompleteTrees
from amber.daemon.storage.db import Database
from amber.daemon.storage.gc import Collector
from amber.daemon.storage.roots import Roots
from amber.sandbox.fscontrol import FilesystemPool
from amber.sandbox.fsmode import FsMode, detect_fs_mode
from amber.sandbox.sharedlower import SharedLowers, linger_from_environment
from amber.sandbox.store import Store
from amber.sandbox.userns import IdPool


@dataclass
class DaemonContext:
    config: Config
    store: Store
    db: Database
    #: How build roots are mounted on this kernel (sandbox/fsmode.py).
    fs_mode: FsMode
    started: float = field(default_factory=time.time)
    #: Set on SIGTERM: running steps may finish, no new step starts.
    stopping: bool = False
    #: Filesystem processes started ahead of need (see fscontrol.FilesystemPool).
    fs_pool: FilesystemPool = field(default_factory=FilesystemPool)
    #: Temp roots of live builds, shells and exports (see roots.py).
    roots: Roots = field(init=False)
    #: Garbage collection and fsck, one at a time (see gc.py).
    gc: Collector = field(init=False)
    #: Host id ranges, one per running build or shell (see userns.IdPool).
    id_pool: IdPool = field(init=False)
    #: Trees proved whole, so a cache hit need not walk them (see complete.py).
    complete: CompleteTrees = field(init=False)
    #: Filesystem processes kept after a build for the next one on its tree (sharedlower.py).
    lowers: SharedLowers = field(init=False)

    def __post_init__(self) -> None:
        self.roots = Roots(self.store)
        self.gc = Collector(self)
        self.id_pool = IdPool(self.config.id_base, self.config.id_count, self.config.id_ranges)
        self.complete = CompleteTrees(self.db.path)
        self.lowers = SharedLowers(
            self.fs_pool, self.mount_dir, linger=linger_from_environment(), store=self.store
        )

    @property
    def mount_dir(self) -> Path:
        return self.config.mount_dir

    @property
    def log_dir(self) -> Path:
        return self.config.log_dir

    def step_log_path(self, build_id: str, index: int) -> Path:
        """Where a running step's output goes until it becomes a log blob.

        Under the root-only log directory, named by a checked id: open it
        with ``O_NOFOLLOW`` all the same.
        """
        return self.log_dir / f"{check_build_id(build_id)}.{int(index)}.log"

    def work_dir(self, kind: str, build_id: str) -> Path:
        """A fresh directory name under the mount directory for a build's or shell's mount."""
        unique = f"{os.getpid()}-{time.monotonic_ns() % 10**9}"
        return self.mount_dir / f"{kind}{check_build_id(build_id)}-{unique}"

    def peer_gid(self, build) -> int:
        return build.gid

    #: Exports a frozen build for ``--export-on-failure`` (set by main: the
    #: exporter lives above the executor in the import graph).
    export_hook: Callable[[Any], Awaitable[None]] | None = None
    #: The remote caches (daemon/remote/service.py; set by main, None in tools and tests).
    remote: Any = None

    async def on_frozen(self, build) -> None:
        """What follows a failure: ``--export-on-failure``."""
        if build.export_on_failure and self.export_hook is not None:
            await self.export_hook(build)

    async def on_success(self, build, tree: bytes) -> None:
        """What follows a successful build: ``--pin`` and ``--out-link`` (see pins.py).

        An out-link needs the final state's files: what only a remote cache
        has (a lazy hit) is pulled first, under the build's hold. A pin does
        not: a result a remote holds is still a result (the pin tags it
        there, remote/pins.py), so nothing is downloaded for it.
        """
        if self.remote is not None and build.out_link and self.db.remote_sources(tree=tree.hex()):
            try:
                await self.remote.ensure_local([tree], [], hold=self.roots.of_build(build.id))
            except Miss as exc:
                raise NotFound(f"build {build.id} succeeded, but its final state is in a remote "
                               f"cache and could not be pulled ({exc}); no out-link") from None  # fmt: skip
        await pins.on_success(self, build, tree)


def open_context(config: Config, fs_mode: FsMode | None = None) -> DaemonContext:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    # Traversable to mnt/ (below), listable by nobody: cas/, the database
    # and logs are root's alone (store.py, db.py).
    os.chmod(config.state_dir, 0o711)
    # Sandboxes start as the mapped host uid and must traverse to their root.
    config.mount_dir.mkdir(mode=0o711, exist_ok=True)
    os.chmod(config.mount_dir, 0o711)
    config.log_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(config.log_dir, os.geteuid(), os.getegid())  # root's; users read logs via amberd
    os.chmod(config.log_dir, 0o700)
    store = Store.open(config.state_dir)
    db = Database(config.state_dir / "amber.db")
    if fs_mode is None:
        fs_mode = detect_fs_mode(config.fs_mode)
    ctx = DaemonContext(config, store, db, fs_mode)
    ctx.roots.recover()
    return ctx
