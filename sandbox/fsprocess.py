"""The filesystem process: one build's root, served until told to stop.

pyfuse3 serves one filesystem per process, so every mount is a process::

    python -m amber.sandbox.fsprocess --control-fd FD

Its first control line says what to mount (``{"op": "mount", "state_dir",
"tree", "work", "id_base", "id_count", "fs_mode"}``), so a process can be
started and imported ahead of need. It makes the tree's eager layer on a
tmpfs at ``W/fs/eager`` (directories, symlinks, executables: ``eagerlayer.py``),
mounts the whole tree read-only at ``W/fs/lower`` (FUSE, metadata only:
``lowerfs.py``) and stacks a kernel overlayfs at ``W/root`` over both, with a
writable upper ``W/fs/upper`` and the store's blobs as a data-only layer.
``W/fs`` is root's alone (0700; overlayfs reaches its layers as the mounter):
the sandbox's host uids traverse ``W`` to their root, and nobody else reads a
build's upper.
Kernels before 6.5 get one of two other modes (``fsmode.py``): in
``hidden-data`` the blobs are a plain bottom layer whose shards the eager
layer hides with whiteouts; in ``fuse-data`` there is no blob layer: the
FUSE lower serves file data too, and the eager layer holds no executables.
Then it answers JSON lines on the control socket (``--control-fd``)::

    -> {"op": "snapshot"}   <- {"ok": true, "tree": HEX, "stats": {...}}
    -> {"op": "snapshot", "defer": true}   <- the same, once the upper is read;
                            its objects are made durable in the background
    -> {"op": "settle"}     <- {"ok": true, "seconds": S} once that commit is
                            done, or {"ok": false, "error": ...} if it failed
    -> {"op": "stop"}       <- {"ok": true}   (then unmounts and exits)
    -> {"op": "detach"}     <- {"ok": true}   (the overlay unmounted, the lower kept)
    -> {"op": "attach", "work": W2, "view": HEX}  <- {"ok": true, "ready": true, ...}

``detach`` and ``attach`` serve one build after another over the same lower
(``sharedlower.py``): with ``"home": H`` in the mount request, the lower and
the eager layer are mounted at ``H/lower`` and ``H/eager`` instead of under
``W/layers``, and each attach makes a fresh upper and overlay below ``W2``.
With ``"view": T`` (in the mount request or an attach) the build sees tree
``T`` rather than the lower's: what ``T`` has beyond it is made as a sources
layer on a tmpfs at ``W/layers/sources``, above the eager layer
(``sourcelayer.py``), and snapshots are taken against ``T``.
The ready message and attach's answer carry ``timings``, seconds of each part
of mounting (the build's phases).

It announces ``{"ready": true, ...}`` once mounted. It unmounts and exits on
``stop``, on SIGTERM/SIGINT, and when the control channel closes, which is
how it learns that its controller died, however it died (the kernel closes
a dead process's socket). PR_SET_PDEATHSIG is deliberately not used: it
fires when the *thread* that forked us exits, and trio forks from worker
threads that retire after ten idle seconds. If this process is killed
outright, its controller (``fscontrol.py``) unmounts what it left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pyfuse3
import trio

from . import fsmode, sourcelayer
from .deferredcommit import DeferredCommits
from .digest import from_hex
from .eagerlayer import EagerLayer
from .fuseops import LowerOperations
from .lowerfs import LowerModel
from .mounts import MountError, mount, umount
from .snapshot import Snapshotter
from .store import Store
from .userns import IdMap

#: Stubs one lower's eager layer takes from the files builds met (``_promote``).
PROMOTE_MAX = 20_000


class FilesystemProcess:
    def __init__(
        self,
        store: Store,
        tree: bytes,
        work: Path,
        ids: IdMap,
        fs_mode: str = fsmode.DATALOWER,
        home: Path | None = None,
        view: bytes | None = None,
    ):
        self.store = store
        #: The lower's tree; the build sees ``view`` (a sources layer makes up the rest).
        self.tree = tree
        self.ids = ids
        self.fs_mode = fsmode.check_mode(fs_mode)
        if self.fs_mode == fsmode.HIDDEN_DATA and _names_a_shard(store, tree):
            self.fs_mode = fsmode.FUSE_DATA  # a whiteout would hide the tree's own entry
        #: Files are stubs whose data overlayfs reads from the blob directory.
        self.data_layer = self.fs_mode != fsmode.FUSE_DATA
        # Only root (the bwrap of every sandbox) need reach: the layers sit
        # in 0700 directories, seen by a step only through the overlay. The
        # lower and the eager layer are in ``home``: the process's own
        # directory when it serves one build after another (``attach``), else
        # the build's. Each build's upper and root are below its ``work``.
        self.home = home if home is not None else work / "layers"
        self.lower = self.home / "lower"
        self.eager = self.home / "eager"
        self.model = LowerModel(store, tree, ids=ids, serve_data=not self.data_layer)
        self._overlay_mounted = False
        self._eager_mounted = False
        self.commits = DeferredCommits()
        self.eager_layer: EagerLayer | None = None
        #: Work the last request left for after its reply (``_control_loop``).
        self._after_reply: Callable[[], None] | None = None
        #: Mount overlays ``volatile`` (fsmode.VOLATILE); ``AMBER_OVERLAY_VOLATILE=0``: never.
        self.volatile = os.environ.get("AMBER_OVERLAY_VOLATILE", "1") != "0"
        #: ``AMBER_EAGER_PROMOTE=0``: files a build met stay on the FUSE lower (``_promote``).
        self.promote_off = os.environ.get("AMBER_EAGER_PROMOTE", "1") == "0"
        self._promoted = 0
        #: Seconds of each part of mounting, sent with "ready" (the build's phases).
        self.timings: dict[str, float] = {}
        self._sources_mounted = False
        self._use(work, view)

    def _use(self, work: Path, view: bytes | None) -> None:
        """Point the overlay (upper, work directory, root, snapshots) at one build's ``work``,
        where the build sees ``view`` (None: the lower's tree)."""
        self.view = self.tree if view is None else view
        self.layers = work / "layers"
        self.upper = self.layers / "upper"
        self.overlay_work = self.layers / "work"
        self.sources = self.layers / "sources"
        self.root = work / "root"
        self.snapshotter = Snapshotter(self.store, self.view, self.upper, self.ids)

    def source_layers(self) -> list[Path]:
        """The sources layer and its shadows, one tmpfs (``sourcelayer.py``)."""
        return [self.sources / "top", self.sources / "shadows"]

    def _make_sources(self) -> None:
        """The sources layer of ``view`` over the lower's tree, when they differ."""
        if self.view == self.tree:
            return
        started = time.perf_counter()
        ops = sourcelayer.plan(self.store, self.tree, self.view)
        if ops is None or not self.data_layer:
            raise OSError(f"no sources layer for tree {self.view.hex()} over {self.tree.hex()}")
        self.sources.mkdir(mode=0o700, exist_ok=True)
        mount("amber-sources", self.sources, "tmpfs", "mode=0755,size=64m")
        self._sources_mounted = True
        for layer in self.source_layers():
            layer.mkdir(mode=0o755)
        top, shadows = (os.fsencode(layer) for layer in self.source_layers())
        sourcelayer.fill(top, shadows, ops, self.ids)
        self.timings["sources"] = time.perf_counter() - started

    def prepare(self) -> None:
        started = time.perf_counter()
        self._prepare()
        self.timings["eager"] = time.perf_counter() - started

    def _prepare(self) -> None:
        for private in (self.home, self.layers):
            private.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(private, 0o700)
        for path in (self.lower, self.eager):
            path.mkdir(parents=True, exist_ok=True)
        self._overlay_dirs()
        mount("amber-eager", self.eager, "tmpfs", "mode=0755,size=64m")
        self._eager_mounted = True
        self.eager_layer = eager = EagerLayer(self.store, self.ids, executables=self.data_layer)
        eager.fill(self.tree, os.fsencode(self.eager))
        if self.fs_mode == fsmode.HIDDEN_DATA:
            eager.hide(os.fsencode(self.eager), [name.encode() for name in fsmode.SHARDS])
        self._make_sources()

    def _overlay_dirs(self) -> None:
        self.layers.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.layers, 0o700)
        for path in (self.upper, self.overlay_work, self.root):
            path.mkdir(parents=True, exist_ok=True)
        # The build's root directory belongs to the sandbox's root user.
        os.chown(self.upper, self.ids.to_host(0), self.ids.to_host(0))
        os.chmod(self.upper, 0o755)

    def _attach(self, work: Path, view: bytes | None) -> dict[str, float]:
        """A fresh overlay for the next build over the same lower (after ``detach``),
        showing ``view`` (a sources layer of its own when it is not the lower's tree)."""
        started = time.perf_counter()
        self._unmount_root()
        self._use(work, view)
        self._overlay_dirs()
        self.timings.pop("sources", None)
        self._make_sources()
        self._mount_overlay()
        sources = {"sources": self.timings["sources"]} if "sources" in self.timings else {}
        return {"attach": time.perf_counter() - started, **sources}

    async def serve(self, control: trio.SocketStream) -> None:
        ops = LowerOperations(self.model, str(self.store.root))
        options = ["fsname=amber", "subtype=amber", "ro", "allow_other", "default_permissions"]
        options += ["nodev", "nosuid"]  # as every mount of a build root (mounts.SAFE_FLAGS)
        started = time.perf_counter()
        pyfuse3.init(ops, str(self.lower), options)
        self.timings["fuse"] = time.perf_counter() - started
        try:
            async with trio.open_nursery() as nursery:
                # One task: no handler ever awaits (the model answers from
                # memory or one tree read), and pyfuse3's extra reader tasks
                # only add scheduling to every request (15% of its CPU).
                nursery.start_soon(pyfuse3.main, 1, 1)
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                started = time.perf_counter()
                await trio.to_thread.run_sync(self._mount_overlay)
                self.timings["overlay"] = time.perf_counter() - started
                ready = {"root": str(self.root), "pid": os.getpid(), "fs_mode": self.fs_mode,
                         "timings": self.timings}  # fmt: skip
                await _send(control, {"ready": True, **ready})
                await self._control_loop(control)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._unmount_overlay)
            pyfuse3.close(unmount=True)
            self.model.close()

    def _mount_overlay(self) -> None:
        data = self.store.blob_dir if self.data_layer else None
        options = fsmode.overlay_options(
            self.eager,
            self.lower,
            data,
            self.upper,
            self.overlay_work,
            data_only=self.fs_mode == fsmode.DATALOWER,
            sources=self.source_layers() if self._sources_mounted else None,
        )
        if self.volatile:
            try:
                mount("amber", self.root, "overlay", options + fsmode.VOLATILE)
                self._overlay_mounted = True
                return
            except MountError:
                self.volatile = False  # a kernel before 5.10: without, from now on
        mount("amber", self.root, "overlay", options)
        self._overlay_mounted = True

    def _promote(self) -> None:
        """Between two builds: the files the last one met, onto the eager layer.

        overlayfs asks a lower for two xattrs of every file a new overlay
        meets, and FUSE caches none: about 360 round trips per zlib build on
        a Debian rootfs. Stubs on the eager tmpfs answer the next overlay in
        the kernel. Not in ``fuse-data`` mode: a stub needs a data layer.
        """
        if self.eager_layer is None or not self.data_layer or self.promote_off:
            return
        room = PROMOTE_MAX - self._promoted  # each stub is ~1 KiB of kernel memory
        if room > 0:
            met = self.model.met_files()[:room]
            try:
                self._promoted += self.eager_layer.promote(os.fsencode(self.eager), met)
            except OSError as exc:  # a full tmpfs, say: the files stay on the FUSE lower
                print(
                    f"amber-fs: promotion to the eager layer stopped: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
                self.promote_off = True

    def _unmount_root(self) -> None:
        """The build's overlay, and its sources layer with it."""
        if self._overlay_mounted:
            umount(self.root, lazy=True)
            self._overlay_mounted = False
        if self._sources_mounted:
            umount(self.sources, lazy=True)
            self._sources_mounted = False

    def _unmount_overlay(self) -> None:
        self._unmount_root()
        if self._eager_mounted:
            umount(self.eager, lazy=True)
            self._eager_mounted = False

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                scope.cancel()
                return

    async def _control_loop(self, control: trio.SocketStream) -> None:
        buffer = b""
        while True:
            data = await control.receive_some(65536)
            if not data:
                return  # the controller is gone: clean up and leave
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                reply, stop = await self._handle(line)
                await _send(control, reply)
                if stop:
                    return
                after, self._after_reply = self._after_reply, None
                if after is not None:  # before the next request: off the build's path
                    await trio.to_thread.run_sync(after)

    async def _handle(self, line: bytes) -> tuple[dict, bool]:
        try:
            request = json.loads(line)
            op = request["op"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": f"malformed control request {line[:80]!r}"}, False
        # Whatever comes after a deferred commit waits for its end: commits
        # stay in order, and nothing is detached or stopped under one.
        settled = await self.commits.settle()
        if op == "settle":
            return settled, False
        if op == "stop":
            return {"ok": True}, True
        if op == "detach":  # the build is over; the lower stays for the next one
            await trio.to_thread.run_sync(self._unmount_root)
            self._after_reply = self._promote
            return {"ok": True}, False
        if op == "attach":
            try:
                view = from_hex(request["view"]) if request.get("view") else None
                timings = await trio.to_thread.run_sync(self._attach, Path(request["work"]), view)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return {"ok": False, "error": f"attach failed: {exc}"}, False
            return {"ok": True, "ready": True, "root": str(self.root), "timings": timings}, False
        if op == "snapshot":
            try:
                digest, stats, batch = await trio.to_thread.run_sync(self.snapshotter.walk)
            except Exception as exc:  # reported to the controller, which decides
                return {"ok": False, "error": f"snapshot failed: {exc}"}, False
            if request.get("defer") is True:
                self.commits.start(batch)
            else:
                failed = await self.commits.run(batch)
                if failed is not None:
                    return {"ok": False, "error": f"snapshot failed: {failed}"}, False
            return {"ok": True, "tree": digest.hex(), "stats": asdict(stats)}, False
        return {"ok": False, "error": f"unknown control op {op!r}"}, False


def _names_a_shard(store: Store, tree: bytes) -> bool:
    """Whether the tree's root holds a name the hidden-data mode hides."""
    shards = {name.encode() for name in fsmode.SHARDS}
    return any(entry.name in shards for entry in store.get_tree(tree))


async def _send(control: trio.SocketStream, message: dict) -> None:
    await control.send_all(json.dumps(message).encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="amber-fs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--control-fd", type=int, required=True, help="connected control socket")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.control_fd)
    # Started ahead of need (a warm spare, see fscontrol.FilesystemPool): the
    # imports above are done; now wait for what to mount.
    request = _read_mount_request(sock)
    if request is None:
        return  # the controller closed us before we were needed
    _raise_priority()
    ids = IdMap(request["id_base"], request["id_count"])
    started = time.perf_counter()
    fs = FilesystemProcess(
        Store.open(request["state_dir"]),
        from_hex(request["tree"]),
        Path(request["work"]),
        ids,
        request.get("fs_mode", fsmode.DATALOWER),
        Path(request["home"]) if request.get("home") else None,
        from_hex(request["view"]) if request.get("view") else None,
    )
    fs.timings["model"] = time.perf_counter() - started
    fs.prepare()
    sock.setblocking(False)
    trio.run(_run, fs, sock)


def _raise_priority() -> None:
    """``AMBER_FS_NICE`` (e.g. -5): serve the lower ahead of the builds on a loaded host.

    Every first lookup of a build waits for this process to be scheduled; it
    uses a fraction of a second of CPU per build, so a higher priority costs
    the builds nothing and saves them the wait behind other work. Off (0)
    unless set, until measured on an idle machine (``pipeline.py --compare``).
    """
    try:
        nice = int(os.environ.get("AMBER_FS_NICE", "0"))
    except ValueError:
        return
    if nice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, max(-20, min(19, nice)))


def _read_mount_request(sock: socket.socket) -> dict | None:
    """The first control line: ``{"op": "mount", "state_dir", "tree", "work", "id_base", ...}``."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)  # byte by byte: nothing after the line may be consumed here
        if not chunk:
            return None
        data += chunk
    request = json.loads(data)
    if request.get("op") != "mount":
        sys.exit(f"amber-fs: expected a mount request, got {request.get('op')!r}")
    return request


async def _run(fs: FilesystemProcess, sock: socket.socket) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    await fs.serve(stream)


if __name__ == "__main__":
    main()
