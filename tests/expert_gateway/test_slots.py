"""Slot bookkeeping of the hf engine (no torch): the active prefix, swaps, LRU reuse, forget."""

from __future__ import annotations

import numpy as np
import pytest

from expert_gateway.backends.slots import SlotTable
from expert_gateway.backends.static_kv import (
    RowFeed,
    batch_buckets,
    bucket,
    build_step,
    check_fits,
    length_buckets,
)
from expert_gateway.errors import BackendError


def _mirror(table: SlotTable, data: list[str], swaps: list[tuple[int, int]]) -> None:
    """Apply swaps to a stand-in for the cache, as the engine does to its tensors."""
    for first, second in swaps:
        data[first], data[second] = data[second], data[first]


def test_running_calls_occupy_the_first_rows_and_keep_their_slot_contents() -> None:
    table = SlotTable(4, capacity=16)
    data = [""] * 4  # what the "cache" of each slot holds
    for session in ("a", "b", "c"):
        row, swaps = table.acquire(session)
        _mirror(table, data, swaps)
        data[row] = session
        table.extend(row, [1, 2])
        _mirror(table, data, table.release(row))
    # All idle now; b comes back and must become row 0 with its own cache moved along.
    row, swaps = table.acquire("b")
    _mirror(table, data, swaps)
    assert (row, table.active, data[row], table.tokens(row)) == (0, 1, "b", [1, 2])
    row, swaps = table.acquire("c")
    _mirror(table, data, swaps)
    assert (row, data[row]) == (1, "c")
    # b finishes: c moves into row 0 and b leaves the active prefix, keeping its data.
    _mirror(table, data, table.release(0))
    assert table.active == 1 and data[0] == "c" and table.slot_of("c") == 0
    assert data[table.slot_of("b")] == "b"  # type: ignore[index]
    for session in ("a", "b", "c"):
        assert data[table.slot_of(session)] == session  # type: ignore[index]


def test_swaps_of_empty_slots_move_no_data() -> None:
    table = SlotTable(3, capacity=8)
    table.acquire("x")
    assert table.release(0) == []
    row, swaps = table.acquire("y")  # takes a free slot: nothing to move, x has no tokens
    assert row == 0 and swaps == []


def test_least_recently_used_idle_slot_is_reused_and_a_running_one_never() -> None:
    table = SlotTable(2, capacity=8)
    for session in ("old", "new"):
        row, _ = table.acquire(session)
        table.extend(row, [5])
        table.release(row)
    row, _ = table.acquire("new")  # "new" runs now; "old" is the only idle slot
    row, _ = table.acquire("third")
    assert table.slot_of("old") is None and table.evictions == 1
    assert table.tokens(row) == []  # the reused slot starts empty for its new session
    with pytest.raises(RuntimeError, match="every slot"):
        table.acquire("fourth")


def test_forget_frees_an_idle_slot_and_leaves_a_running_one() -> None:
    table = SlotTable(2, capacity=8)
    row, _ = table.acquire("busy")
    assert not table.forget("busy") and table.slot_of("busy") == row
    table.release(row)
    assert table.forget("busy") and table.slot_of("busy") is None
    assert not table.forget("unknown")
    row, _ = table.acquire("busy")
    assert table.tokens(row) == []  # a forgotten session starts from nothing


def test_one_session_cannot_run_twice_and_slots_bound_their_tokens() -> None:
    table = SlotTable(2, capacity=4)
    row, _ = table.acquire("s")
    with pytest.raises(RuntimeError, match="already"):
        table.acquire("s")
    table.extend(row, [1, 2, 3])
    with pytest.raises(ValueError, match="more than 4"):
        table.extend(row, [4, 5])
    table.truncate(row, 1)
    assert table.tokens(row) == [1] and table.held() == {"s": 1}


def test_buckets() -> None:
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert length_buckets(300) == (64, 128, 256, 300)
    assert bucket(65, length_buckets(4096)) == 128
    with pytest.raises(ValueError):
        bucket(5000, length_buckets(4096))


def test_step_layout_writes_padding_only_into_the_scratch_slot() -> None:
    rows = [RowFeed(cached=3, tokens=[7, 8]), RowFeed(cached=0, tokens=[9], temperature=0.5, uniform=0.25)]
    step = build_step(rows, batch=4, width=2, start=1, capacity=10, scratch=5)
    assert step.ids.tolist() == [[7, 8], [9, 0], [0, 0], [0, 0]]
    assert step.positions.tolist() == [[3, 4], [0, 0], [0, 0], [0, 0]]
    assert step.dest[0].tolist() == [13, 14] and step.dest[1, 0] == 20
    padding = np.concatenate([step.dest[1, 1:], step.dest[2:].ravel()])
    assert all(50 <= index < 60 for index in padding) and len(set(padding.tolist())) == len(padding)
    assert step.last.tolist() == [1, 0, 0, 0] and step.length == 5
    assert step.temperature.tolist() == [0, 0.5, 0, 0] and step.uniform.tolist() == [0, 0.25, 0, 0]
    with pytest.raises(ValueError, match="over the slot"):
        build_step([RowFeed(cached=9, tokens=[1, 2])], batch=1, width=2, start=0, capacity=10, scratch=1)


def test_slots_that_do_not_fit_fail_with_the_sizes_and_the_fix() -> None:
    assert check_fits(slots=3, capacity=10, per_token=100, free=10_000, headroom=0, device="x") == 4000
    with pytest.raises(BackendError, match=r"256 sessions x 4096 tokens .*lower sessions.max_sessions"):
        check_fits(slots=256, capacity=4096, per_token=48 * 1024, free=40 * 1024**3,
                   headroom=1024**3, device="cuda:0")
