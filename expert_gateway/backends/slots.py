"""Which session's KV cache lives in which static slot: bookkeeping only, no torch.

The hf engine preallocates ``slots`` cache slots of ``capacity`` positions each (plus one scratch
slot that padded rows write into). A session keeps its slot across calls, so a call feeds only
the tokens past the longest common prefix with what its slot holds.

The batched step reads the slots ``[0, active)`` as its batch rows through a plain view of the
cache tensors: no gather, no per-step copy. To keep that true, an arriving session's slot is
swapped into row ``active`` and a finishing one swaps places with the last active row. A swap
moves two sessions' caches once per call, never per step; this table returns the swaps and the
engine applies them to the tensors before the next step.

Slots of idle sessions are evicted least recently used first when a new session needs one; the
gateway's own eviction frees a slot at once through ``forget``. ``forget`` of a slot in use by a
running call is ignored: the call's end commits the session again in the gateway's store (the old
backend behaved the same way), and the slot stays with it.

Thread safety: ``forget`` comes from the event loop, everything else from the scheduler thread;
one lock covers all of it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from tandem_core.tokens import common_prefix_length


@dataclass
class _Slot:
    session: str | None = None
    tokens: list[int] | None = None  # tokens whose KV the slot holds, in order
    last_used: int = 0


class SlotTable:
    """Session -> slot map with an active prefix ``[0, active)`` that the batched step reads."""

    def __init__(self, slots: int, capacity: int) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError("slots and capacity must be positive")
        self.slots = slots
        self.capacity = capacity
        self.scratch = slots  # index of the extra slot padded rows write into
        self.active = 0
        self.evictions = 0
        self._table = [_Slot() for _ in range(slots)]
        self._slot_of: dict[str, int] = {}
        self._tick = 0
        self._lock = threading.Lock()

    # -- queries ------------------------------------------------------------------------------

    def slot_of(self, session: str) -> int | None:
        with self._lock:
            return self._slot_of.get(session)

    def is_active(self, session: str) -> bool:
        with self._lock:
            slot = self._slot_of.get(session)
            return slot is not None and slot < self.active

    def tokens(self, row: int) -> list[int]:
        """The tokens whose KV slot ``row`` holds (a copy)."""
        with self._lock:
            return list(self._table[row].tokens or [])

    def shared_prefix(self, row: int, sequence: Sequence[int]) -> int:
        """How many leading tokens of ``sequence`` the row's KV already holds."""
        with self._lock:
            held = self._table[row].tokens or []
            if len(held) <= len(sequence) and sequence[:len(held)] == held:
                return len(held)  # the usual call: the slot is a prefix (one list compare)
            return common_prefix_length(held, sequence)

    def length(self, row: int) -> int:
        with self._lock:
            return len(self._table[row].tokens or [])

    def held(self) -> dict[str, int]:
        """Session -> tokens held, for tests and metrics."""
        with self._lock:
            return {slot.session: len(slot.tokens or []) for slot in self._table if slot.session}

    # -- changes (scheduler thread) -------------------------------------------------------------

    def acquire(self, session: str) -> tuple[int, list[tuple[int, int]]]:
        """Make ``session``'s slot the next active row; its row and the swaps to apply, in order.

        A session without a slot takes a free one or, failing that, the least recently used idle
        slot (whose session loses its cache and prefills again on its next call).
        """
        with self._lock:
            if self.active >= self.slots:
                raise RuntimeError("every slot is in use by a running call")
            slot = self._slot_of.get(session)
            if slot is not None and slot < self.active:
                raise RuntimeError(f"session {session} already has a running call")
            if slot is None:
                slot = self._claim(session)
            swaps = self._swap(slot, self.active)
            row = self.active
            self.active += 1
            self._touch(row)
            return row, swaps

    def release(self, row: int) -> list[tuple[int, int]]:
        """End the call in ``row``: the session keeps its slot, which leaves the active prefix.

        The last active row moves into ``row``; the caller renumbers its rows the same way.
        """
        with self._lock:
            if not 0 <= row < self.active:
                raise IndexError(f"row {row} is not active")
            last = self.active - 1
            self._touch(row)
            swaps = self._swap(row, last)
            self.active -= 1
            return swaps

    def truncate(self, row: int, length: int) -> None:
        """Keep only the first ``length`` tokens of the row (the rest of its KV is stale)."""
        with self._lock:
            slot = self._table[row]
            slot.tokens = (slot.tokens or [])[:length]

    def extend(self, row: int, tokens: list[int]) -> None:
        """The row's KV now also holds ``tokens`` (just fed)."""
        with self._lock:
            slot = self._table[row]
            held = slot.tokens if slot.tokens is not None else []
            if len(held) + len(tokens) > self.capacity:
                raise ValueError(f"slot {row} would hold more than {self.capacity} tokens")
            held.extend(tokens)  # in place: a long session's list is not copied every step
            slot.tokens = held

    def forget(self, session: str) -> bool:
        """Free ``session``'s slot unless a running call uses it; whether it was freed."""
        with self._lock:
            slot = self._slot_of.get(session)
            if slot is None or slot < self.active:
                return False
            del self._slot_of[session]
            self._table[slot] = _Slot()
            return True

    # -- internals (lock held) ------------------------------------------------------------------

    def _claim(self, session: str) -> int:
        idle = range(self.active, self.slots)
        free = [index for index in idle if self._table[index].session is None]
        if free:
            slot = free[0]
        else:
            slot = min(idle, key=lambda index: self._table[index].last_used)
            evicted = self._table[slot].session
            assert evicted is not None
            del self._slot_of[evicted]
            self.evictions += 1
        self._table[slot] = _Slot(session=session, tokens=[])
        self._slot_of[session] = slot
        return slot

    def _swap(self, first: int, second: int) -> list[tuple[int, int]]:
        if first == second:
            return []
        table = self._table
        table[first], table[second] = table[second], table[first]
        for index in (first, second):
            session = table[index].session
            if session is not None:
                self._slot_of[session] = index
        # Moving an empty slot moves no data: only its bookkeeping changed.
        if not table[first].tokens and not table[second].tokens:
            return []
        return [(first, second)]

    def _touch(self, row: int) -> None:
        self._tick += 1
        self._table[row].last_used = self._tick
