"""Bearer API keys, stored only as SHA-256 digests, and per-key quotas.

The keys file is JSON written by ``tandem gateway keys add|revoke`` (mode 0600, atomic replace).
The running gateway re-reads it when its modification time changes, so a revocation takes
effect on the next request without a restart. A key's secret is printed once, at creation, and
never stored or logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expert_gateway.errors import AuthError, KeyStoreError, RateLimitedError

KEY_PREFIX = "tgw_"


def hash_key(secret: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class ApiKey(BaseModel):
    """One stored key: its digest, name and quotas (None: the gateway's defaults)."""

    model_config = ConfigDict(extra="forbid")

    key_id: str = Field(pattern=r"^k_[0-9a-f]{8}$")
    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: str
    revoked: bool = False
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    keys: list[ApiKey] = Field(default_factory=list)


class KeyStore:
    """The keys file: read, add, revoke."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[ApiKey]:
        if not self.path.exists():
            return []
        try:
            return _KeysFile.model_validate_json(self.path.read_bytes()).keys
        except (OSError, ValidationError, ValueError) as exc:
            raise KeyStoreError(f"cannot read keys file {self.path}: {_short(exc)}") from exc

    def add(self, name: str, *, requests_per_minute: int | None = None,
            tokens_per_day: int | None = None) -> tuple[ApiKey, str]:
        """Create a key; returns it and its secret, which is shown once and never stored."""
        keys = self.load()
        if any(key.name == name and not key.revoked for key in keys):
            raise KeyStoreError(f"an active key named {name!r} exists: revoke it or pick another name")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(key_id=f"k_{secrets.token_hex(4)}", name=name, sha256=hash_key(secret),
                     created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     requests_per_minute=requests_per_minute, tokens_per_day=tokens_per_day)
        self._save([*keys, key])
        return key, secret

    def revoke(self, key_id_or_name: str) -> ApiKey:
        keys = self.load()
        for index, key in enumerate(keys):
            if key_id_or_name in (key.key_id, key.name) and not key.revoked:
                keys[index] = key.model_copy(update={"revoked": True})
                self._save(keys)
                return keys[index]
        raise KeyStoreError(f"no active key with id or name {key_id_or_name!r} in {self.path}")

    def _save(self, keys: list[ApiKey]) -> None:
        payload = _KeysFile(keys=keys).model_dump_json(indent=2)
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            raise KeyStoreError(f"cannot write keys file {self.path}: {exc.strerror}") from exc


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        problem = exc.errors()[0]
        return f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class Reservation:
    """Tokens set aside for one call before it runs; ``Authenticator.settle`` closes it."""

    key_id: str
    day: int
    tokens: int


class QuotaLedger:
    """Tokens used per key and UTC day, in SQLite so a restart does not reset the quota.

    One connection, serialised by the authenticator's lock; WAL with synchronous=NORMAL keeps
    every settled count across process crashes and restarts.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        if path is None:
            self._memory: dict[tuple[str, int], int] = {}
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS quota (key_id TEXT NOT NULL, "
                             "day INTEGER NOT NULL, used INTEGER NOT NULL, "
                             "PRIMARY KEY (key_id, day))")
            self._db.execute("DELETE FROM quota WHERE day < ?", (math.floor(time.time() / 86400) - 7,))
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(f"cannot open the quota database {path}: {exc}") from exc

    def used(self, key_id: str, day: int) -> int:
        if self._db is None:
            return self._memory.get((key_id, day), 0)
        row = self._execute("SELECT used FROM quota WHERE key_id = ? AND day = ?",
                            (key_id, day)).fetchone()
        return int(row[0]) if row else 0

    def add(self, key_id: str, day: int, tokens: int) -> None:
        if self._db is None:
            self._memory[(key_id, day)] = self._memory.get((key_id, day), 0) + tokens
            return
        self._execute("INSERT INTO quota (key_id, day, used) VALUES (?, ?, ?) ON CONFLICT "
                      "(key_id, day) DO UPDATE SET used = used + excluded.used",
                      (key_id, day, tokens))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _execute(self, sql: str, parameters: tuple[object, ...]) -> sqlite3.Cursor:
        assert self._db is not None
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"quota database {self.path} failed: {exc}") from exc


class Authenticator:
    """Checks bearer keys and enforces per-key request and token quotas.

    Token quotas are reserved before a call (its worst case) and settled after it with what it
    really cost, under one lock, so concurrent calls can never spend more than the quota
    between them. Settled counts persist in ``usage_path`` (SQLite) when given.
    """

    def __init__(self, store: KeyStore, *, extra_hashes: list[str], requests_per_minute: int,
                 tokens_per_day: int, clock: Callable[[], float] = time.time,
                 usage_path: Path | None = None) -> None:
        self._store = store
        self._extra = [ApiKey(key_id=f"k_{digest[:8]}", name=f"env-{digest[:8]}", sha256=digest,
                              created="environment") for digest in extra_hashes]
        self._default_rpm = requests_per_minute
        self._default_tpd = tokens_per_day
        self._clock = clock
        self._lock = threading.Lock()
        self._by_hash: dict[str, ApiKey] = {}
        self._stamp: tuple[float, int] | None = None
        self._recent: dict[str, deque[float]] = {}
        self._ledger = QuotaLedger(usage_path)
        self._reserved: dict[tuple[str, int], int] = {}  # (key id, UTC day) -> tokens in flight

    def close(self) -> None:
        with self._lock:
            self._ledger.close()

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key behind an ``Authorization: Bearer ...`` header, or AuthError."""
        if not authorization:
            raise AuthError("missing API key: send `Authorization: Bearer <key>`")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthError("malformed Authorization header: expected `Bearer <key>`")
        self._refresh()
        key = self._by_hash.get(hash_key(secret.strip()))
        if key is None:
            raise AuthError("unknown API key")
        if key.revoked:
            raise AuthError(f"API key {key.key_id} has been revoked")
        return key

    def admit(self, key: ApiKey) -> None:
        """Count one request against the key's per-minute quota; 429 when spent."""
        limit = key.requests_per_minute or self._default_rpm
        now = self._clock()
        with self._lock:
            recent = self._recent.setdefault(key.key_id, deque())
            while recent and recent[0] <= now - 60.0:
                recent.popleft()
            if len(recent) >= limit:
                raise RateLimitedError(f"key {key.key_id} exceeded {limit} requests per minute",
                                       retry_after=recent[0] + 60.0 - now)
            recent.append(now)
        self.check_tokens(key)

    def check_tokens(self, key: ApiKey, tokens: int = 0) -> None:
        """429 when the key's tokens for this UTC day (settled and reserved) are spent."""
        with self._lock:
            self._check(key, self._day(), tokens)

    def reserve(self, key: ApiKey, tokens: int) -> Reservation:
        """Set ``tokens`` aside for a call, or 429 when they would pass today's quota."""
        with self._lock:
            day = self._day()
            self._check(key, day, tokens)
            slot = (key.key_id, day)
            self._reserved[slot] = self._reserved.get(slot, 0) + tokens
            return Reservation(key.key_id, day, tokens)

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Release a reservation and charge what the call really cost (0 when it failed)."""
        with self._lock:
            slot = (reservation.key_id, reservation.day)
            left = self._reserved.get(slot, 0) - reservation.tokens
            if left > 0:
                self._reserved[slot] = left
            else:
                self._reserved.pop(slot, None)
            if tokens:
                self._ledger.add(reservation.key_id, reservation.day, tokens)

    def charge(self, key: ApiKey, tokens: int) -> None:
        """Add the tokens of a finished call to the key's daily count."""
        with self._lock:
            self._ledger.add(key.key_id, self._day(), tokens)

    def used_today(self, key: ApiKey) -> int:
        with self._lock:
            return self._ledger.used(key.key_id, self._day())

    def _day(self) -> int:
        return math.floor(self._clock() / 86400.0)

    def _check(self, key: ApiKey, day: int, tokens: int) -> None:
        limit = key.tokens_per_day or self._default_tpd
        used = self._ledger.used(key.key_id, day) + self._reserved.get((key.key_id, day), 0)
        if used >= limit or used + tokens > limit:
            next_midnight = (day + 1) * 86400.0
            raise RateLimitedError(
                f"key {key.key_id} used its {limit} tokens for today (UTC)" if used >= limit else
                f"key {key.key_id} has {limit - used} of its {limit} tokens left today (UTC); "
                f"this call may cost {tokens}",
                retry_after=max(1.0, next_midnight - self._clock()))

    def _refresh(self) -> None:
        """Re-read the keys file when it changed (revocations apply at once)."""
        try:
            status = self._store.path.stat()
            stamp: tuple[float, int] | None = (status.st_mtime, status.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp == self._stamp and self._by_hash:
                return
            keys = self._store.load() + self._extra
            self._by_hash = {key.sha256: key for key in keys}
            self._stamp = stamp
