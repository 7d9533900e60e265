"""Declarative checks of untrusted request arguments.

A daemon handler declares the shape of its arguments once, next to its
registration, and receives only values that match it (the qubesd way):
handlers never see a bool where they expect an int, nor a key they did not
ask for. Error messages name the offending key and the expected type but
never echo the untrusted value itself.

A schema maps each argument name to a *spec*:

- a type: ``str``, ``int`` (bools are refused), ``bool``, ``float`` (ints
  accepted), ``bytes``, ``dict`` (any map, unchecked), ``list`` (any list);
- a parametrised container: ``list[str]``, ``dict[str, str]``,
  ``list[dict[str, int]]``, ... (map keys are always ``str``);
- a union: ``str | None`` accepts an explicit nil;
- ``(spec, default)``: the key may be absent, and then the result holds a
  (deep) copy of ``default``, so a mutable default is never shared. A key
  without a default is required.
"""

from __future__ import annotations

import types

from amber.daemon.errors import BadArgs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# Lives in the daemon: only amberd checks arguments; the client sends them.
# Type names a peer sees in messages; msgpack only yields these kinds.
_WIRE_NAMES = {
    type(None): "nil",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    bytes: "bytes",
    list: "list",
    dict: "map",
}


def validate_args(untrusted: object, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Return the arguments as a fresh dict if ``untrusted`` matches ``schema``.

    Raises:
        BadArgs: naming the first key that does not fit (``bad-args`` on the wire).
    """
    if not isinstance(untrusted, dict):
        got = _wire_name(untrusted)
        raise BadArgs(f"arguments must be a map, got {got}")
    for key in untrusted:
        if key not in schema:
            shown = _short_repr(key)
            raise BadArgs(f"unexpected argument {shown}")
    args: dict[str, Any] = {}
    for key, entry in schema.items():
        spec, optional, default = _split_entry(entry)
        if key in untrusted:
            args[key] = _check(untrusted[key], spec, key)
        elif optional:
            import copy  # only the daemon needs it; spare the CLI's start-up

            args[key] = copy.deepcopy(default)
        else:
            raise BadArgs(f"missing argument {key!r} ({_spec_name(spec)})")
    return args


def _split_entry(entry: Any) -> tuple[Any, bool, Any]:
    """Split a schema entry into (spec, optional, default)."""
    if isinstance(entry, tuple):
        if len(entry) != 2:
            raise TypeError(f"schema entry must be a spec or (spec, default), got {entry!r}")
        return entry[0], True, entry[1]
    return entry, False, None


def _check(value: object, spec: Any, where: str) -> Any:
    """Return ``value`` (containers copied) if it matches ``spec``, else raise bad-args."""
    if isinstance(spec, types.UnionType):
        for member in spec.__args__:
            try:
                return _check(value, member, where)
            except BadArgs:
                continue
        raise _bad(where, _spec_name(spec), value)
    if isinstance(spec, types.GenericAlias):
        return _check_container(value, spec, where)
    if spec is None or spec is type(None):
        if value is None:
            return None
    elif spec is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif spec is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(spec, type):
        if isinstance(value, spec):
            return value
    else:
        raise TypeError(f"unsupported schema spec {spec!r}")
    raise _bad(where, _spec_name(spec), value)


def _check_container(value: object, spec: types.GenericAlias, where: str) -> Any:
    origin, params = spec.__origin__, spec.__args__
    if origin is list and len(params) == 1:
        if not isinstance(value, list):
            raise _bad(where, _spec_name(spec), value)
        return [_check(item, params[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict and len(params) == 2 and params[0] is str:
        if not isinstance(value, dict):
            raise _bad(where, _spec_name(spec), value)
        checked = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad(f"a key of {where}", "str", key)
            checked[key] = _check(item, params[1], f"{where}[{_short_repr(key)}]")
        return checked
    raise TypeError(f"unsupported schema spec {spec!r}")


def _bad(where: str, expected: str, value: object) -> BadArgs:
    got = _wire_name(value)
    return BadArgs(f"argument {where}: expected {expected}, got {got}")


def _wire_name(value: object) -> str:
    return _WIRE_NAMES.get(type(value), type(value).__name__)


def _spec_name(spec: Any) -> str:
    if spec is None or spec is type(None):
        return "None"
    if isinstance(spec, type):
        return spec.__name__
    return str(spec).replace("NoneType", "None")


def _short_repr(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
