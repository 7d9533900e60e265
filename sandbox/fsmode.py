"""How build roots are mounted on this kernel: chosen once, at start-up.

Three modes, the same to a build and to a snapshot:

* ``datalower`` (Linux 6.5+): the FUSE lower serves metadata only; every
  file is a metacopy stub redirecting into the store's blob directory,
  which overlayfs takes as a *data-only lower layer* (``lowerdir=A::B``) and
  reads without Python. The fast mode (``lowerfs.py``).
* ``hidden-data``: the same stubs, with the blob directory as an ordinary
  bottom lower layer (``lowerdir=eager:lower:blobs``), its 256 shard
  directories hidden from the build by whiteouts on the eager layer. A
  stub's redirect is looked up in the layers *below* it, which no whiteout
  above reaches: overlayfs' metacopy composition ("data from a file in
  another lower layer") that predates data-only layers (Linux 4.19). As
  fast as ``datalower``; a tree with a top-level entry named like a shard
  (two hex digits) is mounted in ``fuse-data`` instead.
* ``fuse-data`` (any kernel with overlayfs and FUSE: Debian 12's 6.1,
  Ubuntu 22.04's 5.15, RHEL 9's 5.14): no stubs; the FUSE lower opens and
  reads files itself from their blobs (with FOPEN_KEEP_CACHE, so the page
  cache outlives each open), under a plain ``lowerdir=eager:lower``.
  Executables are left out of the eager layer, which could only hold them
  as stubs.

``auto`` probes the kernel by mounting a tiny overlay in each arrangement
(a version number would lie about backports and custom kernels) and takes
the first that works, in that order. The
``fs-mode`` option of amberd.toml chooses, and ``AMBER_FS_MODE`` in the
environment overrides it (the tests force ``fuse-data`` with it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .mounts import MountError, mount, umount

DATALOWER = "datalower"
HIDDEN_DATA = "hidden-data"
FUSE_DATA = "fuse-data"
AUTO = "auto"
MODES = (DATALOWER, HIDDEN_DATA, FUSE_DATA)
#: What stands in the hidden-data mode's data layer at its root: the blob
#: directory's shards (store.py makes all 256), each hidden by a whiteout.
SHARDS = tuple(f"{i:02x}" for i in range(256))
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
    return _probing(parent, _probe_datalower, version_needed=(6, 5))


def probe_hidden_data(parent: str | os.PathLike | None = None) -> str | None:
    """Why overlayfs here cannot read stubs' data from a hidden plain lower; None if it can.

    The arrangement of the ``hidden-data`` mode, on a private tmpfs: a
    whiteout in the top layer hides the data layer's shard directory, a
    stub in the middle layer redirects into it. Checked as builds use it:
    the shard is invisible, the data reads, a chmod copies up metadata only
    and a write copies up the data.
    """
    return _probing(parent, _probe_hidden_data, version_needed=None)


def probe_overlay(parent: str | os.PathLike | None = None) -> str | None:
    """Why overlayfs here cannot mount a ``fuse-data`` root's kind of overlay; None if it can.

    Two plain lower layers, an upper, metacopy and redirect_dir: what every
    mode needs (the FUSE lower itself is ``amberd --check``'s /dev/fuse check).
    """
    return _probing(parent, _probe_overlay, version_needed=None)


def _probing(
    parent: str | os.PathLike | None,
    probe: Callable[[Path], str | None],
    version_needed: tuple[int, int] | None,
) -> str | None:
    try:
        top = Path(tempfile.mkdtemp(prefix="amber-fsprobe-", dir=parent))
    except OSError as exc:
        return f"cannot make a probe directory: {exc.strerror}"
    try:
        try:
            mount("amber-fsprobe", top, "tmpfs", "mode=0700,size=1m")
        except MountError as exc:
            return _version_guess(f"cannot mount to probe ({exc.strerror})", version_needed)
        try:
            return probe(top)
        except OSError as exc:
            return f"probe failed: {exc}"
        finally:
            umount(top, lazy=True)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(top)


def overlay_options(
    eager: Path,
    lower: Path,
    data: Path | None,
    upper: Path,
    work: Path,
    *,
    data_only: bool = True,
    sources: list[Path] | None = None,
) -> str:
    # metacopy + redirect_dir: metadata-only copy-up and renames of lower
    # directories, both understood by the snapshot (Linux 4.19+). index/xino
    # off: no persistent inode index to keep consistent across mounts.
    # eager: directories, symlinks and executables on tmpfs, above the FUSE
    # lower (eagerlayer.py); data: the blobs, a data-only layer (lowerfs.py),
    # or with data_only=False a plain bottom layer (the hidden-data mode),
    # or None (fuse-data). sources: what the build's tree has beyond the
    # lower's, layers above the eager one (sourcelayer.py).
    layers = f"{eager}:{lower}"
    if sources:
        layers = ":".join([*map(str, sources), layers])
    if data is not None:
        layers += f"{'::' if data_only else ':'}{data}"
    return (
        f"lowerdir={layers},upperdir={upper},workdir={work},"
        "metacopy=on,redirect_dir=on,index=off,xino=off"
    )


#: Appended to ``overlay_options`` where the kernel takes it (Linux 5.10+):
#: the upper's fsync/syncfs become no-ops. A step's upper never needs them:
#: a crash mid-step errors the build and its upper is deleted, and the
#: snapshot copies what it keeps into the store and syncs the store. A step
#: that fsyncs (package managers, databases) runs 1.6-1.8x faster (README).
VOLATILE = ",volatile"


def _make_stub(path: Path, redirect: bytes) -> None:
    with open(path, "wb") as f:
        f.truncate(5)
    os.setxattr(path, "trusted.overlay.metacopy", b"")
    os.setxattr(path, "trusted.overlay.redirect", redirect)


def _mounted(
    top: Path, data: Path | None, data_only: bool, refused: str, check: Callable[[Path], str | None]
) -> str | None:
    """Mount ``top``'s eager, lower and ``data`` layers with the options build
    roots use, and run ``check`` on the root; why it failed, or None."""
    for sub in ("eager", "lower", "upper", "work", "root"):
        (top / sub).mkdir(exist_ok=True)
    options = overlay_options(
        top / "eager", top / "lower", data, top / "upper", top / "work", data_only=data_only
    )
    try:
        mount("amber-fsprobe", top / "root", "overlay", options)
    except MountError as exc:
        return f"{refused} ({exc.strerror})"
    try:
        return check(top / "root")
    finally:
        umount(top / "root")


def _reads(wrong: str) -> Callable[[Path], str | None]:
    def check(root: Path) -> str | None:
        return None if (root / "file").read_bytes() == b"amber" else wrong

    return check


def _probe_overlay(top: Path) -> str | None:
    (top / "lower").mkdir()
    (top / "lower" / "file").write_bytes(b"amber")
    return _mounted(top, None, True, "overlayfs refused a metacopy overlay",
                    _reads("overlayfs did not show a lower file"))  # fmt: skip


def _probe_datalower(top: Path) -> str | None:
    for sub in ("lower", "data"):
        (top / sub).mkdir()
    (top / "data" / "blob").write_bytes(b"amber")
    _make_stub(top / "lower" / "file", b"/blob")
    return _mounted(top, top / "data", True, "overlayfs refused a data-only lower layer",
                    _reads("overlayfs did not read a metacopy stub's data from its data-only layer"))  # fmt: skip


def _probe_hidden_data(top: Path) -> str | None:
    for sub in ("eager", "lower", "data/ab"):
        (top / sub).mkdir(parents=True)
    (top / "data/ab/blob").write_bytes(b"amber")
    os.mknod(top / "eager/ab", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    _make_stub(top / "lower" / "file", b"/ab/blob")
    return _mounted(top, top / "data", False, "overlayfs refused a metacopy overlay",
                    _hides_the_data_layer)  # fmt: skip


def _hides_the_data_layer(root: Path) -> str | None:
    if os.listdir(root) != ["file"]:
        return "a whiteout in a lower layer did not hide the data layer"
    if (root / "file").read_bytes() != b"amber":
        return "overlayfs did not read a lower metacopy stub's data from a layer below"
    os.chmod(root / "file", 0o600)
    if (root / "file").read_bytes() != b"amber":
        return "a metadata-only copy-up of a lower stub lost its data"
    with open(root / "file", "ab") as f:
        f.write(b"!")
    if (root / "file").read_bytes() != b"amber!":
        return "a copy-up of a lower stub's data did not copy the data"
    return None


def _version_guess(why: str, needed: tuple[int, int] | None) -> str | None:
    """Without the right to mount, the kernel's version is the best guess."""
    if needed is None:
        return f"{why}; no kernel version says this works"
    release = platform.release()
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return f"{why}; kernel version {release!r} unreadable"
    if (major, minor) >= needed:
        return None
    return f"{why}; Linux {release} predates {needed[0]}.{needed[1]}"


#: The probe of each mode that needs one, in the order ``auto`` tries them.
PROBES: dict[str, Callable[[], str | None]] = {
    DATALOWER: probe_datalower,
    HIDDEN_DATA: probe_hidden_data,
    FUSE_DATA: probe_overlay,
}


def detect_fs_mode(
    configured: str = AUTO,
    *,
    env: Mapping[str, str] | None = None,
    probes: Mapping[str, Callable[[], str | None]] | None = None,
) -> FsMode:
    """The mode to use: ``AMBER_FS_MODE``, else ``configured``; ``auto`` probes.

    ``auto`` takes the first mode whose probe passes, in the order of
    ``PROBES``. Raises ``FsModeError`` for an unknown name, for a mode
    forced on a kernel that cannot do it, or when no mode works (better
    refused at start-up than failing every mount).
    """
    env = os.environ if env is None else env
    probes = PROBES if probes is None else probes
    requested, source = configured, "fs-mode in the configuration"
    if env.get(ENV):
        requested, source = env[ENV], f"{ENV} in the environment"
    if requested not in CHOICES:
        raise FsModeError(
            f"{source}: unknown filesystem mode {requested!r} (choose from {', '.join(CHOICES)})"
        )
    if requested != AUTO:
        problem = probes[requested]()
        if problem is not None:
            raise FsModeError(f"{source} asks for {requested}, but {problem}")
        return FsMode(requested, f"set by {source}")
    problems = []
    for mode, probe in probes.items():
        problem = probe()
        if problem is None:
            return FsMode(mode, f"probed: {_WORKS[mode]}" + "".join(f"; {p}" for p in problems))
        problems.append(f"no {mode}: {problem}")
    raise FsModeError("no way to mount build roots here: " + "; ".join(problems))


_WORKS = {
    DATALOWER: "overlayfs here takes data-only lower layers",
    HIDDEN_DATA: "overlayfs here reads lower stubs' data from a layer below",
    FUSE_DATA: "overlayfs here mounts over a plain lower",
}


@functools.cache
def default_fs_mode() -> FsMode:
    """This process's mode when none is passed: what ``auto`` (or the environment) picks."""
    return detect_fs_mode()


def check_mode(name: str) -> str:
    """``name`` if it is a concrete mode (not ``auto``)."""
    if name not in MODES:
        raise FsModeError(f"unknown filesystem mode {name!r} (choose from {', '.join(MODES)})")
    return name
