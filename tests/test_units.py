"""One grammar for sizes and durations: the CLI, amberd's config and specs agree.

Each string is read by every parser that takes that kind of value, through
its real entry point (argparse for ``amber``, ``load_config`` for the config
file, ``parse_spec`` for a spec), so a parser with a grammar of its own fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amber.client.cli import build_parser
from amber.client.units import (
    format_duration,
    format_size,
    human_bytes,
    parse_duration,
    parse_size,
)
from amber.daemon.build.spec import SpecError, parse_spec
from amber.daemon.config import ConfigError, load_config

SIZES = [
    ("1P", 1 << 50),
    ("512KiB", 512 << 10),
    ("10G", 10 << 30),
    ("500M", 500 << 20),
    ("1.5g", 3 << 29),
    ("2KB", 2048),
    ("1TB", 1 << 40),
    ("4096", 4096),
    ("7B", 7),
    (" 3 M ", 3 << 20),
]
BAD_SIZES = ["", "G", "10X", "-1G", "ten", "nan", "1.G", "10GG", "1e3"]

DURATIONS = [
    ("10min", 600.0),
    ("1h30m", 5400.0),
    ("90s", 90.0),
    ("10m", 600.0),
    ("1.5h", 5400.0),
    ("2d", 172800.0),
    ("1h2m3s", 3723.0),
    ("1d1h1min1s", 90061.0),
    (" 2m ", 120.0),
]
BAD_DURATIONS = ["", "10", "m", "10x", "1m1h", "1h 30m", "-5s", "1.m", "10mm", "1s1s", "5sec"]


def cli_size(text: str) -> int:
    return build_parser().parse_args(["gc", f"--max-freed={text}"]).max_freed


def config_size(text: str, tmp_path: Path) -> int:
    (tmp_path / "amberd.toml").write_text(f'min-free = "{text}"\n')
    return load_config(tmp_path / "amberd.toml").min_free


def config_duration(text: str, tmp_path: Path) -> float:
    (tmp_path / "amberd.toml").write_text(f'stop-grace = "{text}"\n')
    return load_config(tmp_path / "amberd.toml").stop_grace


def spec_duration(text: str, tmp_path: Path) -> float:
    spec = f'[build]\nname = "x"\n\n[[step]]\nname = "s"\nrun = "true"\ntimeout = "{text}"\n'
    return parse_spec(spec, "spec.toml", tmp_path).steps[0].timeout


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_sizes_read_the_same_everywhere(text: str, size: int, tmp_path: Path) -> None:
    assert parse_size(text) == size
    assert cli_size(text) == size
    assert config_size(text, tmp_path) == size


@pytest.mark.parametrize("text", BAD_SIZES)
def test_bad_sizes_refused_everywhere(text: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)
    with pytest.raises(SystemExit):
        cli_size(text)
    assert "invalid size" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"min-free.*invalid size"):
        config_size(text, tmp_path)


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_durations_read_the_same_everywhere(text: str, seconds: float, tmp_path: Path) -> None:
    assert parse_duration(text) == seconds
    assert config_duration(text, tmp_path) == seconds
    assert spec_duration(text, tmp_path) == seconds


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_bad_durations_refused_everywhere(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)
    with pytest.raises(ConfigError, match=r"stop-grace.*invalid duration"):
        config_duration(text, tmp_path)
    with pytest.raises(SpecError, match=r"timeout.*duration"):
        spec_duration(text, tmp_path)


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1536, 16 << 20, 5 << 40, 1 << 50, 3 << 51])
def test_format_size_reads_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("seconds", [0.0, 0.5, 2.5, 30.0, 90.0, 600.0, 5400.0, 90061.0])
def test_format_duration_reads_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_written_forms() -> None:
    assert format_size(16 << 20) == "16M"
    assert format_size(1536) == "1536"
    assert format_duration(5400) == "1h30m"
    assert format_duration(30) == "30s"
    assert human_bytes(1536) == "1.5 KiB"
