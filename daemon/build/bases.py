"""Resolving a spec's ``base`` to a tree, a key and host directories to bind.

- ``host``: this machine's system directories, bound read-only into each
  step; the tree holds only their mount points. Its key part fingerprints
  the package databases and every entry of those directories (hostprint.py).
- ``dir:PATH``: a root filesystem directory, imported into the store (a
  hash cache keeps re-imports to a walk of ``stat`` calls).
- ``tree:DIGEST`` and named images (``amber image import``): a name is the
  user's own image, else root's (the shared namespace), never another user's.
- ``oci:PATH``: an OCI layout or archive, layers applied with whiteouts.
- ``docker://REGISTRY/REPO:TAG`` or ``@sha256:...``: pulled from a registry
  with the user's credentials, once per user and digest (registry_base.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from amber.daemon.build.hostprint import host_fingerprint
from amber.daemon.build.sandbox_users import identity_binds
from amber.daemon.errors import ImageError, InvalidSpec, NotFound, PermissionDenied, TimedOut
from amber.daemon.oci.limits import MAX_IMPORT
from amber.daemon.storage.db import Database
from amber.sandbox import tree as treefmt
from amber.sandbox.asuser import HelperError, HelperTimeout, Unreadable, User, UserReader
from amber.sandbox.digest import from_hex
from amber.sandbox.importer import WalkError, import_user_directory
from amber.sandbox.store import Store
from amber.sandbox.tree import Entry

if TYPE_CHECKING:
    from amber.daemon.build.registry_base import PullReport, RegistryAccess

HOST_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
_DIR_TEMPLATE = Entry(b"", treefmt.DIR, 0o755, 0, 0, 0, 0, treefmt.EMPTY_TREE)


@dataclass
class ResolvedBase:
    tree: bytes
    key: str  # what the key must cover beyond the tree
    binds: list[tuple[str, str]] = field(
        default_factory=list
    )  # (host path, sandbox path), read-only
    owner: int | None = None  # a named image's namespace (uid; 0: shared)
    pulled: PullReport | None = None  # a docker:// base: what its reference resolved to


def resolve_base(
    store: Store,
    db: Database,
    base: str,
    *,
    uid: int,
    gid: int,
    groups: tuple[int, ...] = (),
    import_max_size: int = MAX_IMPORT,
    registry: RegistryAccess | None = None,
) -> ResolvedBase:
    """Blocking (imports may read a lot): call from a worker thread.

    dir: and oci: bases are read by a helper that is the user asking (``uid``,
    ``gid``, ``groups``, no capabilities: sandbox/asuser.py): the daemon's
    root rights must not put a file into a build its user could not read
    (like a local source). The host base is every user's to build on.
    An oci: or docker:// image may unpack to at most ``import_max_size`` bytes;
    ``registry`` says how a docker:// base is pulled (anonymously if None).
    """
    kind, _, ref = base.partition(":")
    if base == "host":
        return _host_base(store)
    if base.startswith("docker://"):
        return _registry_base(store, db, base, uid, registry, import_max_size)
    if kind == "dir" and ref:
        return ResolvedBase(_dir_base(store, base, ref, User(uid, gid, groups)), "dir")
    if kind == "tree" and ref:
        try:
            tree = from_hex(ref)
        except ValueError as exc:
            raise InvalidSpec(f"base {base!r}: {exc}") from None
        # Another user's tree reads as absent: only root, or whoever built it
        # or may use an image of it, builds on a tree named by digest.
        if not store.has_tree(tree) or not db.tree_visible_to(tree.hex(), uid):
            raise NotFound(
                f"base tree {ref} is not in the store, or not a state of your builds or an image"
            )
        return ResolvedBase(tree, "tree")
    if kind == "oci" and ref:
        return ResolvedBase(
            _oci_base(store, base, ref, User(uid, gid, groups), import_max_size), "oci"
        )
    image = db.find_image(base, uid)
    if image is None:
        raise NotFound(f"base {base!r}: no such image (see `amber image ls`, `amber image import`)")
    # The key covers the tree (the initial tree holds it), not whose name it was.
    return ResolvedBase(from_hex(image["tree"]), "image", owner=image["uid"])


def _oci_base(store: Store, base: str, ref: str, user: User, import_max_size: int) -> bytes:
    """An ``oci:`` archive's tree, read by the user's helper."""
    from amber.daemon.oci.base import import_oci_base
    from amber.daemon.oci.spec import OciError

    try:
        with UserReader(user) as reader:
            return import_oci_base(store, Path(ref), max_size=import_max_size, reader=reader)
    except PermissionError as exc:
        raise PermissionDenied(f"base {base!r}: {exc.strerror}") from None
    except HelperError as exc:
        raise _helper_failed(base, exc) from None
    except FileNotFoundError:
        raise InvalidSpec(f"base {base!r}: {ref} does not exist") from None
    except OciError as exc:
        raise ImageError(f"base {base!r}: {exc}") from None


def _helper_failed(base: str, exc: HelperError) -> TimedOut | PermissionDenied:
    """The user's helper did not read the base: stopped (theirs to stop), or it failed."""
    if isinstance(exc, HelperTimeout):
        return TimedOut(f"base {base!r}: {exc}")
    return PermissionDenied(f"base {base!r}: {exc}")


def _registry_base(
    store: Store,
    db: Database,
    base: str,
    uid: int,
    access: RegistryAccess | None,
    max_size: int,
) -> ResolvedBase:
    """A docker:// base: its key part is "image", as for a named image (the initial
    tree holds the image's tree), so the keys are the same however it was named."""
    from amber.daemon.build.registry_base import RegistryAccess, pull_base
    from amber.daemon.oci.spec import OciError

    try:
        tree, report = pull_base(store, db.path, base.removeprefix("docker://"), uid=uid,
                                 access=access or RegistryAccess(), max_size=max_size)  # fmt: skip
    except (OciError, OSError) as exc:
        raise ImageError(f"base {base!r}: {exc}") from None
    return ResolvedBase(tree, "image", pulled=report)


def _bound_dirs() -> list[str]:
    """The host's system directories that are directories (not merged-/usr links)."""
    return [
        f"/{name}"
        for name in HOST_DIRS
        if os.path.isdir(f"/{name}") and not os.path.islink(f"/{name}")
    ]


def _dir_base(store: Store, base: str, ref: str, user: User) -> bytes:
    """A ``dir:`` base's tree, walked by the user's helper (links in ``ref`` followed)."""
    try:
        with UserReader(user) as reader, store.batch() as batch:
            return import_user_directory(store, reader, ref, batch=batch)
    except Unreadable as exc:
        if exc.missing and exc.path == ref:
            raise InvalidSpec(f"base {base!r}: {ref} is not a directory") from None
        raise PermissionDenied(f"base {base!r}: {exc}") from None
    except HelperError as exc:
        raise _helper_failed(base, exc) from None
    except WalkError as exc:
        raise PermissionDenied(f"base {base!r}: {exc}") from None


def host_binds(state_dir: Path) -> list[tuple[str, str]]:
    """The host's system directories a ``host``-based sandbox sees read-only, then the
    sandbox's own /etc/passwd and /etc/group over the host's (sandbox_users.py).

    Blocking (small file writes): call from a worker thread.
    """
    binds = [(path, path) for path in _bound_dirs()]
    if ("/etc", "/etc") in binds:
        binds += identity_binds(state_dir)
    return binds


def _host_base(store: Store) -> ResolvedBase:
    entries: list[Entry] = []
    for name in HOST_DIRS:
        path = f"/{name}"
        if not os.path.lexists(path):
            continue
        if os.path.islink(path):
            target = os.readlink(path).encode()
            entries.append(
                Entry(name.encode(), treefmt.SYMLINK, 0o777, 0, 0, 0, len(target), target)
            )
        elif os.path.isdir(path):
            entries.append(_DIR_TEMPLATE._replace(name=name.encode(), mtime_ns=0))
    for name in ("tmp", "proc", "dev", "root", "home", "var", "run"):
        if name.encode() not in {e.name for e in entries}:
            mode = 0o1777 if name == "tmp" else 0o755
            entries.append(_DIR_TEMPLATE._replace(name=name.encode(), mode=mode))
    entries.sort(key=lambda e: e.name)
    with store.batch() as batch:
        tree = store.put_tree(entries, batch)
    # "users": steps see the sandbox's own passwd and group (sandbox_users.py), so
    # results from before, which saw the host's, are not hits.
    binds = host_binds(store.state_dir)
    # "deep": the fingerprint covers every entry (hostprint.py), not two levels.
    return ResolvedBase(tree, "host:users:deep:" + host_fingerprint(_bound_dirs()), binds)
