"""amberd's preflight (``--check`` and the same checks at start-up) and ``--print-config``,
with the real amberd."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon

from amber.daemon.config import OPTIONS, Config, load_config

EX_CONFIG = 78
AMBERD = str(BIN / "amberd")
BUILD = '[build]\nname = "pf"\nbase = "host"\n[[step]]\nname = "who"\nrun = "id -un"\n'


def amberd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([AMBERD, *args], capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip


def check_lines(out: str) -> dict[str, tuple[str, str]]:
    """``amberd --check``'s lines: check name -> (ok, warn or FAIL, sentence)."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"^(ok|warn|FAIL) +([^:]+): (.*)$", line)
        assert m, f"not a check line: {line!r}"
        found[m.group(2)] = (m.group(1), m.group(3))
    return found


def test_check_passes_on_this_machine_and_names_the_mode(daemon_root: Path):
    proc = amberd("--check", "--state-dir", str(daemon_root / "state"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = check_lines(proc.stdout)
    for name in ("root", "kernel", "/dev/fuse", "bwrap", "setpriv", "state-dir", "free-space"):
        assert checks[name][0] == "ok", (name, proc.stdout)
    assert "mode: datalower" in checks["kernel"][1]
    assert "bubblewrap" in checks["bwrap"][1]
    # The probes leave nothing behind: no mount, nothing in /tmp.
    assert not any(p.name.startswith("amberd-check-") for p in Path("/tmp").iterdir())


def test_a_state_dir_under_a_0700_directory_is_refused_naming_it(daemon_root: Path):
    private = daemon_root / "private"
    private.mkdir(mode=0o700)
    d = Daemon(private)
    with pytest.raises(RuntimeError) as refused:
        d.start()
    assert f"exited with {EX_CONFIG}" in str(refused.value)
    log = d.log.read_text()
    assert f"amberd: cannot start: state-dir: {d.state}: {private} (mode 0700" in log, log
    assert f"chmod o+x {private}" in log
    assert not d.state.exists() and not d.socket.exists()  # refused before touching anything
    check = amberd("--check", "--state-dir", str(d.state))
    assert check.returncode == EX_CONFIG
    assert check_lines(check.stdout)["state-dir"][0] == "FAIL"

    # Search permission is all the sandbox needs: with it, builds run.
    private.chmod(0o711)
    d.start()
    try:
        spec = private / "spec.toml"
        spec.write_text(BUILD)
        code, report = d.build_json(spec)
        assert code == 0 and report["status"] == "success", (report, d.log.read_text()[-2000:])
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("missing", ["bwrap", "setpriv"])
def test_a_missing_tool_fails_with_its_name(daemon_root: Path, missing: str):
    tools = daemon_root / "bin"
    tools.mkdir()
    for name in ("bwrap", "setpriv", "setsid"):
        if name != missing:
            (tools / name).symlink_to(shutil.which(name))
    env = dict(os.environ, PATH=str(tools))
    check = amberd("--check", "--state-dir", str(daemon_root / "state"), env=env)
    assert check.returncode == EX_CONFIG, check.stdout
    checks = check_lines(check.stdout)
    assert (
        checks[missing][0] == "FAIL" and f"{missing} is not in amberd's PATH" in checks[missing][1]
    )
    assert [name for name, (status, _) in checks.items() if status == "FAIL"] == [missing]

    d = Daemon(daemon_root, extra_env={"PATH": str(tools)})
    with pytest.raises(RuntimeError) as refused:
        d.start()
    assert f"exited with {EX_CONFIG}" in str(refused.value)
    assert (
        f"amberd: cannot start: {missing}: {missing} is not in amberd's PATH" in d.log.read_text()
    )


def test_too_little_free_space_is_refused(daemon_root: Path):
    config = daemon_root / "amberd.toml"
    config.write_text('preflight-min-free = "1000000T"\n')
    d = Daemon(daemon_root)
    with pytest.raises(RuntimeError) as refused:
        d.start("--config", str(config))
    assert f"exited with {EX_CONFIG}" in str(refused.value)
    assert "cannot start: free-space: only " in d.log.read_text()
    assert "needs 1000000T to start (preflight-min-free)" in d.log.read_text()
    config.write_text("preflight-min-free = 0\n")
    check = amberd("--check", "--config", str(config), "--state-dir", str(d.state))
    assert check.returncode == 0, check.stdout


@contextlib.contextmanager
def ext4_image(where: Path, *mkfs_options: str) -> Iterator[Path]:
    """A small ext4 filesystem made with ``mkfs.ext4 OPTIONS``, loop-mounted at ``where``."""
    image = where.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(1536 << 20)  # sparse; above preflight-min-free (1G)
    subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs_options, str(image)], check=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        image.unlink()


def test_a_state_dir_on_ext4_without_a_journal_is_a_warning(daemon_root: Path):
    """Builds creating many files crawl there after deletions; the admin is told, not refused."""
    with ext4_image(daemon_root / "nojournal", "-O", "^has_journal") as fs:
        check = amberd("--check", "--state-dir", str(fs / "state"))
        assert check.returncode == 0, check.stdout
        status, sentence = check_lines(check.stdout)["state-fs"]
        assert status == "warn" and "without a journal" in sentence
        assert "tune2fs -O has_journal" in sentence
        d = Daemon(fs)
        d.start()
        d.stop()
        log = d.log.read_text()
        assert re.search(r"WARNING amber: preflight: state-fs: .* without a journal", log), log
    with ext4_image(daemon_root / "journal") as fs:
        check = amberd("--check", "--state-dir", str(fs / "state"))
        assert check.returncode == 0, check.stdout
        status, sentence = check_lines(check.stdout)["state-fs"]
        assert status == "ok" and "with a journal" in sentence


def test_check_as_another_user_fails_on_root_and_print_config_works(daemon_root: Path):
    as_user = ["setpriv", "--reuid", "4242", "--regid", "4242", "--clear-groups", AMBERD]
    state = str(daemon_root / "state")
    check = subprocess.run([*as_user, "--check", "--state-dir", state], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert check.returncode == EX_CONFIG and "Traceback" not in check.stderr, check.stderr
    checks = check_lines(check.stdout)
    assert checks["root"] == ("FAIL", "amberd must run as root (it mounts FUSE and overlay "
                              "filesystems and maps user namespaces)")  # fmt: skip
    assert checks["bwrap"][0] == "ok"
    printed = subprocess.run([*as_user, "--print-config", "--state-dir", state],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert printed.returncode == 0 and tomllib.loads(printed.stdout)["state-dir"] == state


def test_print_config_lists_every_option_and_round_trips(tmp_path: Path):
    given = tmp_path / "given.toml"
    given.write_text(
        'jobs = 3\nstop-grace = "90s"\nmirrors = ["file:///srv/mirror"]\n'
        'socket-group = "root"\nmin-free = "5G"\nkeep-failed-days = 2.5\nadmin-group = "root"\n'
    )
    first = amberd("--print-config", "--config", str(given), "--state-dir", "/srv/amber")
    assert first.returncode == 0, first.stderr
    text = first.stdout
    parsed = tomllib.loads(text)
    # every option, each set to its value; the remote cache's settings are their own table
    assert sorted(set(parsed) - {"cache"}) == sorted(OPTIONS)
    assert parsed["cache"]["pull"] == "lazy"
    for name, (_, _, help_text) in OPTIONS.items():
        assert len(re.findall(rf"^{re.escape(name)} = ", text, re.M)) == 1, name
        first_words = " ".join(help_text.split()[1:4])
        assert first_words in " ".join(text.split()), (name, first_words)
    assert parsed["jobs"] == 3 and parsed["state-dir"] == "/srv/amber"
    assert "# Default: 30s." not in text and '# Default: "30s".' in text  # what changed says so

    printed = tmp_path / "printed.toml"
    printed.write_text(text)
    assert load_config(printed) == load_config(given, {"state_dir": Path("/srv/amber")})
    again = amberd("--print-config", "--config", str(printed))
    assert again.returncode == 0, again.stderr
    assert again.stdout == text.replace(str(given), str(printed))


def test_print_config_of_the_defaults_loads_as_the_defaults(tmp_path: Path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    proc = amberd("--print-config", "--config", str(empty))
    assert proc.returncode == 0, proc.stderr
    assert "\n#socket-group = " in proc.stdout  # unset: no TOML value, so commented out
    assert "\n#admin-group = " in proc.stdout
    assert "# Default:" not in proc.stdout.replace("# Default: the number of CPUs", "")
    printed = tmp_path / "printed.toml"
    printed.write_text(proc.stdout)
    assert load_config(printed) == Config()
