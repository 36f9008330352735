"""Per-session token histories: what each session's sequence is, and when to forget it.

A request's full sequence is ``held_tokens[:held] + tokens``. The store keeps the sequence of
every live session (prompt plus the gateway's own generated tokens) and evicts by idle time,
count and a memory budget counted in tokens, least recently used first. The backend keeps the
matching KV cache under the same session id and is told through ``on_evict`` when a session goes,
so both sides forget together. A request that builds on tokens the store no longer holds gets a
409 and the client resends its whole allowed prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from expert_gateway.errors import InvalidRequestError, SessionLostError


@dataclass
class Session:
    """One session's sequence and when it was last used (monotonic seconds)."""

    session_id: str
    held_tokens: list[int]
    last_used: float


class SessionStore:
    """LRU + idle-TTL store of session sequences with a token budget. Event-loop confined."""

    def __init__(self, *, max_sessions: int, memory_budget_tokens: int, idle_ttl_s: float,
                 on_evict: Callable[[str], None] = lambda session_id: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.memory_budget_tokens = memory_budget_tokens
        self.idle_ttl_s = idle_ttl_s
        self._on_evict = on_evict
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._held_total = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    @property
    def held_total(self) -> int:
        """Tokens held over all sessions."""
        return self._held_total

    @contextlib.asynccontextmanager
    async def locked(self, session_id: str) -> AsyncIterator[None]:
        """Serialise the calls of one session (its sequence grows call by call).

        The lock exists only while some call holds or waits for it: a rejected or finished
        call leaves nothing behind, so unknown session ids cannot pile up locks.
        """
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        self._lock_users[session_id] = self._lock_users.get(session_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            users = self._lock_users[session_id] - 1
            if users:
                self._lock_users[session_id] = users
            else:
                del self._lock_users[session_id]
                del self._locks[session_id]

    @property
    def lock_count(self) -> int:
        """Locks alive now (one per session with a call in progress or waiting)."""
        return len(self._locks)

    def held(self, session_id: str) -> list[int]:
        """The sequence held for ``session_id`` (empty when unknown)."""
        session = self._sessions.get(session_id)
        return list(session.held_tokens) if session else []

    def resolve(self, session_id: str, held: int, new_tokens: Sequence[int]) -> list[int]:
        """The request's full sequence; 409 when it builds on tokens not held."""
        self.sweep()
        if held == 0:
            if not new_tokens:
                raise InvalidRequestError("the sequence is empty: send at least one token")
            return list(new_tokens)
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionLostError(
                f"session {session_id} is not held (evicted, expired or gateway restarted): "
                "resend the whole prefix with held = 0"
            )
        if held > len(session.held_tokens):
            raise SessionLostError(
                f"the request builds on {held} tokens but the gateway holds "
                f"{len(session.held_tokens)} for session {session_id}: resend with held = 0"
            )
        self._touch(session)
        full = session.held_tokens[:held] + list(new_tokens)
        if not full:
            raise InvalidRequestError("the sequence is empty: send at least one token")
        return full

    def commit(self, session_id: str, sequence: Sequence[int]) -> None:
        """Record the session's sequence after a call, then evict others over the limits."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = Session(session_id, [], self._clock())
        self._held_total += len(sequence) - len(session.held_tokens)
        session.held_tokens = list(sequence)
        self._touch(session)
        self._evict_over_limits(keep=session_id)

    def sweep(self) -> None:
        """Forget sessions idle for longer than the TTL."""
        deadline = self._clock() - self.idle_ttl_s
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.last_used > deadline:
                break
            self._evict(oldest.session_id)

    def forget(self, session_id: str) -> None:
        """Drop one session now (no-op when unknown)."""
        if session_id in self._sessions:
            self._evict(session_id)

    def _touch(self, session: Session) -> None:
        session.last_used = self._clock()
        self._sessions.move_to_end(session.session_id)

    def _evict_over_limits(self, *, keep: str) -> None:
        for session_id in list(self._sessions):
            over_count = len(self._sessions) > self.max_sessions
            over_budget = self._held_total > self.memory_budget_tokens
            if not (over_count or over_budget):
                return
            if session_id != keep:
                self._evict(session_id)

    def _evict(self, session_id: str) -> None:
        session = self._sessions.pop(session_id)
        self._held_total -= len(session.held_tokens)
        self.evictions += 1
        self._on_evict(session_id)
