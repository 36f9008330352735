"""Token-sequence helpers both sides use to line up what the gateway holds with what is sent."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix_length(left: Sequence[int], right: Sequence[int]) -> int:
    """How many leading tokens two sequences share.

    A binary search over prefix comparisons, each of which runs in C: the batching engine asks
    this of every sequence and every prompt-cache entry when a prompt arrives, and a Python step
    per token cost more than the slices.
    """
    left, right = tuple(left), tuple(right)  # a tuple is not copied again
    low, high = 0, min(len(left), len(right))
    while low < high:
        middle = (low + high + 1) // 2
        if left[:middle] == right[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
