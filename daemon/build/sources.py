"""Laying a spec's work directory, sources and stamps onto the base tree.

Sources are read by the daemon, never by the sandbox. Files and directories
named by ``path`` (and ``file://`` urls) are opened by a helper process that
is the client for real (uid, gid, groups, no capabilities: sandbox/asuser.py),
so a user cannot make a root daemon copy a file they could not read themselves.
What is read is checked on the opened descriptor (``userfiles``): a regular
file no larger than ``source-max-size``, or a directory; a path that became
a FIFO, a device or a symbolic link since the spec was parsed is refused.
``url`` sources are fetched beforehand (``fetch.py``) and arrive here as
verified blobs.

The initial tree is made in this order:

1. the base, with the work directory (and its parents) created if missing;
2. each source at its ``dest``, in spec order (a later source replaces what
   an earlier one put at the same path). A local file with a digest is
   verified as it is read; a mismatch raises ``DigestMismatch``. Source
   *files*, downloaded or local, get a fixed mtime: a file source is its
   content, so copying or touching it must not change the tree (and with it
   every step key). A directory source (a local checkout) keeps its files'
   mtimes, which make compares among themselves;
3. verification stamps: a source's ``stamp`` is written (build user, 0644,
   the package's mtime, content ``<digest>  <file name>``) exactly when the
   source's content is still at its ``dest``; otherwise a stamp at that path
   is removed, so a base or checkout can never smuggle in a stale one;
4. the spec's stamp rules (``stamps.py``), with the sources' own ``dest``
   and stamps kept.

Every removal is returned as a ``Finding`` for the build log.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from amber.daemon.build.fetch import MAX_DOWNLOAD, Fetched, ingest, source_label
from amber.daemon.build.spec import Source, Spec
from amber.daemon.build.stamps import Finding, apply_rules, remove_paths
from amber.daemon.errors import Internal, InvalidSpec, PermissionDenied, TimedOut
from amber.daemon.userfiles import NotRegularFile, open_regular_as
from amber.sandbox import tree as treefmt
from amber.sandbox.asuser import HelperError, HelperTimeout, Unreadable, User, UserReader
from amber.sandbox.asuser_pool import lease
from amber.sandbox.digest import EMPTY
from amber.sandbox.importer import WalkError, import_user_directory
from amber.sandbox.sandboxspec import BUILD_GID, BUILD_UID
from amber.sandbox.store import Batch, Store
from amber.sandbox.tree import Entry
from amber.sandbox.treeedit import TreeEditError, chown_dir, ensure_dir, put_entry

ROOT_DIR = Entry(b"", treefmt.DIR, 0o755, 0, 0, 0, 0, treefmt.EMPTY_TREE)
BUILD_DIR = ROOT_DIR._replace(uid=BUILD_UID, gid=BUILD_GID)
BUILD_FILE = Entry(b"", treefmt.FILE, 0o644, BUILD_UID, BUILD_GID, 0, 0, b"")
#: The mtime of downloaded files: fixed, so the initial tree is reproducible.
DOWNLOAD_MTIME_NS = 0

STALE_SOURCE_STAMP = "stale-source-stamp"


@dataclass
class Layout:
    """The tree the first step starts from, and what was removed to make it."""

    tree: bytes
    findings: list[Finding] = field(default_factory=list)
    #: url sources that were not in ``fetched`` (``missing_ok``): an empty
    #: stand-in is at their dest, so ``tree`` is not one to build from.
    skipped: list[int] = field(default_factory=list)


def lay_out(
    store: Store,
    base: bytes,
    spec: Spec,
    fetched: Mapping[int, Fetched],
    *,
    uid: int,
    gid: int,
    groups: tuple[int, ...] = (),
    missing_ok: bool = False,
    max_size: int = MAX_DOWNLOAD,
    batch: Batch | None = None,
) -> Layout:
    """``base`` + the work directory + every source + stamps put right. Blocking: run in a thread.

    ``fetched`` holds the url sources by index (``fetch.fetch_sources``);
    with ``missing_ok``, url sources not in it get an empty stand-in
    (``amber verify`` does not download). A local file larger than
    ``max_size`` is refused. ``batch``: what is written goes there, for the
    caller to commit (or abort, when this raises); else it is committed here.

    Raises:
        DigestMismatch: a local file source does not have its digest.
        InvalidSpec, PermissionDenied: a source cannot be read or placed.
    """
    if batch is None:
        with store.batch() as own:
            return lay_out(store, base, spec, fetched, uid=uid, gid=gid, groups=groups,
                           missing_ok=missing_ok, max_size=max_size, batch=own)  # fmt: skip
    layout = Layout(base)
    local = any(source.url is None for source in spec.sources)
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(lease(User(uid, gid, groups))) if local else None
        try:
            tree = _ensure_parents(store, base, spec.workdir, batch)
            placed: dict[int, tuple[Entry, str]] = {}
            for index, source in enumerate(spec.sources):
                if source.url is not None:
                    entry, digest = _fetched_entry(index, source, fetched, missing_ok, layout)
                else:
                    assert reader is not None
                    entry, digest = _read_local(store, index, source, batch, reader, max_size)
                tree = _place(store, tree, source.dest, entry, batch, spec.workdir)
                placed[index] = (entry, digest)
            tree, layout.findings = _source_stamps(store, tree, spec, placed, batch)
            keep = [s.dest for s in spec.sources] + [s.stamp for s in spec.sources if s.stamp]
            tree, found = apply_rules(store, tree, spec.workdir, spec.stamps, batch, keep=keep)
            layout.findings += found
        except TreeEditError as exc:
            raise InvalidSpec(str(exc)) from None
    layout.tree = tree
    return layout


def _fetched_entry(
    index: int, source: Source, fetched: Mapping[int, Fetched], missing_ok: bool, layout: Layout
) -> tuple[Entry, str]:
    """A url source's entry (its verified blob), and the digest its stamp names."""
    got = fetched.get(index)
    if got is None and not missing_ok:
        raise Internal(f"{source.url} was not fetched")
    if got is None:
        # Stand-in content, so that its stamp and the rules
        # see what a build would see. The tree is not built.
        layout.skipped.append(index)
        got = Fetched(EMPTY, 0, source.sha256, None)
    entry = BUILD_FILE._replace(mtime_ns=DOWNLOAD_MTIME_NS, size=got.size, ref=got.blob)
    return entry, got.sha256 or source.blake3 or got.blob.hex()


def _ensure_parents(store: Store, tree: bytes, workdir: str, batch: Batch) -> bytes:
    # Parents of the work directory belong to root; the directory itself to
    # the build user, who must be able to create files in it.
    parts = [p for p in workdir.split("/") if p]
    for i in range(1, len(parts)):
        tree = ensure_dir(store, tree, "/".join(parts[:i]), ROOT_DIR, batch)
    # The build user must be able to write its work directory, even when the
    # base already has one owned by root.
    tree = ensure_dir(store, tree, workdir, BUILD_DIR, batch)
    return chown_dir(store, tree, workdir, BUILD_UID, BUILD_GID, batch)


def _place(store: Store, tree: bytes, dest: str, entry: Entry, batch: Batch, workdir: str) -> bytes:
    """Put ``entry`` at ``dest``. Missing directories on the way are the build
    user's inside the work directory and root's outside it; existing ones
    are left as the base has them (a source in /etc must not give the build
    user /etc)."""
    inside = dest.startswith(workdir.rstrip("/") + "/")
    template = BUILD_DIR if inside else ROOT_DIR
    return put_entry(store, tree, dest, entry, batch, dir_template=template)


def _read_local(
    store: Store, index: int, source: Source, batch: Batch, reader: UserReader, max_size: int
) -> tuple[Entry, str]:
    """A local source's entry, and the digest its stamp names (its tree's, for a directory).

    The file is opened without following a link or blocking, by the user's
    helper, and what was opened is what is read (see the module docstring).
    """
    assert source.path is not None
    label = source_label(index, source)
    try:
        fd = open_regular_as(reader, source.path, allow_dir=True)
    except Unreadable as exc:
        if exc.missing:
            raise InvalidSpec(f"source {source.path} does not exist") from None
        raise PermissionDenied(f"{label}: {exc}") from None
    except NotRegularFile as exc:
        raise InvalidSpec(f"{label}: {exc}: only files and directories can be sources") from None
    except HelperTimeout as exc:  # the user's own helper, stopped
        raise TimedOut(f"{label}: {exc}") from None
    except HelperError as exc:
        raise Internal(f"{label}: {exc}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)  # the helper walks it, as the user, relative to its own descriptors
        try:
            ref = import_user_directory(store, reader, str(source.path), batch=batch,
                                        follow_symlinks=False)  # fmt: skip
        except Unreadable as exc:
            raise PermissionDenied(f"{label}: {exc}") from None
        except HelperTimeout as exc:
            raise TimedOut(f"{label}: {exc}") from None
        except (WalkError, HelperError) as exc:
            raise InvalidSpec(f"{label}: {exc}") from None
        return BUILD_DIR._replace(ref=ref, mtime_ns=st.st_mtime_ns), ref.hex()
    with os.fdopen(fd, "rb") as stream:
        if st.st_size > max_size:
            raise InvalidSpec(
                f"{label}: {st.st_size} bytes, larger than the {max_size} a source may be "
                "(source-max-size)"
            )
        mode = 0o755 if st.st_mode & 0o111 else 0o644
        entry = BUILD_FILE._replace(mode=mode, mtime_ns=DOWNLOAD_MTIME_NS)
        if source.sha256 is None and source.blake3 is None:
            digest = store.put_blob_fd(fd, st.st_size, batch)
            return entry._replace(size=st.st_size, ref=digest), digest.hex()
        got = ingest(
            store, stream, source, str(source.path), label, st.st_size, lambda _: None,
            batch, max_size=max_size,
        )  # fmt: skip
        return entry._replace(size=got.size, ref=got.blob), got.sha256 or got.blob.hex()


def _source_stamps(
    store: Store, tree: bytes, spec: Spec, placed: Mapping[int, tuple[Entry, str]], batch: Batch
) -> tuple[bytes, list[Finding]]:
    """Write each source's stamp where its content still is; remove the others.

    ``placed`` maps a source's index to the entry put at its dest and the
    digest its stamp names. A file must still have its content; a directory
    (which has no digest to check, and may have received later sources) must
    still be a directory.
    """
    findings: list[Finding] = []
    stale: list[str] = []
    for index, source in enumerate(spec.sources):
        if source.stamp is None or index not in placed:
            continue
        want, digest = placed[index]
        have = store.lookup_path(tree, source.dest.encode())
        if have is not None and have.kind == want.kind and (have.is_dir or have.ref == want.ref):
            name = source.dest.rsplit("/", 1)[-1]
            text = f"{digest}  {name}\n".encode()
            stamp = BUILD_FILE._replace(
                mtime_ns=have.mtime_ns, size=len(text), ref=store.put_blob_bytes(text, batch)
            )
            tree = _place(store, tree, source.stamp, stamp, batch, spec.workdir)
            continue
        if store.lookup_path(tree, source.stamp.encode()) is None:
            continue
        what = "is missing" if have is None else "holds other content"
        reason = (
            f"verification stamp of {source_label(index, source)}, whose package "
            f"{source.dest} {what} (a later source replaced it)"
        )
        findings.append(Finding(source.stamp, STALE_SOURCE_STAMP, reason))
        stale.append(source.stamp)
    if stale:
        tree = remove_paths(store, tree, stale, batch)
    return tree, findings
