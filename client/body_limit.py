"""ASGI middleware that bounds request bodies as they stream in, chunked or not.

A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked or
lying body is counted chunk by chunk and refused the moment it passes the limit, so the daemon
never holds more than ``limit`` bytes of one request. The refusal is a 413 in OpenAI's error
shape when no response has started yet.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_LIMIT = 8 * 1024 * 1024


class BodyLimit:
    """413 for bodies over the limit of their path (the longest matching prefix wins)."""

    def __init__(self, app: ASGIApp, *, default_bytes: int = DEFAULT_LIMIT,
                 path_bytes: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.default_bytes = default_bytes
        self.path_bytes = dict(path_bytes or {})

    def limit_for(self, path: str) -> int:
        matches = [prefix for prefix in self.path_bytes if path.startswith(prefix)]
        return self.path_bytes[max(matches, key=len)] if matches else self.default_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _refuse(send, 400, "bad Content-Length header", "invalid_request_error")
                return
            if int(declared) > limit:
                await _refuse(send, 413, f"the request body is larger than the limit of {limit} bytes",
                              "too_large")
                return
        received = 0
        started = tripped = False

        async def counted() -> Message:
            # Past the limit the app is told the client left, so it stops reading; whatever
            # it answers then is replaced by the 413. (Raising here would reach FastAPI's
            # body parsing wrapped in an ExceptionGroup and come out as a 400.)
            nonlocal received, tripped
            if tripped:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    return {"type": "http.disconnect"}
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if tripped and not started:
                return  # the app's answer to a cut-off body is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not tripped or started:
                raise
        if tripped and not started:
            await _refuse(send, 413, f"the request body is larger than the limit of {limit} bytes",
                          "too_large")


async def _refuse(send: Send, status: int, message: str, error_type: str) -> None:
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None,
                                 "code": status}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
