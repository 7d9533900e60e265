"""Pins and out-links: the named and the path-shaped GC roots.

A pin's TARGET (``amber pin add NAME TARGET``) is one of:

- ``BUILD``, a build id (``amber builds``): its base, every step's state
  before and after, every step's log and cached result, so that building
  the same spec again stays all cache hits however much GC collects;
- ``BUILD:STEP``: one step of a build, the same for that step only;
- ``result:KEY``, or a bare ``KEY`` (64 hex digits) that names a result: a
  cached step result, with its states and log;
- ``tree:DIGEST``, or a bare ``DIGEST`` that is not a result key: a tree.

A pin records the digests its target resolved to when it was made, so it
keeps holding them even if the build record it came from is dropped later.
Adding a pin under an existing NAME moves it; only the uid that made a pin,
or root, may move or remove it.

``amber build --pin NAME`` pins the build (as ``BUILD`` above) when it
succeeds, whether its steps ran or were all cache hits. A build that fails
or errors is not pinned, and NAME keeps pointing where it did (a CI branch
pin stays on the last good build); frozen failures are kept by the
retention policy, and ``amber pin add NAME BUILD`` pins one explicitly.

A pin holding step results is also tagged in the remote caches this host
pushes to, so that their registries keep it (daemon/remote/pins.py);
``amber pin rm`` re-points those tags at a tombstone.

``amber build --out-link PATH`` checks the final state (or the spec's
``output`` directory in it) out at PATH, below the directory the client
opened (storage/outlinks.py: amberd never resolves PATH), owned by the user
who asked, without
set-id bits, file capabilities or other ``security.*`` and ``trusted.*``
xattrs, or device nodes (root may ask for all but ``trusted.*`` with
``--out-link-privileged``), and records
PATH as a root. PATH holds the checkout while it is the directory amber made
(same device and inode, and the ``user.amber.out-link`` attribute naming
the build); once it is deleted or replaced, the next GC drops the record and
releases what it held. Building again with the same PATH replaces an
out-link amber made; anything else at PATH is an error.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import trio

from amber.daemon.build.state import BuildStatus
from amber.daemon.errors import BadArgs, Busy, NotFound, PermissionDenied
from amber.daemon.storage.db import BuildRecord, Database, OutLink, Pin
from amber.daemon.storage.outlinks import OUT_LINK_XATTR, OutLinkPlace, checkout_out_link
from amber.sandbox import tree as treefmt
from amber.sandbox.store import Store

if TYPE_CHECKING:
    from amber.daemon.build.build import Build
    from amber.daemon.context import DaemonContext

TARGET_FORMS = (
    "BUILD (a build id), BUILD:STEP (a step of it), result:KEY or KEY (a step key), "
    "tree:DIGEST or DIGEST (a tree)"
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,200}")


@dataclass
class PinRoots:
    """What a pin holds, as hex digests and keys."""

    trees: set[str] = field(default_factory=set)
    blobs: set[str] = field(default_factory=set)
    results: set[str] = field(default_factory=set)
    builds: set[str] = field(default_factory=set)

    def to_json(self) -> str:
        return json.dumps({k: sorted(v) for k, v in asdict(self).items()})

    def digests(self) -> tuple[set[bytes], set[bytes]]:
        return {bytes.fromhex(t) for t in self.trees}, {bytes.fromhex(b) for b in self.blobs}


def check_pin_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name != name.strip():
        raise BadArgs(
            "a pin name is 1 to 200 printable characters, without leading or trailing blanks",
        )
    return name


def build_roots(db: Database, build_id: str) -> PinRoots:
    """Everything a build's record names: base and final trees, every step's states, logs, results."""
    roots = PinRoots(builds={build_id})
    record = db.get_build(build_id)
    if record is not None:
        for value in (record.base_tree, record.final_tree):
            if value:
                roots.trees.add(value)
    for _bid, key, before, after, log_digest in db.step_refs([build_id]):
        _add_step(roots, db, key, before, after, log_digest)
    return roots


def _add_step(
    roots: PinRoots,
    db: Database,
    key: str | None,
    before: str | None,
    after: str | None,
    log_digest: str | None,
) -> None:
    roots.trees.update(t for t in (before, after) if t)
    if log_digest:
        roots.blobs.add(log_digest)
    if key and after and db.get_result(key) is not None:
        roots.results.add(key)


def resolve_target(
    db: Database, store: Store, target: str, *, uid: int
) -> tuple[str, str, BuildRecord | None, PinRoots]:
    """``(kind, target, build record or None, roots)`` for a pin target.

    Raises:
        BadArgs: for a target of no known form; NotFound: for one that names
            nothing (or a tree the caller may not see); Busy: for a build still running.
    """
    text = target.strip()
    prefix, _, rest = text.partition(":")
    if prefix == "result" and _HEX64.fullmatch(rest):
        return _result_target(db, rest, uid)
    if prefix == "tree" and _HEX64.fullmatch(rest):
        return _tree_target(db, store, rest, uid)
    if _HEX64.fullmatch(text):
        if db.get_result(text) is not None:
            return _result_target(db, text, uid)
        return _tree_target(db, store, text, uid)
    build_id, _, step = text.partition(":")
    record = db.get_build(build_id) if build_id else None
    if record is None:
        if prefix in ("result", "tree") or ":" in step:
            raise BadArgs(f"pin target {target!r}: expected {TARGET_FORMS}")
        raise NotFound(
            f"pin target {target!r} names no build, result or tree (accepted: {TARGET_FORMS})",
        )
    if BuildStatus(record.status).live:
        raise Busy(
            f"build {record.id} is still {record.status}; pin it when it is done "
            "(or build with --pin)",
        )
    if not step:
        return "build", record.id, record, build_roots(db, record.id)
    records = db.get_steps(record.id)
    chosen = next((s for s in records if s.name == step), None)
    if chosen is None:
        names = ", ".join(s.name for s in records)
        raise NotFound(f"build {record.id} has no step {step!r} (steps: {names})")
    if not chosen.after_tree:
        raise NotFound(f"step {step} of build {record.id} never finished")
    roots = PinRoots(builds={record.id})
    _add_step(roots, db, chosen.key, chosen.before_tree, chosen.after_tree, chosen.log)
    return "step", f"{record.id}:{step}", record, roots


def _result_target(db: Database, key: str, uid: int) -> tuple[str, str, None, PinRoots]:
    # As with trees: a result none of the caller's builds reached (ran or hit)
    # is answered as absent, or any user could hold anyone's states from GC.
    result = db.get_result(key)
    if result is None or not db.tree_visible_to(result.after_tree, uid):
        raise NotFound(f"no cached result with key {key} from your builds")
    roots = PinRoots(
        trees={result.before_tree, result.after_tree}, blobs={result.log}, results={key}
    )
    return "result", f"result:{key}", None, roots


def _tree_target(
    db: Database, store: Store, digest: str, uid: int
) -> tuple[str, str, None, PinRoots]:
    # Another user's tree is answered as one that is not there: its digest
    # says nothing to whoever may not see it.
    if not store.has_tree(bytes.fromhex(digest)) or not db.tree_visible_to(digest.lower(), uid):
        raise NotFound(
            f"no tree {digest} of yours in the store (a state of your builds or a named "
            "image), nor a result with that key"
        )
    return "tree", f"tree:{digest}", None, PinRoots(trees={digest})


def result_keys(db: Database, roots: PinRoots) -> list[str]:
    """The step results a pin holds, in build order (a pin's remote tags are numbered so)."""
    ordered: list[str] = []
    for build_id in sorted(roots.builds):
        for step in db.get_steps(build_id):
            if step.key in roots.results and step.key not in ordered:
                ordered.append(step.key)
    return ordered + sorted(roots.results - set(ordered))


def new_pin(name: str, kind: str, target: str, uid: int, roots: PinRoots) -> Pin:
    return Pin(name=name, kind=kind, target=target, uid=uid, created=time.time(),
               roots=roots.to_json())  # fmt: skip


def held_here(
    db: Database, trees: set[bytes], blobs: set[bytes]
) -> tuple[list[bytes], list[bytes]]:
    """What of a pin's roots must be in the store to pin it: not what only a
    remote cache holds (lazy hits; a result there is still a result)."""
    return ([t for t in trees if not db.remote_sources(tree=t.hex())],
            [b for b in blobs if not db.remote_sources(log=b.hex())])  # fmt: skip


def check_pin_owner(db: Database, name: str, uid: int) -> None:
    existing = db.get_pin(name)
    if existing is not None and uid != 0 and existing.uid != uid:
        raise PermissionDenied(f"pin {name} belongs to uid {existing.uid}")


def pin_summary(pin: Pin) -> dict:
    return {"name": pin.name, "target": pin.target, "kind": pin.kind, "uid": pin.uid,
            "created": pin.created}  # fmt: skip


# -- after a successful build ------------------------------------------------------------


async def on_success(ctx: DaemonContext, build: Build, tree: bytes) -> None:
    """``--pin`` and ``--out-link`` of a build that succeeded (cache hits or not)."""
    if not (build.pin or build.out_link):
        return
    roots = build_roots(ctx.db, build.id)
    trees, blobs = roots.digests()
    hold = ctx.roots.of_build(build.id)
    with ctx.roots.hold(f"build {build.id} finishing") as extra:
        # The build's own writer hold takes a checkpoint: what it just wrote
        # is held (and back from quarantine) before anything is recorded.
        if hold is not None:
            await trio.to_thread.run_sync(hold.checkpoint, trees, blobs)
        complete = await trio.to_thread.run_sync(extra.complete, *held_here(ctx.db, trees, blobs))
        if not complete:
            raise NotFound(
                f"build {build.id} succeeded but its states are not complete in the store "
                "(objects removed behind amber's back?); not pinned, no out-link",
            )
        if build.pin:
            check_pin_owner(ctx.db, build.pin, build.uid)
            ctx.db.put_pin(new_pin(build.pin, "build", build.id, build.uid, roots))
            build.note(f"pinned as {build.pin}")
            if ctx.remote is not None:
                urls = ctx.remote.pins.urls_for(no_remote=build.no_remote, cache_to=build.cache_to)
                ctx.remote.pins.pin(build.pin, build.uid, result_keys(ctx.db, roots), urls)
                if urls:
                    build.note(f"pin {build.pin}: tagging its results in {', '.join(urls)}")
        if build.out_link:
            await _out_link(ctx, build, tree)


async def _out_link(ctx: DaemonContext, build: Build, tree: bytes) -> None:
    if build.out_link_dir is None:
        raise BadArgs("--out-link: the client passed no directory")  # checked at submit already
    name = os.path.basename(build.out_link or "")
    # The path is the kernel's name of the directory the client opened, not
    # the client's word: gc and fsck look it up, and another user's record
    # must not be taken over by naming their path.
    path = os.path.join(os.readlink(f"/proc/self/fd/{build.out_link_dir}"), name)
    output = build.spec.output
    target = tree
    if output and output != "/":
        entry = await trio.to_thread.run_sync(
            ctx.store.lookup_path, tree, output.strip("/").encode()
        )
        if entry is None or entry.kind != treefmt.DIR:
            raise NotFound(f"the spec's output {output} is not a directory in the final state")
        target = entry.ref
    previous = ctx.db.get_out_link(path)
    place = OutLinkPlace(build.out_link_dir, name, build.out_link or path)
    dev, ino = await trio.to_thread.run_sync(
        checkout_out_link, ctx.store, target, place, build, previous
    )
    ctx.db.put_out_link(
        OutLink(path=path, build_id=build.id, tree=target.hex(), uid=build.uid, dev=dev,
                ino=ino, created=time.time())
    )  # fmt: skip
    shown = f"{output} of the result" if target != tree else "the result"
    build.note(f"checked {shown} out at {place.shown}; gc keeps it while that directory exists")


def out_link_alive(link: OutLink) -> bool:
    """True while ``link.path`` is still the checkout amber made there."""
    try:
        st = os.lstat(link.path)
    except OSError:
        return False
    if (st.st_dev, st.st_ino) != (link.dev, link.ino):
        return False
    try:
        marker = os.getxattr(link.path, OUT_LINK_XATTR, follow_symlinks=False)
    except OSError as exc:
        # Made where user xattrs are not supported: the inode alone tells.
        return exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    return marker == link.build_id.encode()
