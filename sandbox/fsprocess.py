"""The filesystem process: one build's root, served until told to stop.

pyfuse3 serves one filesystem per process, so every mount is a process::

    python -m amber.sandbox.fsprocess --control-fd FD

Its first control line says what to mount (``{"op": "mount", "state_dir",
"tree", "work", "id_base", "id_count"}``), so a process can be started and
imported ahead of need. It mounts the tree read-only at ``W/lower`` (FUSE), stacks a kernel overlayfs
at ``W/root`` with a writable upper ``W/upper`` and the store's blobs as a
data-only layer (see ``lowerfs.py`` for why), then answers JSON lines on the control socket (``--control-fd``):

    -> {"op": "snapshot"}   <- {"ok": true, "tree": HEX, "stats": {...}}
    -> {"op": "stop"}       <- {"ok": true}   (then unmounts and exits)

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
import json
import os
import signal
import socket
import sys
from dataclasses import asdict
from pathlib import Path

import msgpack
import pyfuse3
import trio

from . import tree as treefmt
from .digest import from_hex
from .fuseops import LowerOperations
from .importer import IdShift
from .lowerfs import LowerModel
from .mounts import mount, umount
from .snapshot import Snapshotter
from .store import Store


def overlay_options(links: Path, lower: Path, data: Path, upper: Path, work: Path) -> str:
    # metacopy + redirect_dir: metadata-only copy-up and renames of lower
    # directories, both understood by the snapshot. index/xino off: no
    # persistent inode index to keep consistent across mounts.
    # links: the tree's symlinks on tmpfs, above the FUSE lower (see
    # FilesystemProcess._hoist_symlinks).
    return (
        f"lowerdir={links}:{lower}::{data},upperdir={upper},workdir={work},"
        "metacopy=on,redirect_dir=on,index=off,xino=off"
    )


class FilesystemProcess:
    def __init__(self, store: Store, tree: bytes, work: Path, ids: IdShift):
        self.store = store
        self.tree = tree
        self.ids = ids
        self.lower = work / "lower"
        self.upper = work / "upper"
        self.links = work / "links"
        self.overlay_work = work / "work"
        self.root = work / "root"
        self.model = LowerModel(store, tree, ids=ids)
        self.snapshotter = Snapshotter(store, tree, self.upper, ids)
        self._overlay_mounted = False
        self._links_mounted = False

    def prepare(self) -> None:
        for path in (self.lower, self.links, self.upper, self.overlay_work, self.root):
            path.mkdir(parents=True, exist_ok=True)
        # The build's root directory belongs to the sandbox's root user.
        os.chown(self.upper, self.ids.to_host(0), self.ids.to_host(0))
        os.chmod(self.upper, 0o755)
        self._symlink_dirs: dict[bytes, bool] = {}
        self._hoist_symlinks()

    def _hoist_symlinks(self) -> None:
        """Put the tree's symlinks, with their parent directories, on a tmpfs layer.

        Path walks resolve symlinks constantly (``/usr/bin/cc`` ->
        ``/etc/alternatives/cc`` -> ..., library sonames), and pyfuse3 cannot
        ask the kernel to cache symlink targets: thousands of READLINK round
        trips per build. On a tmpfs lower layer above the FUSE lower they are
        answered by the kernel, and cost microseconds each to make (on the
        store's disk a symlink costs about 300 us). Each copy, and each
        directory made to hold one, carries exactly the tree's metadata, so
        overlayfs shows the same tree; being a lower layer, it never enters a
        snapshot, and a step may still replace or delete them as usual.
        """
        mount("amber-links", self.links, "tmpfs", "mode=0755,size=64m")
        self._links_mounted = True
        self._hoist(self.tree, os.fsencode(self.links), None)

    def _hoist(self, tree: bytes, path: bytes, entry: treefmt.Entry | None) -> None:
        """Copy the symlinks below ``tree`` to ``path`` (a directory holding some)."""
        if entry is not None:  # the root is the upper itself
            os.mkdir(path, 0o700)
        for child in self.store.get_tree(tree):
            if child.kind == treefmt.SYMLINK:
                target = os.path.join(path, child.name)
                os.symlink(child.ref, target)
                self._apply(target, child)
            elif child.kind == treefmt.DIR and self._holds_symlinks(child.ref):
                self._hoist(child.ref, os.path.join(path, child.name), child)
        if entry is not None:
            self._apply(path, entry)  # after the children: the mtime must stay the tree's

    def _holds_symlinks(self, tree: bytes) -> bool:
        """Whether any symlink lies below ``tree``.

        Runs over every directory of the tree before the mount, so it reads
        trees raw (kind and subtree digest only) instead of decoding and
        re-verifying full entries: the lower model verifies each tree it
        serves anyway.
        """
        known = self._symlink_dirs.get(tree)
        if known is not None:
            return known
        rows = msgpack.unpackb(self.store.tree_path(tree).read_bytes(), raw=True)[1]
        found = False
        for row in rows:
            kind = row[1]
            if kind == treefmt.SYMLINK or (kind == treefmt.DIR and self._holds_symlinks(row[7])):
                found = True
                break
        self._symlink_dirs[tree] = found
        return found

    def _apply(self, path: bytes, entry: treefmt.Entry) -> None:
        os.chown(
            path, self.ids.to_host(entry.uid), self.ids.to_host(entry.gid), follow_symlinks=False
        )
        if entry.kind != treefmt.SYMLINK:
            os.chmod(path, entry.mode)
        for name, value in entry.xattrs:
            os.setxattr(path, name, value, follow_symlinks=False)
        os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)

    async def serve(self, control: trio.SocketStream) -> None:
        ops = LowerOperations(self.model, str(self.store.root))
        options = ["fsname=amber", "subtype=amber", "ro", "allow_other", "default_permissions"]
        options += ["dev", "suid"] if os.geteuid() == 0 else []
        pyfuse3.init(ops, str(self.lower), options)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pyfuse3.main)
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                await trio.to_thread.run_sync(self._mount_overlay)
                await _send(control, {"ready": True, "root": str(self.root), "pid": os.getpid()})
                await self._control_loop(control)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._unmount_overlay)
            pyfuse3.close(unmount=True)
            self.model.close()

    def _mount_overlay(self) -> None:
        options = overlay_options(
            self.links, self.lower, self.store.blob_dir, self.upper, self.overlay_work
        )
        mount("amber", self.root, "overlay", options)
        self._overlay_mounted = True

    def _unmount_overlay(self) -> None:
        if self._overlay_mounted:
            umount(self.root, lazy=True)
            self._overlay_mounted = False
        if self._links_mounted:
            umount(self.links, lazy=True)
            self._links_mounted = False

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

    async def _handle(self, line: bytes) -> tuple[dict, bool]:
        try:
            request = json.loads(line)
            op = request["op"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": f"malformed control request {line[:80]!r}"}, False
        if op == "stop":
            return {"ok": True}, True
        if op == "snapshot":
            try:
                digest, stats = await trio.to_thread.run_sync(self.snapshotter.snapshot)
            except Exception as exc:  # reported to the controller, which decides
                return {"ok": False, "error": f"snapshot failed: {exc}"}, False
            return {"ok": True, "tree": digest.hex(), "stats": asdict(stats)}, False
        if op == "stats":
            return {"ok": True, "inodes": self.model.inode_count}, False
        return {"ok": False, "error": f"unknown control op {op!r}"}, False


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
    ids = (
        IdShift(request["id_base"], request["id_count"])
        if request["id_base"]
        else IdShift(0, 1 << 32)
    )
    fs = FilesystemProcess(
        Store.open(request["state_dir"]), from_hex(request["tree"]), Path(request["work"]), ids
    )
    fs.prepare()
    sock.setblocking(False)
    trio.run(_run, fs, sock)


def _read_mount_request(sock: socket.socket) -> dict | None:
    """The first control line: ``{"op": "mount", "state_dir", "tree", "work", "id_base", "id_count"}``."""
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
