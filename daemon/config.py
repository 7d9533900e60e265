"""amberd's configuration: ``/etc/amber/amberd.toml``, then command-line flags.

Every option is declared once, as a field of ``Config`` carrying its
default, converter and help (``_option``); ``OPTIONS`` lists them by their
names in the file. Each is validated on load: a wrong type or an unknown
option is an error naming the option, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from amber.client.units import format_duration, format_size, parse_duration, parse_size
from amber.daemon.remote.config import EXAMPLE as CACHE_EXAMPLE
from amber.daemon.remote.config import CacheConfig, CacheConfigError, parse_cache, to_toml
from amber.sandbox.userns import DEFAULT_ID_BASE, RANGE_SIZE

DEFAULT_CONFIG = Path("/etc/amber/amberd.toml")


class ConfigError(ValueError):
    pass


def parse_fs_mode(text: str) -> str:
    """One of ``fsmode.CHOICES``: how build roots are mounted (see sandbox/fsmode.py)."""
    from amber.sandbox.fsmode import CHOICES

    if not isinstance(text, str) or text not in CHOICES:
        raise ValueError(f"expected one of {', '.join(CHOICES)}, got {text!r}")
    return text


def _option(conv: Any, help: str, *, default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A field that is an option of the file: its default, how a TOML value becomes it
    (``conv``), and the help that ``example_config`` and ``--print-config`` show."""
    return field(default=default, default_factory=factory, metadata={"option": (conv, help)})


@dataclass
class Config:
    state_dir: Path = _option(  # noqa: RUF009 (it returns a field)
        Path, "where the store, database and mounts live", default=Path("/var/lib/amber")
    )
    socket: Path = _option(  # noqa: RUF009 (it returns a field)
        Path,
        "the Unix socket clients connect to (under systemd amberd.socket decides the socket: "
        "its path, group and mode, and this option and the next two are not used)",
        default=Path("/run/amber/amberd.sock"),
    )
    socket_group: str | None = _option(
        str, "group owning the socket; members may use amber", default=None
    )
    socket_mode: int = _option(int, "permissions of the socket", default=0o660)
    admin_group: str | None = _option(
        str,
        "group whose members may, like root, run `amber gc` (other than --dry-run) and "
        "`amber store fsck --repair`, and write the shared images (`amber image import --shared`); "
        "unset: root only",
        default=None,
    )
    jobs: int = _option(
        int,
        "builds running at once; more wait in a queue",
        factory=lambda: max(2, os.cpu_count() or 2),
    )
    id_base: int = _option(
        int,
        "first host uid/gid of the sandbox id pool; the pool must not overlap /etc/subuid or "
        "/etc/subgid (amberd refuses to start if it does). The default, 0x70000000, is above "
        "shadow's subordinate-id allocations and systemd-nspawn's container ranges",
        default=DEFAULT_ID_BASE,
    )
    id_count: int = _option(
        int, "size of each range of the pool: ids one sandbox sees", default=RANGE_SIZE
    )
    id_ranges: int = _option(
        int,
        "ranges in the pool: every running build and shell holds its own, so no two share a "
        "host uid; one that finds none free errors (builds) or is refused as busy (shells)",
        default=256,
    )
    stop_grace: float = _option(
        parse_duration,
        "how long running steps may finish on SIGTERM before they are cancelled "
        "(errored, not cached)",
        default=30.0,
    )
    max_frame: int = _option(
        parse_size, "largest protocol frame amberd sends (a reply)", default=16 << 20
    )
    max_request_frame: int = _option(
        parse_size,
        "largest request frame amberd accepts from a client (at most max-frame); it bounds "
        "the memory one request can cost while it is decoded",
        default=1 << 20,
    )
    max_connections: int = _option(
        int,
        "connections open at once, all users together; more are refused with 'busy' "
        "(root's are never refused)",
        default=512,
    )
    max_connections_per_uid: int = _option(
        int,
        "connections one non-root uid may have open at once; more are refused with 'busy'",
        default=64,
    )
    hello_timeout: float = _option(
        parse_duration,
        "how long a new connection may take to send its hello, and a client the rest of a "
        "frame it started; amberd then hangs up (and closes descriptors sent with it)",
        default=10.0,
    )
    mirrors: list[str] = _option(  # noqa: RUF009 (it returns a field)
        list,
        "URL prefixes (http, https or file) tried in order before an http(s) source's own URL; "
        "a candidate is the prefix, '/' and the source URL's file name (the last segment of its "
        "path): https://m.example/pkgs + https://zlib.net/zlib-1.2.13.tar.gz -> "
        "https://m.example/pkgs/zlib-1.2.13.tar.gz",
        factory=list,
    )
    fetch_timeout: float = _option(
        parse_duration,
        "a download that sends nothing for this long is given up (a stall, not a total time); "
        "a build waiting for another build's download of the same content waits half as long "
        "for it to make progress, then fetches on its own",
        default=30.0,
    )
    source_max_size: int = _option(
        parse_size,
        "largest source (url download or local file) a build may bring in",
        default=64 << 30,
    )
    import_max_size: int = _option(
        parse_size,
        "largest image an import may unpack: a compressed archive decompressed, and all its "
        "layers' uncompressed bytes together",
        default=256 << 30,
    )
    keep_failed_days: float = _option(
        float, "frozen failures are kept from GC this long", default=14.0
    )
    keep_failed_per_spec: int = _option(int, "and at least this many per spec name", default=5)
    min_free: int = _option(
        parse_size, "run GC when free space drops below this (0: never)", default=0
    )
    max_free: int = _option(parse_size, "automatic GC frees space up to this", default=0)
    preflight_min_free: int = _option(
        parse_size,
        "least free space on the state directory's filesystem for amberd to start (below it "
        "amberd exits with status 78 and `amberd --check` fails; 0: no check)",
        default=1 << 30,
    )
    step_log_max: int = _option(
        parse_size,
        "most output kept of one step; the rest is dropped and the log ends with "
        "'log truncated at N bytes'",
        default=1 << 30,
    )
    step_memory_max: int = _option(
        parse_size,
        "memory one step may use (its cgroup's limit); a step the OOM killer stops is errored, "
        "never cached (0: half the machine's memory)",
        default=0,
    )
    step_pids_max: int = _option(
        int, "processes and threads one step may have at once", default=4096
    )
    step_timeout_max: float = _option(
        parse_duration,
        "longest timeout a step may ask for; a spec asking for more is refused",
        default=24 * 3600.0,
    )
    jobs_per_user: int = _option(
        int,
        "job slots one user's builds may hold at once, so that one user cannot starve another "
        "(0: half of jobs, rounded up)",
        default=0,
    )
    fs_mode: str = _option(
        parse_fs_mode,
        'how build roots are mounted: "datalower" (Linux 6.5+: overlayfs reads file data '
        'straight from the store, a data-only layer), "hidden-data" (the same speed: the '
        'store as a plain layer hidden by whiteouts), "fuse-data" (any kernel: the FUSE lower '
        'serves file data, slower) or "auto" (the first that a probe at start-up finds '
        "working); AMBER_FS_MODE in amberd's environment overrides it, and `amber status` "
        "shows the mode in use",
        default="auto",
    )
    #: The ``[cache]`` table: remotes shared with other hosts (daemon/remote/config.py).
    cache: CacheConfig = field(default_factory=CacheConfig)

    @property
    def user_jobs(self) -> int:
        """Job slots one uid may hold at once (``jobs-per-user``, 0: half of ``jobs``)."""
        return self.jobs_per_user or -(-self.jobs // 2)

    @property
    def mount_dir(self) -> Path:
        return self.state_dir / "mnt"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


#: Every option by its name in the file -> (attribute, converter, help).
OPTIONS: dict[str, tuple[str, Any, str]] = {
    f.name.replace("_", "-"): (f.name, *f.metadata["option"])
    for f in fields(Config)
    if "option" in f.metadata
}


def _convert(name: str, value: Any) -> Any:
    attr, conv, _ = OPTIONS[name]
    expected = {Path: str, str: str, int: int, float: (int, float), list: list}.get(conv)
    if isinstance(value, bool) or (expected is not None and not isinstance(value, expected)):
        kind = conv.__name__ if isinstance(conv, type) else "value"
        raise ConfigError(f"option {name!r}: expected {kind}, got {type(value).__name__} {value!r}")
    try:
        converted = conv(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"option {name!r}: {exc}") from None
    if attr == "mirrors" and not all(isinstance(m, str) for m in converted):
        raise ConfigError(f"option {name!r}: expected a list of URL strings")
    at_least_one = (
        "jobs",
        "id_count",
        "id_ranges",
        "step_pids_max",
        "max_connections",
        "max_connections_per_uid",
    )
    if attr in at_least_one and converted < 1:
        raise ConfigError(f"option {name!r}: must be at least 1")
    if attr == "id_base" and converted < 1:
        raise ConfigError(
            f"option {name!r}: must be at least 1 (0 would make sandbox root host root)"
        )
    problem = _out_of_range(attr, converted)
    if problem:
        raise ConfigError(f"option {name!r}: {problem}")
    return converted


def _out_of_range(attr: str, value: Any) -> str | None:
    """What is wrong with a value of the right type, if anything."""
    if isinstance(value, Path) and not value.is_absolute():
        return f"must be an absolute path, got {str(value)!r}"
    if attr == "socket_mode" and not 0 <= value <= 0o777:
        return f"must be permission bits between 0o000 and 0o777, got {value:#o}"
    if attr in ("socket_group", "admin_group"):
        import grp

        try:
            grp.getgrnam(value)
        except KeyError:
            return f"no group {value!r} on this host (create it: groupadd --system {value})"
    if attr == "step_log_max" and value < 4 << 10:
        return "must be at least 4K"
    if attr == "step_timeout_max" and value <= 0:
        return "must be more than 0"
    if attr in ("max_frame", "max_request_frame") and value < 64 << 10:
        return "must be at least 64K (a spec has to fit in a frame)"
    if attr in ("fetch_timeout", "source_max_size", "import_max_size") and value <= 0:
        return "must be more than 0"
    if attr == "hello_timeout" and not value > 0:
        return "must be more than 0s"
    non_negative = (
        "stop_grace",
        "keep_failed_days",
        "keep_failed_per_spec",
        "min_free",
        "max_free",
        "preflight_min_free",
        "step_memory_max",
        "jobs_per_user",
    )
    if attr in non_negative and value < 0:
        return "must not be negative"
    return None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (or the default file when it exists), then apply flags."""
    config = Config()
    source = path if path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if source is not None:
        try:
            data = tomllib.loads(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read it: {exc.strerror or exc}") from None
        for name, value in data.items():
            if name == "cache":
                try:
                    config.cache = parse_cache(value)
                except CacheConfigError as exc:
                    raise ConfigError(f"{source}: {exc}") from None
                continue
            if name not in OPTIONS:
                known = ", ".join(sorted(OPTIONS))
                raise ConfigError(f"{source}: unknown option {name!r} (known: {known})")
            try:
                setattr(config, OPTIONS[name][0], _convert(name, value))
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        if config.id_base + config.id_count * config.id_ranges > 1 << 32:
            raise ConfigError(
                f"{source}: options 'id-base' + 'id-count' * 'id-ranges' must end below 2^32"
            )
    for attr, value in (overrides or {}).items():
        if value is not None:
            setattr(config, attr, value)
    return config


# -- the example file -----------------------------------------------------------

EXAMPLE_HEADER = """\
# /etc/amber/amberd.toml: amberd's configuration (TOML).
#
# Every option is listed with its default value, commented out: uncomment a
# line to change it. Sizes take K, M, G, T, P (10G, 512KiB), durations d, h, m or
# min, s (90s, 10min, 1h30m).
# An unknown option or a value of the wrong type stops amberd at start-up with
# an error naming the option. Flags given to amberd override this file.
#
# Generated by amber.daemon.config.example_config(); a test keeps the copy in
# systemd/amberd.toml.example the same.
"""

# Options whose default cannot be written as a value: an illustration instead.
_EXAMPLE_STANDINS = {
    "socket-group": ('"amber"', "none (the socket keeps root's group)"),
    "admin-group": ('"amber-admin"', "none (only root collects and repairs)"),
    "jobs": ("4", "the number of CPUs, at least 2"),
}


def example_config() -> str:
    """A config file documenting every option in ``OPTIONS``, each commented out."""
    defaults = Config()
    parts = [EXAMPLE_HEADER]
    for name, (attr, conv, text) in OPTIONS.items():
        lines = _help_lines(text)
        if name in _EXAMPLE_STANDINS:
            value, default = _EXAMPLE_STANDINS[name]
            lines.append(f"Default: {default}.")
        else:
            value = _toml_value(name, conv, getattr(defaults, attr))
        parts.append("\n".join(f"# {line}" for line in lines) + f"\n#{name} = {value}\n")
    parts.append(CACHE_EXAMPLE)
    return "\n".join(parts)


CURRENT_HEADER = """\
# amberd's configuration as it would run (amberd --print-config): the
# defaults, then the config file, then the flags given.
# Config file: {source}
#
# Valid as /etc/amber/amberd.toml: amberd reads this back unchanged.
# Sizes take K, M, G, T, P (10G, 512KiB), durations d, h, m or min, s (90s,
# 10min, 1h30m).
"""


def current_config(config: Config, source: str) -> str:
    """``amberd --print-config``: every option in ``OPTIONS`` with its value in ``config``.

    Each is set (uncommented) unless its value has no TOML form (an unset
    ``socket-group``); the default follows the help where the value differs.
    """
    defaults = Config()
    parts = [CURRENT_HEADER.format(source=source)]
    for name, (attr, conv, text) in OPTIONS.items():
        lines = _help_lines(text)
        value = getattr(config, attr)
        default = getattr(defaults, attr)
        if value is None:
            lines.append(f"Not set: {_EXAMPLE_STANDINS[name][1]}.")
            setting = f"#{name} = {_EXAMPLE_STANDINS[name][0]}"
        else:
            setting = f"{name} = {_toml_value(name, conv, value)}"
            if value != default:
                shown = (
                    _EXAMPLE_STANDINS[name][1]
                    if name in _EXAMPLE_STANDINS
                    else _toml_value(name, conv, default)
                )
                lines.append(f"Default: {shown}.")
        parts.append("\n".join(f"# {line}" for line in lines) + f"\n{setting}\n")
    parts.append(to_toml(config.cache))  # a table: after every plain option
    return "\n".join(parts)


def _help_lines(text: str) -> list[str]:
    """An option's help as a sentence, wrapped for a ``#`` comment."""
    import textwrap

    sentence = text[:1].upper() + text[1:] + "."
    return textwrap.wrap(sentence, 76, break_long_words=False, break_on_hyphens=False)


def _toml_value(name: str, conv: Any, value: Any) -> str:
    import json

    if conv is parse_duration:
        return f'"{format_duration(value)}"'
    if conv is parse_size:
        return f'"{format_size(value)}"' if value % 1024 == 0 and value else str(value)
    if name == "socket-mode":
        return f"0o{value:o}"
    if isinstance(value, Path | str | list):
        return json.dumps(value if not isinstance(value, Path) else str(value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    raise TypeError(f"option {name!r}: no TOML form for its default {value!r}")
