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
import threading
import time
from collections import deque
from collections.abc import Callable
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


class Authenticator:
    """Checks bearer keys and enforces per-key request and token quotas (in memory)."""

    def __init__(self, store: KeyStore, *, extra_hashes: list[str], requests_per_minute: int,
                 tokens_per_day: int, clock: Callable[[], float] = time.time) -> None:
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
        self._tokens_today: dict[str, tuple[int, int]] = {}  # key id -> (UTC day, tokens)

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

    def check_tokens(self, key: ApiKey) -> None:
        """429 when the key's tokens for this UTC day are spent."""
        limit = key.tokens_per_day or self._default_tpd
        day, used = self._today(key)
        if used >= limit:
            next_midnight = (day + 1) * 86400.0
            raise RateLimitedError(f"key {key.key_id} used its {limit} tokens for today (UTC)",
                                   retry_after=max(1.0, next_midnight - self._clock()))

    def charge(self, key: ApiKey, tokens: int) -> None:
        """Add tokens in and out of a finished call to the key's daily count."""
        with self._lock:
            day, used = self._today(key)
            self._tokens_today[key.key_id] = (day, used + tokens)

    def _today(self, key: ApiKey) -> tuple[int, int]:
        day = math.floor(self._clock() / 86400.0)
        stored_day, used = self._tokens_today.get(key.key_id, (day, 0))
        return day, used if stored_day == day else 0

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
