"""Which big files a pull needs, found while its packs arrive.

Layers are not signed; the tree a pull wants is (through the config), and
a pack's trees are checked against their BLAKE3 digests. So a big-file
layer is fetched only once a tree reachable from the wanted one names it,
with the layer's size: a manifest padded with other layers costs nothing.
Packs arrive in any order (they are cut by digest, not by depth): a tree is
walked as soon as it is known reachable, then dropped; one whose parent has
not arrived yet waits, encoded (a few times smaller than decoded, and a
junk tree never reachable stays that), and is walked when its parent names
it. A pull no longer holds every tree it brought, decoded, until it ends.

``rest``, once every pack has arrived, walks what the packs did not bring
from the store (trees an earlier pull or build wrote) and returns the big
files wanted; a tree neither brought nor stored is a ``Miss``. The big
files are fetched after the packs, not beside them: measured on the
2-core bench, their writes beside the packs' thousands of file creations
made the pull slower (ext4 creates stall on the writeback of the rest).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from amber.daemon.remote.layout import Layer
from amber.daemon.remote.pull import Arrival, Miss
from amber.sandbox import tree as treefmt
from amber.sandbox.store import StoreError
from amber.sandbox.tree import Entry

if TYPE_CHECKING:
    from amber.sandbox.store import Store


class Reach:
    """The trees reachable from ``root`` seen so far, and the big-file layers they name."""

    def __init__(self, store: Store, root: bytes, bigs: dict[bytes, Layer]):
        self._store = store
        self._bigs = bigs  # big files by BLAKE3
        self._reached = {root}  # reachable from root (arrived or not)
        self._walked: set[bytes] = set()
        self._waiting: dict[bytes, bytes] = {}  # arrived, not (yet) reachable: encoded
        self._started: set[bytes] = set()  # big files found wanted
        self._wanted: list[Layer] = []
        self._lock = threading.Lock()

    def arrived(self, trees: dict[bytes, Arrival]) -> None:
        """A pack's trees arrived (checked): walk those known reachable, keep the rest encoded."""
        with self._lock:
            for digest, (entries, data) in trees.items():
                if digest in self._reached:
                    self._walk(digest, entries, self._wanted)
                else:
                    self._waiting[digest] = data

    def rest(self) -> list[Layer]:
        """Every pack arrived: the big-file layers wanted and not in the store, after walking
        the reachable trees the packs did not bring (from the store)."""
        wanted, self._wanted = self._wanted, []
        with self._lock:
            while todo := self._reached - self._walked:
                for digest in todo:
                    try:
                        entries = self._store.get_tree(digest)
                    except StoreError as exc:
                        raise Miss(f"the remote result does not hold tree {digest.hex()[:12]}: "
                                   f"{exc}") from None  # fmt: skip
                    self._walk(digest, entries, wanted)
            self._waiting.clear()
        return wanted

    def _walk(self, digest: bytes, entries: list[Entry], wanted: list[Layer]) -> None:
        """``digest`` is reachable and here: its subtrees are, and its big files are wanted."""
        todo = [(digest, entries)]
        while todo:
            digest, entries = todo.pop()
            self._walked.add(digest)
            for entry in entries:
                if entry.kind == treefmt.DIR and entry.ref not in self._reached:
                    self._reached.add(entry.ref)
                    waiting = self._waiting.pop(entry.ref, None)
                    if waiting is not None:
                        todo.append((entry.ref, treefmt.decode(waiting)))
                elif entry.kind == treefmt.FILE and entry.ref in self._bigs:
                    self._want(entry, wanted)

    def _want(self, entry: Entry, wanted: list[Layer]) -> None:
        layer = self._bigs[entry.ref]
        if layer.size != entry.size:
            raise Miss(f"layer {layer.digest} is {layer.size} bytes, its file {entry.size}")
        if entry.ref not in self._started:
            self._started.add(entry.ref)
            if not self._store.has_blob(entry.ref):
                wanted.append(layer)
