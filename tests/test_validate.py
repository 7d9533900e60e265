"""The daemon's declarative checks of untrusted request arguments."""

from __future__ import annotations

import pytest

from amber.client.errors import ErrorCode
from amber.daemon.api.validate import validate_args
from amber.daemon.errors import BadArgs, to_wire

# --- validate_args ---------------------------------------------------------------

SCHEMA = {
    "spec": str,
    "jobs": (int, 1),
    "keep": (bool, False),
    "paths": (list[str], []),
    "env": (dict[str, str], {}),
    "pin": (str | None, None),
    "limit": (float, 0.0),
}


def test_validate_args_fills_defaults():
    args = validate_args({"spec": "s.toml"}, SCHEMA)
    assert args == {
        "spec": "s.toml",
        "jobs": 1,
        "keep": False,
        "paths": [],
        "env": {},
        "pin": None,
        "limit": 0.0,
    }
    args["paths"].append("mutated")
    assert validate_args({"spec": "s.toml"}, SCHEMA)["paths"] == []


def test_validate_args_accepts_matching_values():
    untrusted = {
        "spec": "s",
        "jobs": 4,
        "keep": True,
        "paths": ["a", "b"],
        "env": {"PATH": "/bin"},
        "pin": "main",
        "limit": 2,
    }
    args = validate_args(untrusted, SCHEMA)
    assert args == {**untrusted, "limit": 2.0}
    assert validate_args({"spec": "s", "pin": None}, SCHEMA)["pin"] is None


@pytest.mark.parametrize(
    ("untrusted", "fragment"),
    [
        ({}, "missing argument 'spec' (str)"),
        ({"spec": 1}, "argument spec: expected str, got int"),
        ({"spec": "s", "jobs": True}, "argument jobs: expected int, got bool"),
        ({"spec": "s", "jobs": "4"}, "argument jobs: expected int, got str"),
        ({"spec": "s", "keep": 1}, "argument keep: expected bool, got int"),
        ({"spec": "s", "paths": "a"}, "argument paths: expected list[str], got str"),
        ({"spec": "s", "paths": ["a", 2]}, "argument paths[1]: expected str, got int"),
        ({"spec": "s", "env": ["A=b"]}, "argument env: expected dict[str, str], got list"),
        ({"spec": "s", "env": {"A": None}}, "argument env['A']: expected str, got nil"),
        ({"spec": "s", "env": {b"A": "b"}}, "argument a key of env: expected str, got bytes"),
        ({"spec": "s", "pin": 3}, "argument pin: expected str | None, got int"),
        ({"spec": "s", "limit": False}, "argument limit: expected float, got bool"),
        ({"spec": "s", "rm": True}, "unexpected argument 'rm'"),
    ],
)
def test_validate_args_errors_name_the_key(untrusted, fragment):
    with pytest.raises(BadArgs) as info:
        validate_args(untrusted, SCHEMA)
    assert to_wire(info.value).code == ErrorCode.BAD_ARGS
    assert fragment in info.value.message


def test_validate_args_never_echoes_values():
    with pytest.raises(BadArgs) as info:
        validate_args({"spec": "s", "jobs": "SECRET" * 100}, SCHEMA)
    assert "SECRET" not in info.value.message


def test_validate_args_needs_a_map():
    with pytest.raises(BadArgs, match="must be a map, got list"):
        validate_args(["spec"], SCHEMA)


def test_validate_args_nested_containers():
    schema = {"steps": list[dict[str, list[str]]]}
    assert validate_args({"steps": [{"run": ["make"]}]}, schema) == {"steps": [{"run": ["make"]}]}
    with pytest.raises(BadArgs, match=r"steps\[0\]\['run'\]\[1\]: expected str"):
        validate_args({"steps": [{"run": ["make", 1]}]}, schema)


def test_validate_args_rejects_unsupported_schemas_loudly():
    # A schema mistake is a bug in amberd, not a bad request.
    with pytest.raises(TypeError):
        validate_args({"a": [1, 2]}, {"a": set[int]})
