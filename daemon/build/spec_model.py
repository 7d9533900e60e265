"""What a validated build spec is: the frozen dataclasses the daemon works with.

spec.py parses and checks a spec into these; nothing else builds them from
user input, so the rest of the daemon can trust their values (see spec.py).
"""

from __future__ import annotations

import functools
import glob
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

DEFAULT_WORKDIR = "/build"
DEFAULT_TIMEOUT = 3600.0

# Stamp patterns (see spec.py): spec_fields.py checks them, StampRule matches with them.
_PLACEHOLDER = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*|[1-9][0-9]*)\}")
_STAMP_TOKEN = re.compile(r"(\{[^{}/]*\}|\*)")


class SpecError(Exception):
    """A spec that cannot be built, with where to look and what is wrong."""

    def __init__(
        self, filename: str, key: str | None, problem: str, line: int | None = None
    ) -> None:
        # All fields go to args so the exception pickles and compares cleanly.
        super().__init__(filename, key, problem, line)
        self.filename = filename
        self.key = key
        self.problem = problem
        self.line = line

    def __str__(self) -> str:
        where = self.filename if self.line is None else f"{self.filename}:{self.line}"
        return f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"


# --------------------------------------------------------------------------- data


def _frozen_env(env: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only, key-sorted copy, so equal envs iterate and serialise alike."""
    return types.MappingProxyType(dict(sorted(env.items())))


@dataclass(frozen=True)
class Base:
    """The filesystem a build starts from.

    ``kind`` is one of "host", "dir", "oci", "tree", "image", "docker"; ``ref``
    is "" for host, an absolute host path for dir and oci, a lowercase digest
    for tree, the image name for image and a registry reference
    (``REGISTRY/REPO:TAG`` or ``REGISTRY/REPO@sha256:...``) for docker.
    """

    kind: Literal["host", "dir", "oci", "tree", "image", "docker"]
    ref: str = ""

    def __str__(self) -> str:
        """The spec's own spelling, which parses back to an equal Base."""
        if self.kind == "host":
            return "host"
        if self.kind == "docker":
            return f"docker://{self.ref}"
        return self.ref if self.kind == "image" else f"{self.kind}:{self.ref}"


@dataclass(frozen=True)
class Source:
    """One input copied into the tree before the first step.

    Exactly one of ``path`` (absolute host path, a file or a directory) and
    ``url`` is set. ``dest`` and ``stamp`` are absolute paths in the tree.
    Digests are lowercase hex; a url always has at least one.
    """

    dest: str
    path: Path | None = None
    url: str | None = None
    sha256: str | None = None
    blake3: str | None = None
    stamp: str | None = None

    def to_dict(self) -> dict[str, str]:
        """The source as spec keys; unset optional keys are left out."""
        return _sorted(
            {
                "dest": self.dest,
                "path": None if self.path is None else str(self.path),
                "url": self.url,
                "sha256": self.sha256,
                "blake3": self.blake3,
                "stamp": self.stamp,
            }
        )


@dataclass(frozen=True)
class Step:
    """One shell script run in the sandbox (``/bin/sh -ec run``).

    ``cwd`` is an absolute path in the tree (the workdir unless the spec
    says otherwise); ``env`` is the step's own variables, layered over the
    build's (see ``Spec.step_env``); ``timeout`` is in seconds.
    """

    name: str
    run: str
    cwd: str
    env: Mapping[str, str]
    timeout: float = DEFAULT_TIMEOUT
    network: bool = False
    user: Literal["build", "root"] = "build"

    def definition(self) -> dict[str, Any]:
        """What determines this step's result, for its key: sorted and plain.

        The build-level env, base, sources and key salt are inputs too; the
        key adds them from the spec (or the previous step's key).
        """
        return _sorted(
            {
                "name": self.name,
                "run": self.run,
                "cwd": self.cwd,
                "env": dict(self.env),
                "timeout": self.timeout,
                "network": self.network,
                "user": self.user,
            }
        )


@dataclass(frozen=True)
class StampRule:
    """A stamp pattern and the product globs it vouches for (module docstring).

    Both are relative to the workdir; ``covers`` always holds at least one
    pattern (the default is filled in at parse time, with ``*`` captures
    written as ``{1}``, ``{2}``...).
    """

    path: str
    covers: tuple[str, ...]

    def match_stamp(self, relpath: str | PurePosixPath) -> dict[str, str] | None:
        """Bindings when ``relpath`` (relative to workdir) is such a stamp, else None."""
        text = str(relpath)
        if any(part in ("", ".", "..") for part in text.split("/")):
            return None  # only plain normalised paths can be stamps
        match = _stamp_regex(self.path).fullmatch(text)
        if match is None:
            return None
        return {name.removeprefix("_"): value for name, value in match.groupdict().items()}

    def products_for(self, bindings: Mapping[str, str]) -> list[str]:
        """The covers globs with placeholders replaced (values glob-escaped)."""

        def fill(match: re.Match[str]) -> str:
            return glob.escape(bindings[match.group(1)])

        return [_PLACEHOLDER.sub(fill, pattern) for pattern in self.covers]

    def to_dict(self) -> dict[str, Any]:
        """The rule as spec keys."""
        return {"covers": list(self.covers), "path": self.path}


@dataclass(frozen=True)
class Spec:
    """A validated build spec; see the module docstring for the fields."""

    name: str
    steps: tuple[Step, ...]
    base: Base = Base("host")
    workdir: str = DEFAULT_WORKDIR
    env: Mapping[str, str] = field(default_factory=lambda: _frozen_env({}))
    output: str | None = None
    key_salt: str | None = None
    sources: tuple[Source, ...] = ()
    stamps: tuple[StampRule, ...] = ()

    def step_env(self, step: Step) -> dict[str, str]:
        """The variables a step runs with from the spec: build env, then step env."""
        return dict(sorted({**self.env, **step.env}.items()))

    def to_dict(self) -> dict[str, Any]:
        """A canonical, JSON- and msgpack-ready document with sorted keys.

        It has the shape of the TOML, with unset optional keys left out, and
        ``spec_from_dict`` turns it back into an equal Spec. Local source
        paths and dir:/oci: bases are absolute host paths here, so do not key
        caches on this whole dict: key steps on ``Step.definition()``.
        """
        build = {
            "name": self.name,
            "base": str(self.base),
            "workdir": self.workdir,
            "env": dict(self.env),
            "output": self.output,
            "key_salt": self.key_salt,
        }
        return _sorted(
            {
                "build": build,
                "source": [source.to_dict() for source in self.sources],
                "step": [step.definition() for step in self.steps],
                "stamp": [rule.to_dict() for rule in self.stamps],
            }
        )


def _sorted(value: Any) -> Any:
    """Dicts rebuilt with sorted keys and None values dropped, recursively."""
    if isinstance(value, Mapping):
        return {k: _sorted(v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


@functools.lru_cache(maxsize=256)
def _stamp_regex(path: str) -> re.Pattern[str]:
    """Compile a (validated) stamp pattern; ``*`` captures are groups ``_1``, ``_2``..."""
    out: list[str] = []
    seen: set[str] = set()
    stars = 0
    for token in _STAMP_TOKEN.split(path):
        if token == "*":
            stars += 1
            out.append(f"(?P<_{stars}>[^/]*)")
        elif token.startswith("{"):
            name = token[1:-1]
            out.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+)")
            seen.add(name)
        else:
            out.append(re.escape(token))
    return re.compile("".join(out))
