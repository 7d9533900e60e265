"""Build specs: a TOML file parsed and validated into frozen dataclasses.

A spec is untrusted user input that decides what runs and what gets cached,
so everything is checked here, once, and the rest of the daemon only sees
normalised values: paths in the build's tree are absolute POSIX strings that
cannot leave the tree, host paths are absolute, durations are float seconds.
Errors name the file, the line where we can find it, and the key path,
e.g. ``spec.toml:14: step[2].timeout: expected a duration like "10m", got 0``
(array indexes in key paths count from 1, like the ``[[step]]`` tables).

Tables (see issues 3 and 5)::

    [build]     name, base = "host" | "dir:PATH" | "oci:PATH" | "tree:DIGEST" | IMAGE
                | "docker://REGISTRY/REPO[:TAG|@sha256:DIGEST]",
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

This module is the entry point (``load_spec``, ``parse_spec``,
``spec_from_dict``) and re-exports the dataclasses of spec_model.py; the
checks live in spec_fields.py, reading tables and line numbers in
spec_tables.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from amber.client.units import parse_duration
from amber.daemon.build.spec_fields import (
    _check_unique_dests,
    _check_unique_names,
    _parse_build,
    _parse_source,
    _parse_stamp_rule,
    _parse_step,
)
from amber.daemon.build.spec_model import (
    DEFAULT_TIMEOUT,
    DEFAULT_WORKDIR,
    Base,
    Source,
    Spec,
    SpecError,
    StampRule,
    Step,
)
from amber.daemon.build.spec_tables import _Doc, _Lines, _Table, _Where

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_WORKDIR",
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


def parse_spec(
    text: str, filename: str, base_dir: Path, *, mode_of: Callable[[Path], int] | None = None
) -> Spec:
    """Validate spec ``text``; ``filename`` is for messages, ``base_dir`` anchors local paths.

    ``mode_of`` looks a local source up (``os.stat`` by default; amberd, root,
    asks a helper that is the user instead).

    Raises:
        SpecError: the text is not TOML or not a valid spec.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        raise SpecError(filename, None, f"invalid TOML: {exc}", line) from exc
    return spec_from_dict(document, filename, base_dir, text, mode_of=mode_of)


def spec_from_dict(
    document: Mapping[str, Any], filename: str, base_dir: Path, text: str = "",
    *, mode_of: Callable[[Path], int] | None = None,
) -> Spec:  # fmt: skip
    """Validate an already decoded spec document (TOML, or ``Spec.to_dict`` sent over the wire).

    ``text``, when given, is the source the document came from, used only to
    find line numbers for messages.

    Raises:
        SpecError: the document is not a valid spec.
    """
    doc = _Doc(filename, Path(os.path.abspath(base_dir)), _Lines(text))
    if mode_of is not None:
        doc = dataclasses.replace(doc, mode_of=mode_of)
    top = _Table(doc, document, _Where(None), {"build", "source", "step", "stamp"})
    build = _parse_build(top.table("build", required=True), doc)
    sources = tuple(_parse_source(t, doc, build.workdir) for t in top.array("source"))
    _check_unique_dests(sources, doc)
    steps = tuple(_parse_step(t, doc, build.workdir) for t in top.array("step"))
    if not steps:
        raise doc.error(_Where("step"), None, "at least one [[step]] is required")
    _check_unique_names(steps, doc)
    stamps = tuple(_parse_stamp_rule(t, doc, build.workdir) for t in top.array("stamp"))
    # [build]'s fields are Spec's own: name, base, workdir, env, output, key_salt.
    return Spec(**vars(build), steps=steps, sources=sources, stamps=stamps)
