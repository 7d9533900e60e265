"""What amberd needs from this machine, checked before it serves anything.

``amberd --check`` prints every check; ``amberd`` runs the same checks at
start-up and refuses to start (exit 78, EX_CONFIG) on the first machine that
lacks something, with a sentence saying what and how to fix it, instead of
starting fine and then erroring every build with a message from deep inside
bwrap or the kernel.

The kernel check reports which way build roots are mounted here
(``amber.sandbox.fsmode.detect_fs_mode``: ``datalower`` on Linux 6.5 and
later, ``hidden-data`` or ``fuse-data`` before, as probed or as ``fs-mode``
and ``AMBER_FS_MODE`` force), the same mode amberd then uses, and fails
when there is none.

Probes that mount or change identity run in a forked child: the mounts in a
private mount namespace that dies with it, the identity changes never
touching the daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from amber.daemon.config import Config
from amber.sandbox.fsmode import FsMode, FsModeError, detect_fs_mode
from amber.sandbox.sandboxspec import BUILD_UID

#: The host programs the sandbox runner starts, and the package holding each.
TOOLS = (("bwrap", "bubblewrap"), ("setpriv", "util-linux"), ("setsid", "util-linux"))


@dataclass(frozen=True)
class Check:
    """One line of ``amberd --check``: what was checked, whether it passed, a sentence."""

    name: str
    ok: bool
    message: str
    #: Passes, but something here will make builds slow: said at start-up too.
    warn: bool = False

    def line(self) -> str:
        status = "FAIL" if not self.ok else "warn" if self.warn else "ok"
        return f"{status:<5} {self.name}: {self.message}"


@dataclass(frozen=True)
class Report:
    checks: list[Check]
    #: How build roots are mounted on this kernel (``fsmode.py``); None: no way.
    root_mode: str | None
    #: The same, with the reason ``amber status`` shows.
    fs_mode: FsMode | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.ok and c.warn]


def run_checks(config: Config, fs_mode: FsMode | FsModeError | None = None) -> Report:
    """Every check, in the order ``amberd --check`` prints them.

    ``fs_mode``: what ``detect_fs_mode`` gave (its error included), if the
    caller has asked already; else it is asked here. Forks: call it before
    trio starts (or any thread does).
    """
    is_root = os.geteuid() == 0
    checks = [
        Check(
            "root",
            is_root,
            "amberd runs as root"
            if is_root
            else "amberd must run as root (it mounts FUSE and overlay filesystems and maps "
            "user namespaces)",
        )
    ]
    mode = None
    if is_root:
        kernel, mode = _check_kernel(config, fs_mode)
        checks.append(kernel)
    else:
        checks.append(_needs_root("kernel"))
    checks.append(_check_fuse())
    checks += [_check_tool(name, package) for name, package in TOOLS]
    checks.append(check_subordinate_ids(config))
    checks.append(_check_traversable(config) if is_root else _needs_root("state-dir"))
    checks.append(_check_free_space(config))
    checks.append(_check_state_filesystem(config))
    if config.cache.registry_auth_file is not None:
        checks.append(_check_registry_auth(config.cache.registry_auth_file))
    return Report(checks, mode.name if mode is not None else None, mode)


def _check_registry_auth(path: Path) -> Check:
    """amberd's own registry logins: root's alone, and an auth.json (remote/credentials.py)."""
    from amber.daemon.remote.credentials import CredentialsError, load_auth_file

    try:
        found = load_auth_file(path)
    except CredentialsError as exc:
        return Check("registry-auth-file", False, str(exc))
    hosts = ", ".join(sorted(found)) or "none"
    return Check("registry-auth-file", True, f"{path}: logins for {hosts}")


def _needs_root(name: str) -> Check:
    return Check(name, False, "needs root to check")


# -- the kernel: how build roots can be mounted ------------------------------------


def _check_kernel(
    config: Config, found: FsMode | FsModeError | None
) -> tuple[Check, FsMode | None]:
    """The kernel line: the mode amberd mounts build roots in, or why there is none."""
    kernel = f"Linux {os.uname().release}"
    if found is None:
        try:
            found = detect_fs_mode(config.fs_mode)
        except FsModeError as exc:
            found = exc
    if isinstance(found, FsModeError):
        return Check("kernel", False, f"{kernel}: {found}"), None
    return Check("kernel", True, f"{kernel}: mode: {found.name} ({found.reason})"), found


def _in_child(work: Callable[[], object]) -> str | None:
    """Run ``work`` in a forked child; None when it returned, else its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into the daemon's code
        status = 0
        try:
            os.close(read_end)
            result = work()
            if isinstance(result, str):
                os.write(write_end, result.encode())
                status = 1
        except BaseException as exc:  # everything becomes the report
            os.write(write_end, (str(exc) or type(exc).__name__).encode()[:4096])
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        said = reader.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return said or f"the check's process ended with status {os.waitstatus_to_exitcode(status)}"


# -- devices and programs ----------------------------------------------------------


def _check_fuse() -> Check:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Check("/dev/fuse", False, "missing: load the fuse module (modprobe fuse)")
    except PermissionError:
        return Check(
            "/dev/fuse",
            False,
            "cannot open it: permission denied (in a container it must be passed in; "
            "under systemd the unit needs DeviceAllow=/dev/fuse rw)",
        )
    except OSError as exc:
        return Check("/dev/fuse", False, f"cannot open it: {exc.strerror or exc}")
    os.close(fd)
    return Check("/dev/fuse", True, "opens for reading and writing")


def _check_tool(name: str, package: str) -> Check:
    """Found the way the sandbox runner finds it: in amberd's PATH."""
    path = shutil.which(name)
    if path is None:
        search = os.environ.get("PATH", os.defpath)
        return Check(name, False, f"{name} is not in amberd's PATH ({search}): install {package}")
    if name != "bwrap":
        return Check(name, True, path)
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(name, False, f"{path} does not run: {exc}")
    if done.returncode != 0:
        return Check(name, False, f"{path} --version failed: {done.stderr.strip()}")
    return Check(name, True, f"{path} ({done.stdout.strip()})")


# -- the sandbox id pool ----------------------------------------------------------

#: Files listing the host ids users may map with newuidmap/newgidmap.
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


def check_subordinate_ids(config: Config, files: tuple[Path, ...] = SUBID_FILES) -> Check:
    """The sandbox id pool must not overlap any user's subordinate ids.

    A user owning ids the sandboxes run as could enter them with newuidmap
    and signal, ptrace or write into other users' build steps.
    """
    base, end = config.id_base, config.id_base + config.id_count * config.id_ranges
    pool = f"{base}..{end - 1} (id-base {base}, id-count {config.id_count} x id-ranges {config.id_ranges})"
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError as exc:
            return Check("id-pool", False, f"cannot read {path}: {exc.strerror or exc}")
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.strip().split(":")
            if len(fields) != 3 or not (fields[1].isdigit() and fields[2].isdigit()):
                continue  # blank, a comment, or not an allocation newuidmap would accept
            start, count = int(fields[1]), int(fields[2])
            if start < end and base < start + count:
                return Check(
                    "id-pool",
                    False,
                    f"{path} line {number} ({line.strip()}) overlaps the sandbox id pool {pool}: "
                    f"user {fields[0]} could become a sandbox's host ids with newuidmap. Choose an "
                    "id-base whose pool lies outside every subordinate id range",
                )
    return Check("id-pool", True, f"sandbox ids {pool} overlap no /etc/subuid or /etc/subgid range")


# -- the state directory -----------------------------------------------------------


def sandbox_host_ids(config: Config) -> list[int]:
    """The host uids (and gids) bwrap starts as: the sandbox's root and build user."""
    ids = [config.id_base]
    if config.id_count > BUILD_UID:
        ids.append(config.id_base + BUILD_UID)
    return ids


def _prefixes(path: Path) -> Iterator[str]:
    """``/``, ``/a``, ``/a/b``... for ``/a/b/c``: the directories above ``path``."""
    parts = path.parts
    for i in range(1, len(parts)):
        yield str(Path(*parts[:i]))


def _check_traversable(config: Config) -> Check:
    """bwrap resolves each build's root (``STATE/mnt/...``) as the sandbox's host uid.

    amberd makes the state directory and ``mnt`` 0711 itself; the
    directories above it are the admin's, and amberd does not loosen them.
    """
    state = Path(os.path.abspath(config.state_dir))
    paths = list(_prefixes(state))
    real = Path(os.path.realpath(state))
    if real != state:  # a symlinked state directory: its target's parents count too
        paths += [p for p in _prefixes(real) if p not in paths]
    existing = [p for p in paths if os.path.isdir(p)]
    ids = sandbox_host_ids(config)
    for uid in ids:
        blocked = _in_child(lambda uid=uid: _first_untraversable(uid, existing))
        if blocked is not None:
            return Check("state-dir", False, _untraversable_sentence(config, state, uid, blocked))
    who = " and ".join(str(i) for i in ids)
    return Check(
        "state-dir", True, f"{state}: the sandbox's host uids ({who}) can reach builds below it"
    )


def _first_untraversable(uid: int, paths: list[str]) -> str | None:
    """In a child: become ``uid`` as bwrap does (setpriv --clear-groups), try each path."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    for path in paths:
        if not os.access(path, os.X_OK):
            return path
    return None


def _untraversable_sentence(config: Config, state: Path, uid: int, blocked: str) -> str:
    if not blocked.startswith("/"):  # the probe itself failed: say what it said
        return f"{state}: cannot check whether host uid {uid} can reach it: {blocked}"
    try:
        st = os.stat(blocked)
        detail = f"mode {st.st_mode & 0o7777:04o}, owner uid {st.st_uid}"
    except OSError as exc:
        detail = exc.strerror or str(exc)
    return (
        f"{state}: {blocked} ({detail}) is not traversable by host uid {uid}, which every "
        f"build step's sandbox starts as (id-base {config.id_base}); bwrap could not reach "
        f"the build's root below it and every build would be errored. "
        f"Let others traverse it (chmod o+x {blocked}) or choose a state directory outside it"
    )


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_free_space(config: Config) -> Check:
    where = _existing_ancestor(config.state_dir)
    try:
        st = os.statvfs(where)
    except OSError as exc:
        return Check("free-space", False, f"cannot check {where}: {exc.strerror or exc}")
    free = st.f_bavail * st.f_frsize
    need = config.preflight_min_free
    said = f"{format_size(free)} free on the filesystem of {where}"
    if free < need:
        return Check(
            "free-space",
            False,
            f"only {said}; amberd needs {format_size(need)} to start (preflight-min-free). "
            "Free some space, or start with preflight-min-free = 0 in the config and run "
            "`amber gc`",
        )
    return Check("free-space", True, f"{said} (preflight-min-free {format_size(need)})")


def _check_state_filesystem(config: Config) -> Check:
    """ext4 without a journal makes file creation slow for minutes after deletions.

    In no-journal mode ext4 will not reuse an inode deleted less than a
    minute ago (five when its inode table block is still dirty), and finds
    that out by walking the group's free inodes one buffer lookup at a time,
    from the group's start, on every file it creates. amberd deletes each
    build's upper directory when the build ends, in the same inode groups
    the next build's upper gets, so a step creating 20,000 files after one
    that did took 15 s instead of 1 s here (issue 14; README "Benchmarks").
    """
    where = _existing_ancestor(config.state_dir)
    device, journal = ext4_journal(where)
    if device is None:
        return Check("state-fs", True, f"{where} is not on ext4 (no ext4 no-journal slowdown)")
    if journal:
        return Check("state-fs", True, f"{where} is on ext4 ({device}) with a journal")
    return Check(
        "state-fs",
        True,
        f"{where} is on ext4 ({device}) without a journal: after a build deletes many files, "
        "creating files there is up to 15x slower for the next minutes (ext4 walks past every "
        "recently deleted inode on each create). Add a journal (tune2fs -O has_journal, "
        "unmounted) or put the state directory on another filesystem",
        warn=True,
    )


def ext4_journal(path: Path) -> tuple[str | None, bool]:
    """(block device name, has a journal) when ``path`` is on ext4; (None, False) if not."""
    device = _block_device_name(path)
    ext4 = Path("/sys/fs/ext4") / device if device else None
    if device is None or ext4 is None or not ext4.is_dir():
        return None, False
    try:
        return device, (ext4 / "journal_task").read_text().strip() != "<none>"
    except OSError:  # older kernels: jbd2 lists the journals it runs
        return device, any(Path("/proc/fs/jbd2").glob(f"{device}-*"))


def _block_device_name(path: Path) -> str | None:
    """The kernel's name of the block device holding ``path`` (``vda``, ``loop0``), if any."""
    try:
        dev = os.stat(path).st_dev
        real = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    except OSError:
        return None
    return os.path.basename(real) if os.path.exists(real) else None


def format_size(size: int) -> str:
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            return f"{size // scale}{unit}" if size % scale == 0 else f"{size / scale:.1f}{unit}"
    return f"{size}B"
