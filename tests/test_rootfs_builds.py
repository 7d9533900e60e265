"""Builds on imported root filesystems instead of the host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from amberd_process import Daemon
from rootfs import make_busybox_root
from sources import source_tarball

REPO = Path(__file__).resolve().parent.parent


def buildd_rootfs() -> tuple[Path, str]:
    """A Debian buildd root of this machine's release (or AMBER_DEBIAN_SUITE's),
    debootstrapped once and cached by scripts/make-rootfs, and its suite."""
    made = subprocess.run(
        [str(REPO / "scripts" / "make-rootfs")], check=True, capture_output=True, text=True
    )
    root = Path(made.stdout.splitlines()[-1])
    marker = dict(
        line.split(" ", 1) for line in (root / ".amber-rootfs-complete").read_text().splitlines()
    )
    return root, marker["suite"]


def test_multi_step_build_on_a_busybox_root(amberd: Daemon):
    root = amberd.root / "bb"
    make_busybox_root(root)
    assert amberd.amber("image", "import", "busybox", f"dir:{root}").returncode == 0
    listing = amberd.amber("image", "ls")
    assert b"busybox" in listing.stdout
    spec_dir = amberd.root / "bbspec"
    spec_dir.mkdir()
    (spec_dir / "spec.toml").write_text(
        '[build]\nname = "bb"\nbase = "busybox"\n'
        '[[step]]\nname = "write"\nrun = "echo one > a && mkdir d && echo two > d/b"\n'
        '[[step]]\nname = "combine"\nrun = "cat a d/b > both && test $(wc -l < both) -eq 2"\n'
        '[[step]]\nname = "who"\nuser = "root"\nrun = "test $(id -u) -eq 0 && chown 1000 both"\n'
    )
    code, report = amberd.build_json(spec_dir / "spec.toml")
    assert code == 0, report
    assert [s["status"] for s in report["steps"]] == ["ran", "ran", "ran"]
    code, again = amberd.build_json(spec_dir / "spec.toml")
    assert [s["status"] for s in again["steps"]] == ["cached"] * 3


def test_real_c_project_on_a_debootstrapped_root(amberd: Daemon):
    rootfs, suite = buildd_rootfs()
    imported = amberd.amber("image", "import", suite, f"dir:{rootfs}")
    assert imported.returncode == 0, imported.stderr
    spec_dir = amberd.root / "zlib-buildd"
    spec_dir.mkdir()
    os.link(source_tarball("zlib"), spec_dir / "zlib.tar.bz2")
    (spec_dir / "spec.toml").write_text(
        f'[build]\nname = "zlib-buildd"\nbase = "{suite}"\n'
        '[[source]]\npath = "zlib.tar.bz2"\n'
        '[[step]]\nname = "extract"\nrun = "tar xf zlib.tar.bz2"\n'
        '[[step]]\nname = "configure"\nrun = "cd zlib-* && ./configure"\n'
        '[[step]]\nname = "make"\nrun = "cd zlib-* && make -j2"\n'
        f'[[step]]\nname = "test"\nrun = "cd zlib-* && make test && grep -qx VERSION_CODENAME={suite} /etc/os-release"\n'
    )
    code, report = amberd.build_json(spec_dir / "spec.toml")
    assert code == 0, report
    log = amberd.amber("log", report["build"], "--step", "test")
    assert b"*** zlib test OK ***" in log.stdout
