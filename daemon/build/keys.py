"""Step keys: input-addressed digests of everything that determines a step.

A key never depends on outputs (mtimes, nondeterministic bytes), only on
inputs, so an unchanged spec finds all its steps again; changing step k
changes the keys of k and every later step, and nothing before it.
"""

from __future__ import annotations

from typing import Any

import msgpack

from amber.sandbox.digest import hash_bytes

#: Bumped when the meaning of a cached result changes (runner, layout).
KEY_VERSION = 1


def _digest(obj: Any) -> str:
    return hash_bytes(msgpack.packb(obj, use_bin_type=True)).hex()


def _sorted(mapping: dict[str, Any]) -> list[list[Any]]:
    return [[k, mapping[k]] for k in sorted(mapping)]


def initial_key(*, base_key: str, initial_tree: str, workdir: str, salt: str | None) -> str:
    """The key before the first step: the base and the sources laid on it.

    ``initial_tree`` already contains the sources by digest, so it stands for
    them; ``base_key`` adds what the tree cannot show (the host's system
    directories for the ``host`` base).
    """
    return _digest(["amber-initial", KEY_VERSION, base_key, initial_tree, workdir, salt or ""])


def step_key(
    previous: str, definition: dict[str, Any], env: dict[str, str], salt: str | None
) -> str:
    """Key of a step given the key before it."""
    return _digest(
        ["amber-step", KEY_VERSION, previous, _sorted(definition), _sorted(env), salt or ""]
    )
