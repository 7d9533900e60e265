"""Choosing how build roots are mounted, and the fuse-data mode on real mounts.

The daemon-level tests of the fuse-data mode are in test_fuse_data.py; the
whole suite runs in it with ``AMBER_FS_MODE=fuse-data`` in the environment.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon

from amber.daemon.config import ConfigError, load_config
from amber.sandbox.checkout import checkout
from amber.sandbox.fscontrol import open_overlay
from amber.sandbox.fsmode import (
    DATALOWER,
    FUSE_DATA,
    FsModeError,
    detect_fs_mode,
    probe_datalower,
)
from amber.sandbox.importer import import_directory
from amber.sandbox.mounts import mounts_under
from amber.sandbox.store import Store


def no_datalower() -> str:
    return "overlayfs refused a data-only lower layer (Invalid argument)"


def can_datalower() -> None:
    return None


# -- choosing (pure logic: the probe is passed in) ----------------------------


def test_auto_takes_datalower_where_the_kernel_has_it_and_falls_back_where_not():
    assert detect_fs_mode("auto", env={}, probe=can_datalower).name == DATALOWER
    fallback = detect_fs_mode("auto", env={}, probe=no_datalower)
    assert fallback.name == FUSE_DATA
    assert "refused a data-only lower layer" in fallback.reason and "6.5" in fallback.reason


def test_the_environment_overrides_the_configuration():
    chosen = detect_fs_mode("datalower", env={"AMBER_FS_MODE": "fuse-data"}, probe=can_datalower)
    assert chosen.name == FUSE_DATA and "AMBER_FS_MODE" in chosen.reason
    assert detect_fs_mode("fuse-data", env={}, probe=can_datalower).name == FUSE_DATA
    assert detect_fs_mode("fuse-data", env={"AMBER_FS_MODE": ""}).name == FUSE_DATA


def test_datalower_forced_on_a_kernel_without_it_is_refused_at_start_up():
    with pytest.raises(FsModeError, match="fs-mode in the configuration asks for datalower, but"):
        detect_fs_mode("datalower", env={}, probe=no_datalower)
    with pytest.raises(
        FsModeError, match=r"^AMBER_FS_MODE in the environment: unknown filesystem mode 'fast'"
    ):
        detect_fs_mode("auto", env={"AMBER_FS_MODE": "fast"}, probe=can_datalower)


def test_the_config_option_takes_only_known_modes(tmp_path: Path):
    path = tmp_path / "amberd.toml"
    path.write_text('fs-mode = "fuse-data"\n')
    assert load_config(path).fs_mode == FUSE_DATA
    path.write_text('fs-mode = "overlay"\n')
    with pytest.raises(ConfigError, match="'fs-mode': expected one of auto, datalower, fuse-data"):
        load_config(path)


# -- the probe, on this kernel ---------------------------------------------------


def test_the_probe_finds_data_only_layers_on_this_kernel_and_leaves_nothing(tmp_path: Path):
    release = tuple(int(p) for p in os.uname().release.split(".")[:2])
    assert release >= (6, 5)  # the machine these tests run on
    assert probe_datalower(tmp_path) is None
    assert mounts_under(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_amberd_probes_by_default_and_takes_the_mode_its_configuration_sets(daemon_root: Path):
    def status_line(daemon: Daemon) -> bytes:
        out = daemon.amber("status")
        assert out.returncode == 0, out.stderr
        daemon.stop()
        return next(line for line in out.stdout.splitlines() if line.startswith(b"fs mode:"))

    probed = Daemon(daemon_root / "a", extra_env={"AMBER_FS_MODE": ""})
    (daemon_root / "a").mkdir()
    assert status_line(probed.start()) == (
        b"fs mode: datalower (probed: overlayfs here takes data-only lower layers)"
    )
    config = daemon_root / "amberd.toml"
    config.write_text('fs-mode = "fuse-data"\n')
    configured = Daemon(daemon_root / "b", extra_env={"AMBER_FS_MODE": ""})
    (daemon_root / "b").mkdir()
    assert status_line(configured.start("--config", str(config))) == (
        b"fs mode: fuse-data (set by fs-mode in the configuration)"
    )
    config.write_text('fs-mode = "datalower"\n')
    refused = subprocess.run(
        [BIN / "amberd", "--config", str(config), "--state-dir", str(daemon_root / "c"),
         "--socket", str(daemon_root / "c.sock")],
        env={**configured.env, "AMBER_FS_MODE": "nonsense"}, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 78
    assert "AMBER_FS_MODE in the environment: unknown filesystem mode 'nonsense'" in refused.stderr


# -- the fuse-data mode on a real mount ------------------------------------------------


async def test_fuse_data_mount_serves_data_from_fuse_and_snapshots_copy_ups(
    store: Store, tmp_path: Path
):
    base_dir = tmp_path / "base"
    (base_dir / "bin").mkdir(parents=True)
    (base_dir / "bin/tool").write_text("#!/bin/sh\necho tool ran\n")
    os.chmod(base_dir / "bin/tool", 0o755)
    (base_dir / "data").write_bytes(b"d" * 200_000)
    (base_dir / "mode-only").write_text("same bytes\n")
    base = import_directory(store, base_dir)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt", fs_mode=FUSE_DATA) as mnt:
        options = _overlay_options(mnt.root)
        assert "lowerdir=" in options and "::" not in options  # no data-only layer
        lower = mnt.work / "lower"
        with pytest.raises(OSError) as err:  # plain files, not metacopy stubs
            os.getxattr(lower / "data", "trusted.overlay.metacopy")
        assert err.value.errno == errno.ENODATA
        assert (lower / "data").read_bytes() == b"d" * 200_000  # FUSE serves the data
        assert (mnt.root / "data").read_bytes() == b"d" * 200_000
        ran = subprocess.run([mnt.root / "bin/tool"], capture_output=True, text=True)
        assert ran.stdout == "tool ran\n"
        assert (await mnt.snapshot()).tree == base
        os.chmod(mnt.root / "mode-only", 0o600)
        with open(mnt.root / "data", "ab") as f:
            f.write(b"+")
        upper = mnt.work / "upper"
        os.getxattr(upper / "mode-only", "trusted.overlay.metacopy")  # metadata-only copy-up
        assert os.stat(upper / "data").st_size == 200_001  # a full copy, no metacopy
        with pytest.raises(OSError):
            os.getxattr(upper / "data", "trusted.overlay.metacopy")
        snap = await mnt.snapshot()
    out = tmp_path / "checkout"
    checkout(store, snap.tree, out)
    assert (out / "data").read_bytes() == b"d" * 200_000 + b"+"
    assert (out / "mode-only").read_text() == "same bytes\n"
    assert os.stat(out / "mode-only").st_mode & 0o777 == 0o600
    assert (out / "bin/tool").read_text() == "#!/bin/sh\necho tool ran\n"


def _overlay_options(root: Path) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(root):
                return fields[-1]
    raise AssertionError(f"{root} is not mounted")
