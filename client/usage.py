"""Persistent egress usage counters in SQLite, so caps hold across threads, processes and restarts.

Counters live in fixed UTC windows: the hour (``2026-11-25T22``), the day (``2026-11-25``) and
the request (its id). ``try_consume`` checks every cap and, only when all pass, adds the call in
one ``BEGIN IMMEDIATE`` transaction: the write lock is taken before the counters are read, so two
processes can never both see the last free call. WAL mode lets readers run while one writes.
sqlite3's errors are translated in ``_transaction`` and nowhere else.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from client.errors import PolicyError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    scope TEXT NOT NULL,          -- 'hour', 'day' or 'request'
    window TEXT NOT NULL,         -- the window's key: UTC hour, UTC day or request id
    calls INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (scope, window)
)
"""

_KEEP_REQUEST_ROWS_S = 2 * 86400
_KEEP_WINDOW_ROWS_S = 90 * 86400
_PRUNE_EVERY_CALLS = 10_000


@dataclass(frozen=True)
class Caps:
    """Limits on what may be sent; each cap's name is its reason suffix (``cap:hourly_calls``)."""

    per_request_calls: int
    per_request_tokens: int
    hourly_calls: int
    hourly_tokens: int
    daily_calls: int
    daily_tokens: int


@dataclass(frozen=True)
class Usage:
    """Calls and tokens counted in one window."""

    calls: int = 0
    tokens: int = 0


class UsageStore:
    """Counts remote calls and sent tokens per request, UTC hour and UTC day."""

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, busy_timeout_s: float = 30.0
    ) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._calls_since_prune = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise PolicyError(f"cannot open the usage database {path}: {exc}") from exc
        with self._transaction() as db:
            db.execute(_SCHEMA)
        # journal_mode cannot change inside a transaction. With WAL, synchronous=NORMAL keeps
        # every commit across process crashes and restarts (only an OS crash or power loss can
        # drop the last few counts) and saves an fsync per remote call; the audit log, which
        # must survive those too, fsyncs every record itself.
        with self._transaction(begin=False) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        self._prune()

    def try_consume(self, request_id: str, tokens: int, caps: Caps) -> str | None:
        """Count one call sending ``tokens`` unless a cap forbids it; return that cap's name."""
        windows = self._windows(request_id)
        with self._transaction() as db:
            hour, day, request = (self._read(db, scope, key) for scope, key in windows)
            exceeded = _first_exceeded(caps, tokens, hour=hour, day=day, request=request)
            if exceeded is None:
                now = self._clock()
                for scope, key in windows:
                    db.execute(
                        "INSERT INTO usage (scope, window, calls, tokens, updated) "
                        "VALUES (?, ?, 1, ?, ?) ON CONFLICT (scope, window) DO UPDATE SET "
                        "calls = calls + 1, tokens = tokens + excluded.tokens, updated = excluded.updated",
                        (scope, key, tokens, now),
                    )
            self._calls_since_prune += 1
        if self._calls_since_prune >= _PRUNE_EVERY_CALLS:  # a long-running daemon never reopens
            self._prune()
        return exceeded

    def would_exceed(self, request_id: str, tokens: int, caps: Caps) -> str | None:
        """The cap that would refuse this call, counting nothing (for dry runs)."""
        windows = self._windows(request_id)
        with self._transaction(begin=False) as db:
            hour, day, request = (self._read(db, scope, key) for scope, key in windows)
        return _first_exceeded(caps, tokens, hour=hour, day=day, request=request)

    def current(self, request_id: str = "") -> dict[str, Usage]:
        """What is counted now in this hour, this day and (if given) this request."""
        windows = self._windows(request_id)
        with self._transaction(begin=False) as db:
            hour, day, request = (self._read(db, scope, key) for scope, key in windows)
        return {"hour": hour, "day": day, "request": request}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _windows(self, request_id: str) -> tuple[tuple[str, str], ...]:
        moment = datetime.fromtimestamp(self._clock(), tz=UTC)
        return (
            ("hour", moment.strftime("%Y-%m-%dT%H")),
            ("day", moment.strftime("%Y-%m-%d")),
            ("request", request_id),
        )

    @staticmethod
    def _read(db: sqlite3.Connection, scope: str, key: str) -> Usage:
        row = db.execute(
            "SELECT calls, tokens FROM usage WHERE scope = ? AND window = ?", (scope, key)
        ).fetchone()
        return Usage(*row) if row else Usage()

    def _prune(self) -> None:
        self._calls_since_prune = 0
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "DELETE FROM usage WHERE (scope = 'request' AND updated < ?) OR updated < ?",
                (now - _KEEP_REQUEST_ROWS_S, now - _KEEP_WINDOW_ROWS_S),
            )

    @contextmanager
    def _transaction(self, *, begin: bool = True) -> Iterator[sqlite3.Connection]:
        """One serialized unit of work; the single place sqlite3 errors become PolicyError."""
        with self._lock:
            try:
                if begin:
                    self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                if self._db.in_transaction:
                    self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise PolicyError(f"usage database {self._path} failed: {exc}") from exc


def _first_exceeded(caps: Caps, tokens: int, *, hour: Usage, day: Usage, request: Usage) -> str | None:
    checks = (
        ("per_request_calls", request.calls + 1, caps.per_request_calls),
        ("per_request_tokens", request.tokens + tokens, caps.per_request_tokens),
        ("hourly_calls", hour.calls + 1, caps.hourly_calls),
        ("hourly_tokens", hour.tokens + tokens, caps.hourly_tokens),
        ("daily_calls", day.calls + 1, caps.daily_calls),
        ("daily_tokens", day.tokens + tokens, caps.daily_tokens),
    )
    for name, would_be, limit in checks:
        if would_be > limit:
            return name
    return None
