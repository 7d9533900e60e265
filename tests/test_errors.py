"""The daemon's errors and the one table that gives each its wire code (pure logic)."""

from __future__ import annotations

import inspect

import pytest

from amber.client.errors import ErrorCode
from amber.daemon import errors


def _daemon_errors() -> list[type[errors.DaemonError]]:
    return [
        cls
        for _name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.DaemonError) and cls is not errors.DaemonError
    ]


def test_every_daemon_error_has_a_wire_code_clients_know():
    missing = [cls.__name__ for cls in _daemon_errors() if cls not in errors.WIRE_CODES]
    assert missing == []
    for cls in _daemon_errors():
        wire = errors.to_wire(cls("what went wrong"))
        assert ErrorCode(wire.code) is errors.WIRE_CODES[cls]
        assert wire.message == "what went wrong"


def test_the_codes_that_were_invented_on_the_spot_are_in_error_code():
    assert errors.to_wire(errors.ImageError("x")).code == "bad-image"
    assert errors.to_wire(errors.ExportFailed("x")).code == "export-failed"
    assert {"bad-image", "export-failed"} <= {c.value for c in ErrorCode}


def test_a_subclass_takes_its_nearest_mapped_base_code():
    class GoneBlob(errors.NotFound):
        pass

    assert errors.to_wire(GoneBlob("blob gone")).to_wire() == {
        "code": "not-found",
        "message": "blob gone",
    }


def test_every_error_code_is_documented_in_the_readme():
    """A client can receive any of them: the README's table says what each means."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = set(re.findall(r"`([a-z]+(?:-[a-z]+)*)`", readme))
    assert sorted(c.value for c in ErrorCode if c.value not in documented) == []


def test_only_the_boundary_builds_wire_errors():
    """Daemon code raises its own errors; only errors.py and server.py make an ``AmberError``."""
    import ast
    from pathlib import Path

    daemon = Path(errors.__file__).parent
    builders = []
    for path in sorted(daemon.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "AmberError"
            ):
                builders.append(f"{path.relative_to(daemon)}:{node.lineno}")
    assert {b.split(":")[0] for b in builders} <= {"errors.py", "server.py"}, builders


def test_frozen_state_and_build_id_errors_are_domain_errors():
    from amber.daemon.build.buildid import check_build_id

    with pytest.raises(errors.PermissionDenied) as refused:
        check_build_id("../etc")
    assert errors.to_wire(refused.value).code == "permission-denied"


def test_the_readmes_exit_status_for_each_code_is_the_one_amber_gives():
    import re
    from pathlib import Path

    from amber.client.cli import exit_code_for
    from amber.client.errors import AmberError

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| (`[a-z-]+`(?:, `[a-z-]+`)*) \| .* \| (\d) \|$", readme, re.M)
    shown = {code: int(exit) for codes, exit in rows for code in re.findall(r"`([a-z-]+)`", codes)}
    assert len(shown) >= 14, rows
    assert {c: exit_code_for(AmberError(c, "")) for c in shown} == shown
