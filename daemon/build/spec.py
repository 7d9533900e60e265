"""Build specs: a TOML file parsed and validated into frozen dataclasses.

A spec is untrusted user input that decides what runs and what gets cached,
so everything is checked here, once, and the rest of the daemon only sees
normalised values: paths in the build's tree are absolute POSIX strings that
cannot leave the tree, host paths are absolute, durations are float seconds.
Errors name the file, the line where we can find it, and the key path,
e.g. ``spec.toml:14: step[2].timeout: expected a duration like "10m", got 0``
(array indexes in key paths count from 1, like the ``[[step]]`` tables).

Tables (see issues 3 and 5)::

    [build]     name, base = "host" | "dir:PATH" | "oci:PATH" | "tree:DIGEST" | IMAGE,
                workdir = "/build", env = {}, output, key_salt
    [[source]]  path | url, dest, sha256, blake3, stamp
    [[step]]    name, run, cwd, env, timeout = "1h", network = false, user = "build" | "root"
    [[stamp]]   path, covers

Tree paths (``dest``, ``stamp``, ``cwd``, ``output``) are relative to
``workdir`` unless absolute; host paths (``path``, ``dir:``, ``oci:``) are
relative to the spec's folder. Local sources must exist when the spec is
read; base paths are left for the daemon to check when it imports them.

Stamp rules pair a stamp file with the products it vouches for, so that the
two enter a build together or not at all. Both patterns are relative to
``workdir`` (an absolute pattern must lie inside it) and never use ``..``:

- ``path`` matches stamp files. ``{name}`` matches one or more characters
  other than ``/`` and binds them to ``name`` (a second ``{name}`` must match
  the same text); ``*`` matches any run of characters other than ``/``
  (a leading dot included) and binds them to ``"1"``, ``"2"``... in order.
  No other glob syntax.
- ``covers`` is a glob (or a list of globs) for the products, where
  ``{name}`` and ``{1}``... are replaced by what ``path`` bound. It defaults
  to the directory that holds the stamp.

Examples::

    [[stamp]]                          # packages/.zlib-1.2.13_verify vouches
    path = "packages/.{name}_verify"   # for packages/zlib-1.2.13.tar.*
    covers = "packages/{name}.tar.*"

    [[stamp]]                          # build/zlib/.configured vouches for
    path = "build/*/.configured"       # build/zlib (covers = "build/{1}")
"""

from __future__ import annotations

import difflib
import functools
import glob
import json
import math
import os
import re
import stat
import tomllib
import types
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from amber.client.units import parse_duration

__all__ = [
    "Base",
    "Source",
    "Spec",
    "SpecError",
    "StampRule",
    "Step",
    "load_spec",
    "parse_duration",
    "parse_spec",
    "spec_from_dict",
]

DEFAULT_WORKDIR = "/build"
DEFAULT_TIMEOUT = 3600.0

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_IMAGE = re.compile(r"[A-Za-z0-9._/-]+")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_URL_SCHEMES = ("http", "https", "file")


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

    ``kind`` is one of "host", "dir", "oci", "tree", "image"; ``ref`` is ""
    for host, an absolute host path for dir and oci, a lowercase digest for
    tree and the image name for image.
    """

    kind: Literal["host", "dir", "oci", "tree", "image"]
    ref: str = ""

    def __str__(self) -> str:
        """The spec's own spelling, which parses back to an equal Base."""
        if self.kind == "host":
            return "host"
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


# --------------------------------------------------------------------------- entry points


def load_spec(path: Path) -> Spec:
    """Read and validate the spec at ``path``; relative paths in it are relative to its folder.

    Raises:
        SpecError: the file cannot be read, is not TOML, or is not a valid spec.
    """
    filename = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(filename, None, f"cannot read spec: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(filename, None, f"not UTF-8 text: {exc}") from exc
    return parse_spec(text, filename, Path(path).parent)


def parse_spec(text: str, filename: str, base_dir: Path) -> Spec:
    """Validate spec ``text``; ``filename`` is for messages, ``base_dir`` anchors local paths.

    Raises:
        SpecError: the text is not TOML or not a valid spec.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        raise SpecError(filename, None, f"invalid TOML: {exc}", line) from exc
    return spec_from_dict(document, filename, base_dir, text)


def spec_from_dict(
    document: Mapping[str, Any], filename: str, base_dir: Path, text: str = ""
) -> Spec:
    """Validate an already decoded spec document (TOML, or ``Spec.to_dict`` sent over the wire).

    ``text``, when given, is the source the document came from, used only to
    find line numbers for messages.

    Raises:
        SpecError: the document is not a valid spec.
    """
    doc = _Doc(filename, Path(os.path.abspath(base_dir)), _Lines(text))
    top = _Table(doc, document, _Where(None), {"build", "source", "step", "stamp"})
    build = _parse_build(top.table("build", required=True), doc)
    sources = tuple(_parse_source(t, doc, build.workdir) for t in top.array("source"))
    _check_unique_dests(sources, doc)
    steps = tuple(_parse_step(t, doc, build.workdir) for t in top.array("step"))
    if not steps:
        raise doc.error(_Where("step"), None, "at least one [[step]] is required")
    _check_unique_names(steps, doc)
    stamps = tuple(_parse_stamp_rule(t, doc, build.workdir) for t in top.array("stamp"))
    return Spec(
        name=build.name,
        steps=steps,
        base=build.base,
        workdir=build.workdir,
        env=build.env,
        output=build.output,
        key_salt=build.key_salt,
        sources=sources,
        stamps=stamps,
    )


# --------------------------------------------------------------------------- reading tables


@dataclass(frozen=True)
class _Where:
    """Which table a value lives in: ``step`` number 2 is ``_Where("step", 2)``."""

    table: str | None
    index: int | None = None

    def key_path(self, key: str | None) -> str | None:
        """The dotted name used in messages, e.g. ``step[2].timeout``."""
        head = self.table if self.index is None else f"{self.table}[{self.index}]"
        parts = [part for part in (head, key) if part]
        return ".".join(parts) or None


@dataclass(frozen=True)
class _Doc:
    """What every check needs to report an error or resolve a local path."""

    filename: str
    base_dir: Path
    lines: _Lines

    def error(self, where: _Where, key: str | None, problem: str) -> SpecError:
        keys = key.split(".") if key else []
        line = self.lines.find(where.table, where.index, keys)
        return SpecError(self.filename, where.key_path(key), problem, line)


class _Table:
    """One TOML table being read: unknown keys are refused up front, reads are typed."""

    def __init__(self, doc: _Doc, data: Any, where: _Where, allowed: set[str]) -> None:
        if not isinstance(data, Mapping):
            raise doc.error(where, None, f"expected a table, got {_show(data)}")
        self.doc, self.data, self.where = doc, data, where
        for key in data:
            if key not in allowed:  # str(): a document off the wire may have other keys
                raise self.error(str(key), f"unknown key{_did_you_mean(str(key), allowed)}")

    def error(self, key: str | None, problem: str) -> SpecError:
        return self.doc.error(self.where, key, problem)

    def value(self, key: str, expected: type | tuple[type, ...], what: str) -> Any:
        """The value at ``key`` if present (else None), checked against ``expected``."""
        value = self.data.get(key)
        if value is None:
            return None
        # bool is a subclass of int: `timeout = true` must not mean one second.
        wrong_bool = isinstance(value, bool) and bool not in _as_tuple(expected)
        if wrong_bool or not isinstance(value, expected):
            raise self.error(key, f"expected {what}, got {_show(value)}")
        return value

    def string(self, key: str, *, required: bool = False, default: str | None = None) -> Any:
        """A string without NUL bytes (they cannot reach argv, env or paths)."""
        value = self.value(key, str, "a string")
        if value is None:
            if required:
                raise self.error(key, "missing required key")
            return default
        if "\0" in value:
            raise self.error(key, "contains a NUL byte")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.value(key, bool, "a boolean (true or false)")
        return default if value is None else value

    def env(self, key: str) -> Mapping[str, str]:
        """A table of environment variables, name to string value."""
        table = self.value(key, Mapping, "a table of strings")
        if table is None:
            return _frozen_env({})
        for name, value in table.items():
            where = f"{key}.{name}"
            if not isinstance(value, str):
                raise self.error(where, f"expected a string, got {_show(value)}")
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                raise self.error(where, "not a valid environment variable name")
            if "\0" in value:
                raise self.error(where, "contains a NUL byte")
        return _frozen_env(table)

    def table(self, key: str, *, required: bool = False) -> Any:
        value = self.value(key, Mapping, "a table")
        if value is None and required:
            raise self.error(key, f"missing required table [{key}]")
        return value

    def array(self, key: str) -> list[_Located]:
        """An array of tables such as ``[[step]]``, each with its 1-based position."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of tables ([[{key}]]), got {_show(value)}")
        return [_Located(item, _Where(key, number)) for number, item in enumerate(value, 1)]


@dataclass(frozen=True)
class _Located:
    """A raw table from an array, with where it sits."""

    data: Any
    where: _Where


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML, or its kind when that would be long."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def _did_you_mean(key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


# --------------------------------------------------------------------------- [build]


@dataclass(frozen=True)
class _Build:
    name: str
    base: Base
    workdir: str
    env: Mapping[str, str]
    output: str | None
    key_salt: str | None


def _parse_build(data: Any, doc: _Doc) -> _Build:
    allowed = {"name", "base", "workdir", "env", "output", "key_salt"}
    table = _Table(doc, data, _Where("build"), allowed)
    name = _check_name(table, "name", table.string("name", required=True))
    base = _parse_base(table, table.string("base", default="host"), doc.base_dir)
    workdir_text = table.string("workdir", default=DEFAULT_WORKDIR)
    if not workdir_text.startswith("/"):
        raise table.error("workdir", f"must be an absolute path, got {_show(workdir_text)}")
    workdir = _tree_path(table, "workdir", workdir_text, "/")
    output = table.string("output")
    return _Build(
        name=name,
        base=base,
        workdir=workdir,
        env=table.env("env"),
        output=None if output is None else _tree_path(table, "output", output, workdir),
        key_salt=table.string("key_salt"),
    )


def _check_name(table: _Table, key: str, name: str) -> str:
    """Names end up in paths, logs and command lines: keep them plain."""
    if not _NAME.fullmatch(name) or set(name) == {"."}:
        raise table.error(key, f"expected letters, digits, '.', '_' or '-', got {_show(name)}")
    return name


def _parse_base(table: _Table, text: str, base_dir: Path) -> Base:
    kind, colon, ref = text.partition(":")
    if text == "host":
        return Base("host")
    if colon and kind in ("dir", "oci"):
        if not ref:
            raise table.error("base", f"{kind}: needs a path, e.g. {kind}:rootfs")
        return Base(kind, os.path.normpath(base_dir / ref))  # type: ignore[arg-type]
    if colon and kind == "tree":
        if not _HEX64.fullmatch(ref):
            raise table.error("base", f"tree: needs a 64-digit hex digest, got {_show(ref)}")
        return Base("tree", ref.lower())
    parts = text.split("/")
    if _IMAGE.fullmatch(text) and all(part not in ("", ".", "..") for part in parts):
        return Base("image", text)
    raise table.error(
        "base",
        f'expected "host", "dir:PATH", "oci:PATH", "tree:DIGEST" or an image name, '
        f"got {_show(text)}",
    )


# --------------------------------------------------------------------------- [[source]]


def _parse_source(item: _Located, doc: _Doc, workdir: str) -> Source:
    allowed = {"path", "url", "dest", "sha256", "blake3", "stamp"}
    table = _Table(doc, item.data, item.where, allowed)
    path_text, url = table.string("path"), table.string("url")
    if (path_text is None) == (url is None):
        raise table.error(None, "needs exactly one of path or url")
    sha256, blake3 = _digest(table, "sha256"), _digest(table, "blake3")
    if url is not None:
        _check_url(table, url)
        if sha256 is None and blake3 is None:
            raise table.error("url", "a url source needs a sha256 or blake3 digest")
        host_path, default_dest = None, _url_basename(url)
    else:
        host_path = _local_source(table, path_text, doc.base_dir, sha256 or blake3)
        default_dest = host_path.name
    dest_text = table.string("dest", default=default_dest)
    if not dest_text:
        raise table.error("dest", "cannot tell the file name from the source: give dest")
    dest = _tree_path(table, "dest", dest_text, workdir)
    if dest == "/":
        raise table.error("dest", "must not be the root of the tree")
    stamp = table.string("stamp")
    return Source(
        dest=dest,
        path=host_path,
        url=url,
        sha256=sha256,
        blake3=blake3,
        stamp=None if stamp is None else _tree_path(table, "stamp", stamp, workdir),
    )


def _digest(table: _Table, key: str) -> str | None:
    value = table.string(key)
    if value is not None and not _HEX64.fullmatch(value):
        raise table.error(key, f"expected 64 hex digits, got {_show(value)}")
    return None if value is None else value.lower()


def _check_url(table: _Table, url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _URL_SCHEMES:
        raise table.error("url", f"only http://, https:// and file:// urls, got {_show(url)}")
    if any(char.isspace() or ord(char) < 32 for char in url):
        raise table.error("url", "contains whitespace or control characters")
    if parts.scheme != "file" and not parts.netloc:
        raise table.error("url", f"has no host: {_show(url)}")
    if not parts.path.strip("/"):
        raise table.error("url", f"has no path: {_show(url)}")


def _url_basename(url: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return PurePosixPath(path).name if not path.endswith("/") else ""


def _local_source(table: _Table, text: str, base_dir: Path, digest: str | None) -> Path:
    """The absolute host path of a local source, which must exist now."""
    path = Path(os.path.normpath(base_dir / text))
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise table.error("path", f"{path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        if digest is not None:
            raise table.error("path", f"{path} is a directory: digests are for files")
    elif not stat.S_ISREG(mode):
        raise table.error("path", f"{path} is neither a file nor a directory")
    return path


def _check_unique_dests(sources: tuple[Source, ...], doc: _Doc) -> None:
    seen: dict[str, int] = {}
    for number, source in enumerate(sources, 1):
        if source.dest in seen:
            problem = f"{source.dest} is already the dest of source[{seen[source.dest]}]"
            raise doc.error(_Where("source", number), "dest", problem)
        seen[source.dest] = number


# --------------------------------------------------------------------------- [[step]]


def _parse_step(item: _Located, doc: _Doc, workdir: str) -> Step:
    allowed = {"name", "run", "cwd", "env", "timeout", "network", "user"}
    table = _Table(doc, item.data, item.where, allowed)
    name = _check_name(table, "name", table.string("name", required=True))
    user = table.string("user", default="build")
    if user not in ("build", "root"):
        raise table.error("user", f'expected "build" or "root", got {_show(user)}')
    return Step(
        name=name,
        run=table.string("run", required=True),
        cwd=_tree_path(table, "cwd", table.string("cwd", default="."), workdir),
        env=table.env("env"),
        timeout=_timeout(table),
        network=table.boolean("network", False),
        user=user,
    )


def _timeout(table: _Table) -> float:
    value = table.value("timeout", (str, int, float), 'a duration like "10m" or seconds')
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise table.error("timeout", str(exc)) from None
    else:
        seconds = float(value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise table.error("timeout", f'expected a duration like "10m", got {_show(value)}')
    return seconds


def _check_unique_names(steps: tuple[Step, ...], doc: _Doc) -> None:
    seen: dict[str, int] = {}
    for number, step in enumerate(steps, 1):
        if step.name in seen:
            problem = f'duplicate step name "{step.name}" (first used by step[{seen[step.name]}])'
            raise doc.error(_Where("step", number), "name", problem)
        seen[step.name] = number


# --------------------------------------------------------------------------- [[stamp]]

_PLACEHOLDER = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*|[1-9][0-9]*)\}")
_STAMP_TOKEN = re.compile(r"(\{[^{}/]*\}|\*)")


def _parse_stamp_rule(item: _Located, doc: _Doc, workdir: str) -> StampRule:
    table = _Table(doc, item.data, item.where, {"path", "covers"})
    path = _rule_pattern(table, "path", table.string("path", required=True), workdir)
    names, stars = _check_stamp_path(table, path)
    covers_value = table.value("covers", (str, list), "a pattern or a list of patterns")
    if covers_value is None:
        covers = (_default_covers(table, path),)
    else:
        covers = _covers(table, covers_value, workdir)
    for pattern in covers:
        for name in _PLACEHOLDER.findall(pattern):
            if name not in names and not (name.isdigit() and int(name) <= stars):
                raise table.error("covers", f"{{{name}}} is not bound by path {_show(path)}")
    return StampRule(path=path, covers=covers)


def _covers(table: _Table, value: str | list[Any], workdir: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not items:
        raise table.error("covers", "expected at least one pattern")
    patterns = []
    for item in items:
        if not isinstance(item, str):
            raise table.error("covers", f"expected a string pattern, got {_show(item)}")
        if "\0" in item:
            raise table.error("covers", "contains a NUL byte")
        pattern = _rule_pattern(table, "covers", item, workdir)
        _check_braces(table, "covers", pattern)
        patterns.append(pattern)
    return tuple(patterns)


def _rule_pattern(table: _Table, key: str, pattern: str, workdir: str) -> str:
    """A rule pattern made relative to workdir, refused if it could leave it."""
    parts = [part for part in pattern.split("/") if part not in ("", ".")]
    if pattern.startswith("/"):
        root = [part for part in workdir.split("/") if part]
        if parts[: len(root)] != root:
            raise table.error(key, f"{_show(pattern)} leaves the workdir {workdir}")
        parts = parts[len(root) :]
    if ".." in parts:
        raise table.error(key, f"{_show(pattern)} uses '..': patterns stay inside the workdir")
    if not parts:
        raise table.error(key, f"{_show(pattern)} names no file inside the workdir")
    return "/".join(parts)


def _check_braces(table: _Table, key: str, pattern: str) -> None:
    rest = _PLACEHOLDER.sub("", pattern)
    if "{" in rest or "}" in rest:
        raise table.error(key, f"{_show(pattern)}: braces only as {{name}} placeholders")


def _check_stamp_path(table: _Table, path: str) -> tuple[set[str], int]:
    """Check the stamp pattern's syntax; return its placeholder names and star count."""
    if "**" in path:
        raise table.error("path", f"{_show(path)}: '**' is not supported, use '*' per level")
    names: set[str] = set()
    stars = 0
    for token in _STAMP_TOKEN.split(path):
        if token == "*":
            stars += 1
        elif token.startswith("{"):
            match = _PLACEHOLDER.fullmatch(token)
            if match is None or token[1].isdigit():
                raise table.error("path", f"{_show(token)} is not a {{name}} placeholder")
            names.add(match.group(1))
        elif any(char in token for char in "{}?[]"):
            raise table.error("path", f"{_show(path)}: only '*' and {{name}} are special here")
    return names, stars


def _default_covers(table: _Table, path: str) -> str:
    """The directory holding the stamp, with each ``*`` turned into its capture."""
    counter = iter(range(1, path.count("*") + 1))
    numbered = re.sub(r"\*", lambda _: f"{{{next(counter)}}}", path)
    parent, _, _ = numbered.rpartition("/")
    if not parent:
        raise table.error("covers", "required when the stamp lies directly in the workdir")
    return parent


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


# --------------------------------------------------------------------------- tree paths


def _tree_path(table: _Table, key: str, text: str, base: str) -> str:
    """``text`` as an absolute, normalised path in the tree (relative ones start at ``base``).

    ``..`` is resolved lexically and may not climb above the root. Symlinks
    inside the tree are the sandbox's business: it resolves them within the root.
    """
    if "\0" in text:
        raise table.error(key, "contains a NUL byte")
    if not text:
        raise table.error(key, "must not be empty")
    joined = text if text.startswith("/") else f"{base}/{text}"
    parts: list[str] = []
    for part in joined.split("/"):
        if part == "..":
            if not parts:
                raise table.error(key, f"{_show(text)} leaves the tree")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return str(PurePosixPath("/", *parts))


# --------------------------------------------------------------------------- line numbers

_KEY = r"(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*\]\]?\s*(?:#.*)?")


class _Lines:
    """Best-effort line numbers for keys, which tomllib does not report.

    It scans for table headers and ``key =`` lines, skipping multi-line
    strings (so a shell script's ``[ -f x ]`` is not a header). Inline
    arrays of tables (``step = [{...}]``) get the line of the key at best.
    """

    def __init__(self, text: str) -> None:
        self.lines = _mask_multiline_strings(text.splitlines())
        self.headers: list[tuple[int, bool, str]] = []
        for number, line in enumerate(self.lines):
            match = _HEADER.fullmatch(line)
            if match:
                name = re.sub(r"\s*\.\s*", ".", match.group(2)).replace('"', "").replace("'", "")
                self.headers.append((number, match.group(1) == "[[", name))

    def find(self, table: str | None, index: int | None, keys: list[str]) -> int | None:
        """1-based line of the innermost of ``keys`` found in the table, else its header."""
        section = self._section(table, index)
        if section is None:
            return None
        start, end, header = section
        prefix = f"{table}." if table else ""
        for key in reversed(keys):
            pattern = re.compile(
                rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*[.=]"
            )
            for number in range(start, end):
                if pattern.match(self.lines[number]):
                    return number + 1
            for number, _, name in self.headers:
                # A top-level key may be a table of its own, anywhere in the file.
                if table is None and (name == key or name.startswith(f"{key}.")):
                    return number + 1
                if start <= number < end and name == prefix + key:
                    return number + 1
        return None if header is None else header + 1

    def _section(self, table: str | None, index: int | None) -> tuple[int, int, int | None] | None:
        """(first line, end line, header line) of a table's body, 0-based."""
        if table is None:
            end = self.headers[0][0] if self.headers else len(self.lines)
            return 0, end, None
        matches = [h for h in self.headers if h[2] == table and h[1] == (index is not None)]
        position = (index or 1) - 1
        if position >= len(matches):
            return None
        header = matches[position][0]
        end = len(self.lines)
        for number, is_array, name in self.headers:
            inside = not is_array and name.startswith(f"{table}.")
            if number > header and not inside:
                end = number
                break
        return header, end, header


def _mask_multiline_strings(lines: list[str]) -> list[str]:
    """Blank out lines inside ``\"\"\"`` or ``'''`` strings, keeping numbering."""
    out: list[str] = []
    open_quote: str | None = None
    for line in lines:
        out.append("" if open_quote else line)
        for quote in ('"""', "'''"):
            if open_quote in (None, quote) and line.count(quote) % 2:
                open_quote = None if open_quote else quote
    return out
