"""The id map: pure logic, no namespace needed."""

from __future__ import annotations

import pytest

from amber.sandbox.userns import IDENTITY, OVERFLOW_ID, IdMap, write_id_maps


def test_tree_ids_and_host_ids_shift_both_ways():
    ids = IdMap(100_000, 65_536)
    assert ids.to_host(0) == ids.host_id(0) == 100_000
    assert ids.to_tree(101_000) == 1000
    assert ids.map_line() == "0 100000 65536\n"


def test_ids_outside_the_range_become_the_overflow_id():
    ids = IdMap(100_000, 65_536)
    assert ids.to_tree(0) == ids.to_tree(200_000) == OVERFLOW_ID  # host root is nobody inside
    assert ids.to_host(70_000) == 100_000 + OVERFLOW_ID
    with pytest.raises(ValueError, match="outside the mapped range"):
        ids.host_id(70_000)


def test_identity_keeps_every_id():
    assert IDENTITY.to_host(4_000_000_000) == 4_000_000_000
    assert IDENTITY.to_tree(123_456) == 123_456


def test_impossible_maps_are_refused():
    for base, count in ((-1, 10), (1, 0), (2**32 - 10, 100)):
        with pytest.raises(ValueError):
            IdMap(base, count)
    with pytest.raises(ValueError, match="host root"):
        write_id_maps(1, IdMap(0, 65_536))  # refused before touching /proc/1
