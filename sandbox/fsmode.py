"""How build roots are mounted on this kernel: chosen once, at start-up.

Two modes, the same to a build and to a snapshot:

* ``datalower`` (Linux 6.5+): the FUSE lower serves metadata only; every
  file is a metacopy stub redirecting into the store's blob directory,
  which overlayfs takes as a *data-only lower layer* (``lowerdir=A::B``) and
  reads without Python. The fast mode (``lowerfs.py``).
* ``fuse-data`` (any kernel with overlayfs and FUSE: Debian 12's 6.1,
  Ubuntu 22.04's 5.15, RHEL 9's 5.14): no stubs; the FUSE lower opens and
  reads files itself from their blobs (with FOPEN_KEEP_CACHE, so the page
  cache outlives each open), under a plain ``lowerdir=eager:lower``.
  Executables are left out of the eager layer, which could only hold them
  as stubs.

``auto`` probes the kernel by mounting a tiny overlay with a data-only layer
(a version number would lie about backports and custom kernels). The
``fs-mode`` option of amberd.toml chooses, and ``AMBER_FS_MODE`` in the
environment overrides it (the tests force ``fuse-data`` with it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .mounts import MountError, mount, umount

DATALOWER = "datalower"
FUSE_DATA = "fuse-data"
AUTO = "auto"
MODES = (DATALOWER, FUSE_DATA)
CHOICES = (AUTO, *MODES)
ENV = "AMBER_FS_MODE"


class FsModeError(Exception):
    """A mode that is unknown, or forced on a kernel that cannot do it."""


@dataclass(frozen=True)
class FsMode:
    """The mode in use and why (shown by ``amber status``)."""

    name: str
    reason: str


def probe_datalower(parent: str | os.PathLike | None = None) -> str | None:
    """Why overlayfs here cannot take a data-only lower layer; None if it can.

    Mounts, on a private tmpfs in a temporary directory, an overlay whose
    only file is a metacopy stub redirected into a data-only layer, and
    reads the file through it.
    """
    try:
        top = Path(tempfile.mkdtemp(prefix="amber-fsprobe-", dir=parent))
    except OSError as exc:
        return f"cannot make a probe directory: {exc.strerror}"
    try:
        return _probe_in(top)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(top)


def _probe_in(top: Path) -> str | None:
    try:
        mount("amber-fsprobe", top, "tmpfs", "mode=0700,size=1m")
    except MountError as exc:
        return _version_guess(f"cannot mount to probe ({exc.strerror})")
    try:
        for sub in ("lower", "data", "root"):
            (top / sub).mkdir()
        (top / "data" / "blob").write_bytes(b"amber")
        stub = top / "lower" / "file"
        with open(stub, "wb") as f:
            f.truncate(5)
        os.setxattr(stub, "trusted.overlay.metacopy", b"")
        os.setxattr(stub, "trusted.overlay.redirect", b"/blob")
        options = f"lowerdir={top / 'lower'}::{top / 'data'},metacopy=on,redirect_dir=follow"
        try:
            mount("amber-fsprobe", top / "root", "overlay", options)
        except MountError as exc:
            return f"overlayfs refused a data-only lower layer ({exc.strerror})"
        try:
            if (top / "root" / "file").read_bytes() != b"amber":
                return "overlayfs did not read a metacopy stub's data from its data-only layer"
        finally:
            umount(top / "root")
        return None
    except OSError as exc:
        return f"probe failed: {exc}"
    finally:
        umount(top, lazy=True)


def _version_guess(why: str) -> str | None:
    """Without the right to mount, the kernel's version is the best guess."""
    release = platform.release()
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return f"{why}; kernel version {release!r} unreadable"
    if (major, minor) >= (6, 5):
        return None
    return f"{why}; Linux {release} predates 6.5"


def detect_fs_mode(
    configured: str = AUTO,
    *,
    env: Mapping[str, str] | None = None,
    probe: Callable[[], str | None] = probe_datalower,
) -> FsMode:
    """The mode to use: ``AMBER_FS_MODE``, else ``configured``; ``auto`` probes.

    Raises ``FsModeError`` for an unknown name, or for ``datalower`` forced
    on a kernel without data-only layers (better refused at start-up than
    failing every mount).
    """
    env = os.environ if env is None else env
    requested, source = configured, "fs-mode in the configuration"
    if env.get(ENV):
        requested, source = env[ENV], f"{ENV} in the environment"
    if requested not in CHOICES:
        raise FsModeError(
            f"{source}: unknown filesystem mode {requested!r} (choose from {', '.join(CHOICES)})"
        )
    if requested == FUSE_DATA:
        return FsMode(FUSE_DATA, f"set by {source}")
    problem = probe()
    if requested == DATALOWER:
        if problem is not None:
            raise FsModeError(f"{source} asks for {DATALOWER}, but {problem}")
        return FsMode(DATALOWER, f"set by {source}")
    if problem is None:
        return FsMode(DATALOWER, "probed: overlayfs here takes data-only lower layers")
    return FsMode(FUSE_DATA, f"{problem}; data-only layers need Linux 6.5")


@functools.cache
def default_fs_mode() -> FsMode:
    """This process's mode when none is passed: what ``auto`` (or the environment) picks."""
    return detect_fs_mode()


def check_mode(name: str) -> str:
    """``name`` if it is a concrete mode (not ``auto``)."""
    if name not in MODES:
        raise FsModeError(f"unknown filesystem mode {name!r} (choose from {', '.join(MODES)})")
    return name
