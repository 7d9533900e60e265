"""Checking a spec's fields: [build], [[source]], [[step]], [[stamp]] and tree paths.

Each ``_parse_*`` turns one raw table into its dataclass (spec_model.py) or
raises SpecError saying where and what; spec.py calls them in order.
"""

from __future__ import annotations

import math
import os
import re
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from amber.client.units import parse_duration
from amber.daemon.build.spec_model import (
    _PLACEHOLDER,
    _STAMP_TOKEN,
    DEFAULT_TIMEOUT,
    DEFAULT_WORKDIR,
    Base,
    Source,
    StampRule,
    Step,
)
from amber.daemon.build.spec_tables import _Doc, _Located, _show, _Table, _Where

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_IMAGE = re.compile(r"[A-Za-z0-9._/-]+")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_URL_SCHEMES = ("http", "https", "file")
#: host[:port], a bracketed IPv6 address allowed: nothing a URL would read as more.
_REGISTRY_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?"
)


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
    if text.startswith("docker://"):
        return Base("docker", _registry_reference(table, text))
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
        f'expected "host", "dir:PATH", "oci:PATH", "tree:DIGEST", '
        f'"docker://REGISTRY/REPO:TAG|@sha256:DIGEST" or an image name, got {_show(text)}',
    )


def _registry_reference(table: _Table, text: str) -> str:
    """A ``docker://`` base's reference, checked: a registry host, a repository, and a
    tag (``latest`` if none) or a digest; a bare name would mean Docker Hub: spelt out
    (``docker.io/library/debian``), a spec says where it builds from."""
    from amber.daemon.oci.spec import OciError, parse_reference

    ref = text.removeprefix("docker://")
    try:
        parsed = parse_reference(ref)
    except OciError as exc:
        raise table.error("base", str(exc)) from None
    if not parsed.registry:
        raise table.error(
            "base",
            f"docker:// needs a registry host, e.g. docker://docker.io/{ref}, got {_show(text)}",
        )
    if not _REGISTRY_HOST.fullmatch(parsed.registry):
        raise table.error("base", f"{_show(parsed.registry)} is not a registry host[:port]")
    if parsed.tag and parsed.digest:
        raise table.error("base", f"give a tag or a digest, not both: {_show(text)}")
    return ref


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
        host_path = _local_source(table, path_text, doc, sha256 or blake3)
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


def _local_source(table: _Table, text: str, doc: _Doc, digest: str | None) -> Path:
    """The absolute host path of a local source, which must exist now."""
    path = Path(os.path.normpath(doc.base_dir / text))
    try:
        mode = doc.mode_of(path)
    except OSError as exc:
        problem = exc.strerror or str(exc)  # the helper's names the path already
        raise table.error(
            "path", problem if str(path) in problem else f"{path}: {problem}"
        ) from exc
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
