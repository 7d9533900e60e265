"""Choosing how build roots are mounted, and the fallback modes on real mounts.

The daemon-level tests of the fuse-data mode are in test_fallback_modes.py; the
whole suite runs in a mode with ``AMBER_FS_MODE=MODE`` in the environment.
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
    HIDDEN_DATA,
    SHARDS,
    FsModeError,
    detect_fs_mode,
    probe_datalower,
    probe_hidden_data,
    probe_overlay,
)
from amber.sandbox.importer import import_directory
from amber.sandbox.mounts import mounts_under
from amber.sandbox.store import Store


def refused() -> str:
    return "overlayfs refused a data-only lower layer (Invalid argument)"


def works() -> None:
    return None


def kernel(datalower, hidden_data, fuse_data=works) -> dict:
    return {DATALOWER: datalower, HIDDEN_DATA: hidden_data, FUSE_DATA: fuse_data}


def test_auto_takes_the_first_mode_the_kernel_can_do():
    assert detect_fs_mode("auto", env={}, probes=kernel(works, works)).name == DATALOWER
    second = detect_fs_mode("auto", env={}, probes=kernel(refused, works))
    assert second.name == HIDDEN_DATA and "no datalower: overlayfs refused" in second.reason
    last = detect_fs_mode("auto", env={}, probes=kernel(refused, lambda: "no metacopy"))
    assert last.name == FUSE_DATA
    assert last.reason == (
        "probed: overlayfs here mounts over a plain lower; "
        "no datalower: overlayfs refused a data-only lower layer (Invalid argument); "
        "no hidden-data: no metacopy"
    )
    with pytest.raises(FsModeError, match=r"^no way to mount build roots here: no datalower: "):
        detect_fs_mode("auto", env={}, probes=kernel(refused, refused, lambda: "no overlayfs"))


def test_the_environment_overrides_the_configuration():
    probes = kernel(works, works)
    chosen = detect_fs_mode("datalower", env={"AMBER_FS_MODE": "fuse-data"}, probes=probes)
    assert chosen.name == FUSE_DATA and "AMBER_FS_MODE" in chosen.reason
    assert detect_fs_mode("fuse-data", env={}, probes=probes).name == FUSE_DATA
    assert detect_fs_mode("fuse-data", env={"AMBER_FS_MODE": ""}, probes=probes).name == FUSE_DATA
    forced = detect_fs_mode(
        "auto", env={"AMBER_FS_MODE": "hidden-data"}, probes=kernel(works, works)
    )
    assert forced.name == HIDDEN_DATA


def test_a_mode_forced_on_a_kernel_without_it_is_refused_at_start_up():
    with pytest.raises(FsModeError, match="fs-mode in the configuration asks for datalower, but"):
        detect_fs_mode("datalower", env={}, probes=kernel(refused, works))
    with pytest.raises(FsModeError, match="asks for hidden-data, but no metacopy"):
        detect_fs_mode("hidden-data", env={}, probes=kernel(works, lambda: "no metacopy"))
    with pytest.raises(
        FsModeError, match=r"^AMBER_FS_MODE in the environment: unknown filesystem mode 'fast'"
    ):
        detect_fs_mode("auto", env={"AMBER_FS_MODE": "fast"}, probes=kernel(works, works))


def test_the_config_option_takes_only_known_modes(tmp_path: Path):
    path = tmp_path / "amberd.toml"
    path.write_text('fs-mode = "fuse-data"\n')
    assert load_config(path).fs_mode == FUSE_DATA
    path.write_text('fs-mode = "overlay"\n')
    with pytest.raises(
        ConfigError, match="'fs-mode': expected one of auto, datalower, hidden-data, fuse-data"
    ):
        load_config(path)


# -- the probe, on this kernel ---------------------------------------------------


def test_the_probes_find_both_arrangements_on_this_kernel_and_leave_nothing(tmp_path: Path):
    release = tuple(int(p) for p in os.uname().release.split(".")[:2])
    assert release >= (6, 5)  # the machine these tests run on
    assert probe_datalower(tmp_path) is None
    assert probe_hidden_data(tmp_path) is None
    assert probe_overlay(tmp_path) is None
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


def test_amberd_check_reports_the_mode_amberd_would_use(daemon_root: Path):
    def check(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN / "amberd", "--check", "--state-dir", str(daemon_root / "state")],
            env={**os.environ, "AMBER_FS_MODE": mode}, capture_output=True, text=True,
        )  # fmt: skip

    ok = check("hidden-data")
    assert ok.returncode == 0, ok.stdout
    assert "ok    kernel: Linux " in ok.stdout
    assert ": mode: hidden-data (set by AMBER_FS_MODE in the environment)\n" in ok.stdout
    bad = check("fastest")
    assert bad.returncode == 78
    assert "FAIL  kernel: Linux " in bad.stdout
    assert "AMBER_FS_MODE in the environment: unknown filesystem mode 'fastest'" in bad.stdout


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
        assert mnt.fs_mode == FUSE_DATA
        options = _overlay_options(mnt.root)
        assert "lowerdir=" in options and "::" not in options  # no data-only layer
        lower = mnt.work / "fs/lower"
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
        upper = mnt.work / "fs/upper"
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


async def test_hidden_data_mount_hides_the_blobs_and_reads_stubs_from_them(
    store: Store, tmp_path: Path
):
    base_dir = tmp_path / "base"
    (base_dir / "usr").mkdir(parents=True)
    (base_dir / "usr/data").write_bytes(b"d" * 100_000)
    base = import_directory(store, base_dir)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt", fs_mode=HIDDEN_DATA) as mnt:
        assert mnt.fs_mode == HIDDEN_DATA
        options = _overlay_options(mnt.root)
        assert f"lowerdir={mnt.work}/fs/eager:{mnt.work}/fs/lower:{store.blob_dir}," in options
        assert os.listdir(mnt.root) == ["usr"]  # no shard of the blob directory
        assert not (mnt.root / "ab").exists() and not (mnt.root / "00").exists()
        lower = mnt.work / "fs/lower"
        assert os.getxattr(lower / "usr/data", "trusted.overlay.metacopy") == b""  # a stub
        assert (mnt.root / "usr/data").read_bytes() == b"d" * 100_000
        (mnt.root / "ab").mkdir()  # a build may still make one
        (mnt.root / "ab/mine").write_text("mine\n")
        assert os.listdir(mnt.root / "ab") == ["mine"]
        os.chmod(mnt.root / "usr/data", 0o600)
        snap = await mnt.snapshot()
    out = tmp_path / "checkout"
    checkout(store, snap.tree, out)
    assert sorted(os.listdir(out)) == ["ab", "usr"] and os.listdir(out / "ab") == ["mine"]
    assert (out / "usr/data").read_bytes() == b"d" * 100_000
    assert os.stat(out / "usr/data").st_mode & 0o777 == 0o600


async def test_a_tree_naming_a_shard_at_its_root_is_mounted_with_fuse_data(
    store: Store, tmp_path: Path
):
    base_dir = tmp_path / "base"
    (base_dir / SHARDS[0xAB]).mkdir(parents=True)
    (base_dir / "ab/own").write_text("the tree's own\n")
    base = import_directory(store, base_dir)
    async with open_overlay(store.state_dir, base, tmp_path / "mnt", fs_mode=HIDDEN_DATA) as mnt:
        assert mnt.fs_mode == FUSE_DATA
        assert os.listdir(mnt.root / "ab") == ["own"]
        assert (mnt.root / "ab/own").read_text() == "the tree's own\n"


def _overlay_options(root: Path) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(root):
                return fields[-1]
    raise AssertionError(f"{root} is not mounted")
