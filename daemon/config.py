"""amberd's configuration: ``/etc/amber/amberd.toml``, then command-line flags.

Every option is documented in ``OPTIONS`` and validated on load; a wrong
type or an unknown option is an error naming the option, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/amber/amberd.toml")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


class ConfigError(ValueError):
    pass


def parse_size(text: str | int) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"expected a size like 10G or 500M, got {text!r}")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def parse_seconds(text: str | int | float) -> float:
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    m = _DURATION.match(str(text).strip())
    if not m or not any(m.groups()):
        raise ValueError(f"expected a duration like 30s, 10m or 1h, got {text!r}")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


@dataclass
class Config:
    state_dir: Path = field(default_factory=lambda: Path("/var/lib/amber"))
    socket: Path = field(default_factory=lambda: Path("/run/amber/amberd.sock"))
    socket_group: str | None = None
    socket_mode: int = 0o660
    jobs: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))
    id_base: int = 100_000
    id_count: int = 65_536
    stop_grace: float = 30.0
    max_frame: int = 16 << 20
    mirrors: list[str] = field(default_factory=list)
    keep_failed_days: float = 14.0
    keep_failed_per_spec: int = 5
    min_free: int = 0
    max_free: int = 0

    @property
    def mount_dir(self) -> Path:
        return self.state_dir / "mnt"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


# option name in the file -> (attribute, converter, help)
OPTIONS: dict[str, tuple[str, Any, str]] = {
    "state-dir": ("state_dir", Path, "where the store, database and mounts live"),
    "socket": ("socket", Path, "the Unix socket clients connect to"),
    "socket-group": ("socket_group", str, "group owning the socket; members may use amber"),
    "socket-mode": ("socket_mode", int, "permissions of the socket (e.g. 0o660)"),
    "jobs": ("jobs", int, "builds running at once; more wait in a queue"),
    "id-base": ("id_base", int, "first host uid/gid of the range sandbox ids map onto"),
    "id-count": ("id_count", int, "size of that range"),
    "stop-grace": ("stop_grace", parse_seconds, "how long running steps may finish on SIGTERM"),
    "max-frame": ("max_frame", parse_size, "largest protocol frame accepted"),
    "mirrors": ("mirrors", list, "URL prefixes tried in order before a source's own URL"),
    "keep-failed-days": ("keep_failed_days", float, "frozen failures are kept from GC this long"),
    "keep-failed-per-spec": ("keep_failed_per_spec", int, "and at least this many per spec name"),
    "min-free": ("min_free", parse_size, "run GC when free space drops below this (0: never)"),
    "max-free": ("max_free", parse_size, "automatic GC frees space up to this"),
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
    if attr in ("jobs", "id_count") and converted < 1:
        raise ConfigError(f"option {name!r}: must be at least 1")
    if attr == "id_base" and converted < 1:
        raise ConfigError(
            f"option {name!r}: must be at least 1 (0 would make sandbox root host root)"
        )
    return converted


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (or the default file when it exists), then apply flags."""
    config = Config()
    source = path if path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if source is not None:
        try:
            data = tomllib.loads(Path(source).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        for name, value in data.items():
            if name not in OPTIONS:
                known = ", ".join(sorted(OPTIONS))
                raise ConfigError(f"{source}: unknown option {name!r} (known: {known})")
            setattr(config, OPTIONS[name][0], _convert(name, value))
    for attr, value in (overrides or {}).items():
        if value is not None:
            setattr(config, attr, value)
    assert {f.name for f in fields(Config)} >= {a for a, _, _ in OPTIONS.values()}
    return config
