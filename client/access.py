"""Who may use the daemon: open to every local user, or locked by an API key.

Locked, every route but the page itself, ``/health`` and the login routes needs the key: API
clients send ``Authorization: Bearer <key>``; the web page posts the key once to ``/login`` and
gets an HttpOnly, SameSite=Strict session cookie, so no script (and no other site) can read or
replay it and the key is never kept in the browser's storage. Sessions live in memory: a
restarted daemon asks for the key again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr

from client.openai_api import ApiError

SESSION_COOKIE = "tandem_session"
OPEN_PATHS = frozenset({"/", "/health", "/login", "/logout", "/v1/session"})
_MAX_SESSIONS = 1024
_MAX_LOGIN_BYTES = 4096


@dataclass
class Access:
    """The daemon's lock: ``api_key`` None means open to anyone who can reach the socket."""

    api_key: SecretStr | None = None
    session_ttl_s: float = 12 * 3600

    def __post_init__(self) -> None:
        self._sessions: dict[bytes, float] = {}  # sha256 of the session token -> expiry
        self._lock = threading.Lock()

    @property
    def locked(self) -> bool:
        return self.api_key is not None

    def refusal(self, request: Request) -> ApiError | None:
        """401 for a locked daemon's routes without the key or a live session."""
        if request.url.path in OPEN_PATHS or self.authenticated(request):
            return None
        return ApiError(401, "this daemon is locked: send `Authorization: Bearer <key>` or log in "
                        "on the web page (the key: `tandem keys get daemon-api --reveal`)",
                        error_type="authentication_error")

    def authenticated(self, request: Request) -> bool:
        """Whether the request carries the key or a live session (always, when open)."""
        if not self.locked:
            return True
        if self._key_matches(_bearer(request.headers.get("authorization", ""))):
            return True
        return self._session_alive(request.cookies.get(SESSION_COOKIE, ""))

    def login(self, offered: str) -> str | None:
        """A new session token for the right key, else None."""
        if not self._key_matches(offered):
            return None
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            for stale in [key for key, expiry in self._sessions.items() if expiry < now]:
                del self._sessions[stale]
            if len(self._sessions) >= _MAX_SESSIONS:
                del self._sessions[min(self._sessions, key=self._sessions.__getitem__)]
            self._sessions[_digest(token)] = now + self.session_ttl_s
        return token

    def logout(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(_digest(token), None)

    def _key_matches(self, offered: str) -> bool:
        if self.api_key is None or not offered:
            return False
        return hmac.compare_digest(_digest(offered), _digest(self.api_key.get_secret_value()))

    def _session_alive(self, token: str) -> bool:
        if not token:
            return False
        with self._lock:
            expiry = self._sessions.get(_digest(token))
        return expiry is not None and expiry > time.time()


def add_access_routes(app: FastAPI, access: Access) -> None:
    """``/v1/session`` (am I in?), ``/login`` (key -> cookie) and ``/logout``."""

    @app.get("/v1/session")
    async def session(request: Request) -> dict[str, Any]:
        return {"locked": access.locked, "authenticated": access.authenticated(request)}

    @app.post("/login")
    async def login(request: Request) -> Response:
        token = access.login(await _offered_key(request)) if access.locked else None
        if token is None:
            raise ApiError(401, "wrong key" if access.locked else "this daemon is not locked",
                           error_type="authentication_error")
        response = JSONResponse({"authenticated": True})
        response.set_cookie(SESSION_COOKIE, token, max_age=int(access.session_ttl_s),
                            httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        access.logout(request.cookies.get(SESSION_COOKIE, ""))
        response = JSONResponse({"authenticated": False})
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response


async def _offered_key(request: Request) -> str:
    """The key from a JSON ``{"key": ...}`` or a form ``key=...`` body (small bodies only)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_LOGIN_BYTES:
            raise ApiError(413, "the login body is too large", error_type="too_large")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            raise ApiError(400, "the login body is not JSON") from exc
        key = data.get("key") if isinstance(data, dict) else None
        return key if isinstance(key, str) else ""
    values = parse_qs(body.decode("utf-8", errors="replace")).get("key", [""])
    return values[0]


def _bearer(header: str) -> str:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()
