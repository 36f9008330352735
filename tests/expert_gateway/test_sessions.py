from __future__ import annotations

import pytest

from expert_gateway.errors import InvalidRequestError, SessionLostError
from expert_gateway.sessions import SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, evicted: list[str], **limits: float) -> SessionStore:
    options = {"max_sessions": 3, "memory_budget_tokens": 100, "idle_ttl_s": 60.0, **limits}
    return SessionStore(max_sessions=int(options["max_sessions"]),
                        memory_budget_tokens=int(options["memory_budget_tokens"]),
                        idle_ttl_s=options["idle_ttl_s"], on_evict=evicted.append, clock=clock)


def test_full_sequence_is_held_prefix_plus_new_tokens() -> None:
    store = _store(Clock(), [])
    assert store.resolve("a", 0, [1, 2, 3]) == [1, 2, 3]
    store.commit("a", [1, 2, 3, 9, 8])  # prompt plus two generated tokens
    assert store.resolve("a", 4, [7]) == [1, 2, 3, 9, 7]
    assert store.resolve("a", 5, []) == [1, 2, 3, 9, 8]


def test_held_beyond_what_is_held_or_unknown_session_is_409() -> None:
    store = _store(Clock(), [])
    with pytest.raises(SessionLostError, match="not held"):
        store.resolve("never-seen", 3, [1])
    store.commit("a", [1, 2])
    with pytest.raises(SessionLostError, match="builds on 3 tokens"):
        store.resolve("a", 3, [1])


def test_empty_sequence_is_invalid() -> None:
    store = _store(Clock(), [])
    with pytest.raises(InvalidRequestError):
        store.resolve("a", 0, [])


def test_held_zero_restarts_a_known_session() -> None:
    store = _store(Clock(), [])
    store.commit("a", [1, 2, 3])
    assert store.resolve("a", 0, [5]) == [5]


def test_least_recently_used_session_goes_first_when_over_count() -> None:
    evicted: list[str] = []
    store = _store(Clock(), evicted)
    for name in ("a", "b", "c"):
        store.commit(name, [1])
    store.resolve("a", 1, [2])  # touch a: b is now least recently used
    store.commit("d", [1])
    assert evicted == ["b"]
    assert len(store) == 3 and "a" in store and "b" not in store


def test_memory_budget_evicts_in_lru_order_but_keeps_the_current_session() -> None:
    evicted: list[str] = []
    store = _store(Clock(), evicted, max_sessions=10, memory_budget_tokens=1024)
    store.commit("a", list(range(500)))
    store.commit("b", list(range(500)))
    assert store.held_total == 1000
    store.commit("c", list(range(100)))
    assert evicted == ["a"]
    assert store.held_total == 600
    store.commit("c", list(range(2000)))  # alone over budget: the others go, c stays
    assert evicted == ["a", "b"] and "c" in store


def test_idle_sessions_expire() -> None:
    clock, evicted = Clock(), []
    store = _store(clock, evicted)
    store.commit("a", [1])
    clock.now += 30
    store.commit("b", [1])
    clock.now += 45  # a idle 75 s, b 45 s
    store.sweep()
    assert evicted == ["a"]
    with pytest.raises(SessionLostError):
        store.resolve("a", 1, [])
