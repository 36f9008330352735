"""The gateway's ASGI app: /v1/continue, /v1/score, /v1/models, /health, /metrics.

``create_app(settings, backend=None)`` does no work at import time; the backend named in the
settings is loaded when the app starts (or a ready one is injected, as tests do). Backend calls
run in worker threads, at most ``backend.max_concurrency`` at once, so the event loop keeps
answering health checks and metrics while the model computes. Calls of one session are
serialised by a per-session lock, because each call extends the sequence the previous one left.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException
from starlette.routing import Match

from expert_gateway.backends import build_backend
from expert_gateway.backends.base import ContinueOptions, ContinuesAsync, ExpertBackend
from expert_gateway.errors import (
    SHARED_ERRORS,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    SessionLostError,
    TokenizerMismatchError,
    UnavailableError,
    handle_exception,
    response_for,
)
from expert_gateway.keys import ApiKey, Authenticator, KeyStore
from expert_gateway.metrics import GatewayMetrics
from expert_gateway.sessions import SessionStore
from expert_gateway.settings import GatewaySettings
from tandem_core.protocol import (
    ContinueReply,
    ContinueRequest,
    ErrorReply,
    ModelInfo,
    ScoreReply,
    ScoreRequest,
)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorReply} for status in (400, 401, 404, 409, 413, 422, 429, 503)
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class GatewayState:
    """Everything one app instance owns."""

    settings: GatewaySettings
    backend: ExpertBackend | None
    owns_backend: bool
    sessions: SessionStore
    metrics: GatewayMetrics
    authenticator: Authenticator | None
    limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    in_flight: int = 0

    def ready_backend(self) -> ExpertBackend:
        if self.backend is None:
            raise UnavailableError("the expert model is not loaded yet")
        return self.backend


def create_app(settings: GatewaySettings, backend: ExpertBackend | None = None) -> FastAPI:
    """The gateway app; loads ``settings.model`` at startup unless ``backend`` is given."""
    state = _build_state(settings, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.backend is None:
            state.backend = await anyio.to_thread.run_sync(build_backend, settings)
        state.limiter = anyio.CapacityLimiter(state.backend.max_concurrency)
        try:
            yield
        finally:
            if state.owns_backend and state.backend is not None:
                state.backend.close()
            if state.authenticator is not None:
                state.authenticator.close()

    # The API description helps attackers as much as users: served only when asked for.
    docs = settings.server.api_docs
    app = FastAPI(title="Tandem expert gateway", version="1", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.gateway = state
    handled: tuple[type[Exception], ...] = (GatewayError, *SHARED_ERRORS, RequestValidationError,
                                            HTTPException, Exception)
    for error_class in handled:
        app.add_exception_handler(error_class, handle_exception)
    _add_routes(app, state)
    app.add_middleware(_Auth, authenticator=state.authenticator,
                       metrics_need_key=settings.auth.metrics_require_key)
    app.add_middleware(_BodyLimit, max_body_bytes=settings.server.max_body_bytes)
    app.add_middleware(_RequestMetrics, metrics=state.metrics)
    return app


def _build_state(settings: GatewaySettings, backend: ExpertBackend | None) -> GatewayState:
    def forget(session_id: str) -> None:
        if state.backend is not None:
            state.backend.forget(session_id)

    sessions = SessionStore(max_sessions=settings.sessions.max_sessions,
                            memory_budget_tokens=settings.sessions.memory_budget_tokens,
                            idle_ttl_s=settings.sessions.idle_ttl_s, on_evict=forget)
    authenticator = None
    if settings.auth.enabled:
        authenticator = Authenticator(KeyStore(settings.auth.keys_file),
                                      extra_hashes=settings.auth.key_hashes,
                                      requests_per_minute=settings.auth.requests_per_minute,
                                      tokens_per_day=settings.auth.tokens_per_day,
                                      usage_path=settings.auth.quota_path)
    metrics = GatewayMetrics(active_sessions=lambda: len(sessions),
                             held_tokens=lambda: sessions.held_total)
    state = GatewayState(settings=settings, backend=backend, owns_backend=backend is None,
                         sessions=sessions, metrics=metrics, authenticator=authenticator)
    return state


def _add_routes(app: FastAPI, state: GatewayState) -> None:
    # Declares the bearer scheme in the OpenAPI schema; the _Auth middleware enforces it.
    secured = [Depends(HTTPBearer(auto_error=False))] if state.authenticator is not None else []

    @app.post("/v1/continue", response_model=ContinueReply, responses=ERROR_RESPONSES,
              dependencies=secured)
    async def continue_(request: ContinueRequest, http: Request) -> ContinueReply:
        return await _continue(state, request, _caller(http))

    @app.post("/v1/score", response_model=ScoreReply, responses=ERROR_RESPONSES,
              dependencies=secured)
    async def score(request: ScoreRequest, http: Request) -> ScoreReply:
        return await _score(state, request, _caller(http))

    @app.get("/v1/models", response_model=list[ModelInfo], responses=ERROR_RESPONSES,
              dependencies=secured)
    async def models() -> list[ModelInfo]:
        return [state.ready_backend().info]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        backend = state.ready_backend()
        return {"status": "ok", "model": backend.info.name, "sessions": len(state.sessions)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")


def _caller(http: Request) -> ApiKey | None:
    """The key the auth middleware admitted (None when auth is off)."""
    key = http.scope.get("state", {}).get("api_key")
    return key if isinstance(key, ApiKey) else None


def _check_model(info: ModelInfo, model: str, tokenizer: str) -> None:
    if model != info.name:
        raise NotFoundError(f"unknown model {model!r}: this gateway serves {info.name!r}")
    if tokenizer != info.tokenizer:
        raise TokenizerMismatchError(
            f"tokenizer fingerprint {tokenizer} does not match the expert's {info.tokenizer}: "
            "base and expert must share a vocabulary"
        )


def _check_tokens(info: ModelInfo, tokens: list[int]) -> None:
    if tokens and max(tokens) >= info.vocab_size:
        raise InvalidRequestError(
            f"token id {max(tokens)} is outside the vocabulary (size {info.vocab_size})")


async def _run_backend(state: GatewayState, route: str, work: Callable[[], Any],
                       awaited: Callable[[], Awaitable[Any]] | None = None) -> Any:
    """``work`` on a worker thread, or ``awaited`` on the event loop when the backend offers it
    (``ContinuesAsync``); either way the call runs to its end once started."""
    if state.in_flight >= state.settings.server.max_queue:
        raise UnavailableError(f"{state.in_flight} calls are queued: try again shortly")
    state.in_flight += 1
    try:
        async with state.limiter:
            started = time.perf_counter()
            if awaited is not None:
                with anyio.CancelScope(shield=True):  # as uncancellable as the worker thread
                    result = await awaited()
            else:
                result = await anyio.to_thread.run_sync(work)
            state.metrics.backend_latency.observe(time.perf_counter() - started, route=route)
            return result
    finally:
        state.in_flight -= 1


async def _continue(state: GatewayState, request: ContinueRequest, key: ApiKey | None) -> ContinueReply:
    backend = state.ready_backend()
    info = backend.info
    _check_model(info, request.model, request.tokenizer)
    _check_tokens(info, request.tokens)
    options = ContinueOptions(max_tokens=request.max_tokens, temperature=request.temperature,
                              seed=request.seed, top_logprobs=request.top_logprobs, want_logprobs=True)
    session = _scoped(key, request.session)
    async with state.sessions.locked(session):
        try:
            sequence = state.sessions.resolve(session, request.held, request.tokens)
        except SessionLostError:
            state.metrics.session_conflicts.inc()
            raise
        if len(sequence) + request.max_tokens > info.max_context:
            raise InvalidRequestError(
                f"a sequence of {len(sequence)} tokens plus max_tokens {request.max_tokens} exceeds "
                f"the expert's context of {info.max_context} tokens"
            )
        # Worst case: the backend re-reads the whole sequence and writes max_tokens.
        with _quota(state, key, len(sequence) + request.max_tokens) as charge:
            result = await _run_backend(
                state, "/v1/continue", lambda: backend.continue_(session, sequence, options=options),
                (lambda: backend.continue_async(session, sequence, options=options))
                if isinstance(backend, ContinuesAsync) else None)
            charge(result.prefilled_tokens + len(result.tokens))
        state.sessions.commit(session, sequence + result.tokens)
    state.metrics.prefill_tokens.inc(result.prefilled_tokens)
    state.metrics.prefill_saved.inc(result.reused_tokens)
    _count_tokens(state, "/v1/continue", len(request.tokens), len(result.tokens))
    return ContinueReply(tokens=result.tokens, logprobs=result.logprobs,
                         held=len(sequence) + len(result.tokens), model=info.name)


async def _score(state: GatewayState, request: ScoreRequest, key: ApiKey | None) -> ScoreReply:
    backend = state.ready_backend()
    info = backend.info
    _check_model(info, request.model, request.tokenizer)
    for item in request.sequences:
        _check_tokens(info, item.tokens)
        if len(item.tokens) > info.max_context:
            raise InvalidRequestError(f"a sequence of {len(item.tokens)} tokens exceeds the expert's "
                                      f"context of {info.max_context} tokens")
        if item.start > len(item.tokens):
            raise InvalidRequestError(f"start {item.start} is past the end of a sequence of "
                                      f"{len(item.tokens)} tokens")
    tokens_in = sum(len(item.tokens) for item in request.sequences)
    most = tokens_in + sum(len(item.tokens) - item.start for item in request.sequences)
    with _quota(state, key, most) as charge:
        results = await _run_backend(state, "/v1/score", lambda: backend.score(request.sequences))
        scored = sum(len(result.logprobs) for result in results)
        charge(tokens_in + scored)  # every sequence is read in full
    _count_tokens(state, "/v1/score", tokens_in, scored)
    return ScoreReply(results=results)


def _scoped(key: ApiKey | None, session: str) -> str:
    """The session's id inside the gateway: each key has its own namespace of sessions.

    ``/`` cannot occur in a wire session id, so no key can name another key's session.
    """
    return session if key is None else f"{key.key_id}/{session}"


@contextlib.contextmanager
def _quota(state: GatewayState, key: ApiKey | None,
           worst_case: int) -> Iterator[Callable[[int], None]]:
    """Reserve ``worst_case`` tokens of the key's daily quota; settle with what was charged.

    Reserving before the call is what keeps concurrent calls inside the quota: each one sees
    the others' reservations. A failed call is charged nothing.
    """
    if key is None or state.authenticator is None:
        yield lambda tokens: None
        return
    authenticator = state.authenticator
    reservation = authenticator.reserve(key, worst_case)
    cost = [0]
    try:
        yield lambda tokens: cost.__setitem__(0, tokens)
    finally:
        authenticator.settle(reservation, cost[0])


def _count_tokens(state: GatewayState, route: str, tokens_in: int, tokens_out: int) -> None:
    state.metrics.tokens_in.inc(tokens_in, route=route)
    state.metrics.tokens_out.inc(tokens_out, route=route)


class _BodyLimit:
    """413 for bodies over the limit, by Content-Length up front or by counting a stream."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            response = response_for(HTTPException(413, f"request body exceeds {self.max_body_bytes} bytes")
                                    if declared.isdigit() else HTTPException(400, "bad Content-Length"))
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, f"request body exceeds {self.max_body_bytes} bytes")
            return message

        await self.app(scope, counted, send)


class _Auth:
    """Bearer key and request quota for /v1/*, checked before the body is even read."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator | None,
                 metrics_need_key: bool = False) -> None:
        self.app = app
        self.authenticator = authenticator
        self.metrics_need_key = metrics_need_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.authenticator is None:
            await self.app(scope, receive, send)
            return
        metrics = self.metrics_need_key and scope["path"] == "/metrics"
        if not metrics and not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers", [])).get(b"authorization")
        try:
            key = self.authenticator.authenticate(header.decode("latin-1") if header else None)
            if not metrics:
                self.authenticator.admit(key)
        except GatewayError as exc:
            await response_for(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


class _RequestMetrics:
    """Count requests by route template and status, and time them."""

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route_of(scope)
        status = {"code": 500}
        started = time.perf_counter()

        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            self.metrics.requests.inc(route=route, status=str(status["code"]))
            self.metrics.latency.observe(time.perf_counter() - started, route=route)


def _route_of(scope: Scope) -> str:
    """The matched route's path, or "other" (keeps label cardinality bounded)."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "other"
