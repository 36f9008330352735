"""Token-sequence helpers."""

from __future__ import annotations

import pytest

from tandem_core.tokens import common_prefix_length


@pytest.mark.parametrize(("left", "right", "length"), [
    ((), (1, 2), 0), ((1, 2, 3), (1, 2, 3), 3), ((1, 2, 3), (1, 2), 2), ((1, 9, 3), (1, 2, 3), 1),
    ((5,), (6,), 0), (tuple(range(100)), (*range(57), 0), 57), ([1, 2, 3], (1, 2, 4), 2),
])
def test_the_common_prefix_length(left: tuple[int, ...], right: tuple[int, ...],
                                  length: int) -> None:
    assert common_prefix_length(left, right) == length == common_prefix_length(right, left)
