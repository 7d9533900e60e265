"""The id map: pure logic, no namespace needed."""

from __future__ import annotations

import pytest

from amber.sandbox.userns import (
    IDENTITY,
    OVERFLOW_ID,
    IdMap,
    IdPool,
    IdPoolExhausted,
    write_id_maps,
)


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


def test_a_pool_hands_out_disjoint_ranges_and_takes_them_back():
    pool = IdPool(base=1_000_000, count=65_536, ranges=2)
    with pool.hold() as first:
        second = pool.acquire()
        assert (first.host_base, second.host_base) == (1_000_000, 1_065_536)
        with pytest.raises(IdPoolExhausted, match="all 2 sandbox id ranges are in use"):
            pool.acquire()
        pool.release(second)
        assert pool.acquire() == second
    assert pool.acquire() == first  # released when the block ended
    with pytest.raises(ValueError, match="not a range of this pool"):
        pool.release(IdMap(1_000_001, 65_536))


def test_the_default_pool_is_clear_of_shadow_and_nspawn_ranges():
    pool = IdPool()
    assert pool.base > 600_100_000 + 65_536  # shadow's SUB_UID_MAX (Debian's useradd)
    assert pool.base > 1_879_048_191  # systemd-nspawn's automatic container ranges end here
    assert pool.end <= 0x7FFE0000  # systemd's foreign range starts here, below 2^31
