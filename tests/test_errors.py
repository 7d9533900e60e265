"""The daemon's errors and the one table that gives each its wire code (pure logic)."""

from __future__ import annotations

import inspect

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
