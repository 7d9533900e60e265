"""Tiny root filesystems for tests that run real sandboxes.

A sandbox's host uid (``host_base``, ``host_base + 1000``) resolves the root
through its parents, so roots must live under directories it can search:
pytest's ``tmp_path`` sits in a 0700 directory. Use `sandbox_tmpdir` for the
parent of a root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from amber.sandbox.userns import IdMap

BUSYBOX = Path("/bin/busybox")
BUILD_UID = 1000
# Directories a root needs for bwrap's mounts, plus homes and a workdir.
_DIRS = ("bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr/bin", "build")


def busybox_applets() -> list[str]:
    """The applets of the host's (static) busybox."""
    listing = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True)
    return [name for name in listing.stdout.split() if name != "busybox"]


def make_busybox_root(path: Path, *, id_map: IdMap | None = None) -> Path:
    """Fill ``path`` with a busybox-static root filesystem and return it.

    Everything is owned by the sandbox's root as the host sees it
    (``id_map.host_base``), ``/build`` by the build user (uid and gid 1000
    inside), ``/tmp`` is world-writable, and there is no /etc/passwd: the
    sandbox must not need one.
    """
    id_map = id_map or IdMap()
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing: install busybox-static")
    path.mkdir(parents=True, exist_ok=True)
    for name in _DIRS:
        (path / name).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, path / "bin/busybox")
    for applet in busybox_applets():
        link = path / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    env = path / "usr/bin/env"
    if not env.is_symlink():
        env.symlink_to("/bin/busybox")
    (path / "tmp").chmod(0o1777)
    _chown_tree(path, id_map.host_base, id_map.host_base)
    build = id_map.host_id(BUILD_UID)
    os.chown(path / "build", build, build)
    return path


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.lchown(top, uid, gid)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


@contextmanager
def sandbox_tmpdir(prefix: str = "amber-test-") -> Iterator[Path]:
    """A temporary directory that sandbox uids can search (0755 under /tmp)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
