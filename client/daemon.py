"""The local HTTP service: an OpenAI-compatible API, a documents API, a web page and metrics.

``create_app(services)`` builds the FastAPI app from services loaded once at the entry point
(nothing happens at import). Model work runs on one worker thread fed by a fair, bounded queue
(``client.model_worker``); request handlers only parse, queue, stream and format. Every error a
client can cause is a JSON 4xx in OpenAI's error shape; the worker survives any failing job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.access import Access, add_access_routes
from client.assistant import (
    Answer,
    AnswerToken,
    Assistant,
    ChatTurn,
    Question,
    new_request_id,
)
from client.documents import DocumentInfo, DocumentNotFoundError, DocumentStore
from client.errors import DocumentParseError, DocumentTooLargeError
from client.metrics import Metrics
from client.model_worker import ClientQueueFullError, ModelWorker, QueueFullError
from client.openai_api import (
    ApiError,
    ChatCompletionBody,
    ChatShape,
    CompletionBody,
    CompletionShape,
    GenerationBody,
    TextDocumentBody,
    error_json,
)
from client.settings import DaemonSettings, DecodingSettings
from tandem_core.errors import ContextOverflowError, TandemError
from tandem_core.settings import default_of

logger = logging.getLogger(__name__)

EgressReader = Callable[[str], list[dict[str, Any]]]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_MAX_JSON_BYTES = 8 * 1024 * 1024


@dataclass
class DaemonServices:
    """Everything the daemon serves with, loaded once by the entry point."""

    assistant: Assistant
    documents: DocumentStore
    model_name: str
    egress_reader: EgressReader | None = None
    api_key: SecretStr | None = None
    max_upload_bytes: int = default_of(DaemonSettings, "max_upload_bytes")
    max_queue: int = default_of(DaemonSettings, "max_queue")
    max_queue_per_client: int = default_of(DaemonSettings, "max_queue_per_client")
    max_parallel: int = 1  # answers run at once (the decoder pool's size)
    trusted_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # None: any Host header
    default_max_tokens: int = default_of(DecodingSettings, "max_tokens")
    default_temperature: float = default_of(DecodingSettings, "temperature")
    on_close: list[Callable[[], None]] = field(default_factory=list)


def error_for(exc: Exception) -> ApiError:
    """The single place where Tandem errors become HTTP statuses."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ClientQueueFullError):
        return ApiError(429, str(exc), error_type="rate_limit_error",
                        headers={"Retry-After": f"{exc.retry_after:.0f}"})
    if isinstance(exc, QueueFullError):
        return ApiError(503, str(exc), error_type="server_busy",
                        headers={"Retry-After": f"{exc.retry_after:.0f}"})
    if isinstance(exc, DocumentTooLargeError):
        return ApiError(413, str(exc), error_type="too_large")
    if isinstance(exc, DocumentParseError):
        return ApiError(422, str(exc), error_type="unprocessable_document")
    if isinstance(exc, DocumentNotFoundError):
        return ApiError(404, str(exc), error_type="not_found")
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, f"the prompt is too long: {exc}", error_type="context_length_exceeded")
    if isinstance(exc, TandemError):
        return ApiError(500, str(exc), error_type="server_error")
    return ApiError(500, "internal error; see the daemon's log", error_type="server_error")


# -- bridging the worker thread to async handlers ---------------------------------------------

class AnswerRun:
    """Events of one answer, passed from the worker thread to the handler's event loop.

    Events wait in a deque, and the loop is woken only when the deque turns non-empty: one
    ``call_soon_threadsafe`` per burst instead of one per token, because each wake-up takes the
    GIL and a core from the decoding threads. A non-streamed answer (``stream=False``) keeps no
    token events at all; its handler only reads the final answer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, stream: bool = True) -> None:
        self._loop = loop
        self._stream = stream
        self._buffer: deque[AnswerToken | Answer | Exception] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self.cancelled = threading.Event()

    def emit(self, event: AnswerToken | Answer | Exception) -> None:
        if not self._stream and isinstance(event, AnswerToken):
            return
        with self._lock:
            self._buffer.append(event)
            if len(self._buffer) > 1:
                return  # a wake-up is already on its way
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self._ready.set)

    async def events(self) -> AsyncIterator[AnswerToken | Answer]:
        while True:
            await self._ready.wait()
            with self._lock:
                self._ready.clear()
                batch = list(self._buffer)
                self._buffer.clear()
            for event in batch:
                if isinstance(event, Exception):
                    raise error_for(event) from event
                yield event
                if isinstance(event, Answer):
                    return


class Daemon:
    """The daemon's behaviour behind the routes: queueing, answering and formatting."""

    def __init__(self, services: DaemonServices) -> None:
        self.services = services
        self.metrics = Metrics(queue_depth=lambda: len(self.worker.queue),
                               worker_busy=lambda: int(self.worker.busy),
                               answers_running=lambda: self.worker.running,
                               documents=lambda: len(services.documents.list_documents()))
        self.worker = ModelWorker(max_queue=services.max_queue,
                                  max_per_client=services.max_queue_per_client,
                                  max_parallel=services.max_parallel)
        self.started = time.time()

    def submit(self, question: Question, *, request_id: str, client: str,
               stream: bool = True) -> AnswerRun:
        run = AnswerRun(asyncio.get_running_loop(), stream=stream)

        def job() -> None:
            try:
                answer = self.services.assistant.answer(
                    question, request_id=request_id, on_token=run.emit, cancelled=run.cancelled)
            except Exception as exc:
                if not isinstance(exc, TandemError):
                    logger.exception("answer %s failed", request_id)
                run.emit(exc)
                return
            self.metrics.record_answer(answer)
            run.emit(answer)

        self.worker.submit(client, job, cancelled=run.cancelled)
        return run

    def question(self, body: GenerationBody, *, messages: list[ChatTurn] | None = None,
                 prompt: str | None = None, max_tokens: int | None = None) -> Question:
        """The question a request asks; chats search the documents by default, raw prompts not."""
        services = self.services
        retrieve = prompt is None
        if body.tandem is not None and body.tandem.retrieve is not None:
            retrieve = body.tandem.retrieve
        temperature = body.temperature
        return Question(
            messages=messages or [], prompt=prompt,
            max_tokens=max_tokens or body.max_tokens or services.default_max_tokens,
            temperature=services.default_temperature if temperature is None else temperature,
            seed=body.seed, stop=body.stops(), retrieve=retrieve,
        )


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_json(error), status_code=error.status, headers=error.headers)


# -- the app ------------------------------------------------------------------------------------

def create_app(services: DaemonServices) -> FastAPI:
    """The daemon's ASGI app; the worker thread starts and stops with the app's lifespan."""
    daemon = Daemon(services)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        daemon.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(daemon.worker.stop)
            for close in services.on_close:
                close()

    app = FastAPI(title="Tandem", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.daemon = daemon
    _install_error_handlers(app)
    access = Access(services.api_key)
    _install_middleware(app, daemon, access)
    add_access_routes(app, access)
    _add_page_routes(app, daemon)
    _add_completion_routes(app, daemon)
    _add_document_routes(app, daemon)
    _install_guards(app, services)
    return app


def _install_guards(app: FastAPI, services: DaemonServices) -> None:
    """Outermost layers: bounded request bodies, then the browser security headers."""
    from client.body_limit import BodyLimit
    from client.security_headers import SecurityHeaders, page_csp

    app.add_middleware(BodyLimit, default_bytes=_MAX_JSON_BYTES, path_bytes={
        "/v1/documents": services.max_upload_bytes + _MULTIPART_SLACK})
    html = resources.files("client").joinpath("static/index.html").read_text("utf-8")
    app.add_middleware(SecurityHeaders, csp=page_csp(html))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(TandemError)
    async def tandem_error(_: Request, exc: TandemError) -> JSONResponse:
        return error_response(error_for(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in problem["loc"] if part != "body")
        message = f"{where}: {problem['msg']}" if where else str(problem["msg"])
        return error_response(ApiError(400, message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail), error_type="http_error"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=exc)
        return error_response(error_for(exc))


def _install_middleware(app: FastAPI, daemon: Daemon, access: Access) -> None:
    services = daemon.services

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        refusal = _refusal(request, services, access)
        response = error_response(refusal) if refusal else await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        daemon.metrics.record_request(path, response.status_code, time.perf_counter() - started)
        return response


def _refusal(request: Request, services: DaemonServices, access: Access) -> ApiError | None:
    """Why a request is refused before routing: foreign Host or Origin, API key, body size."""
    host = request.headers.get("host", "")
    if services.trusted_hosts is not None and _hostname(host) not in services.trusted_hosts:
        # A loopback daemon answers only to loopback names: this defeats DNS rebinding.
        return ApiError(403, f"host {host!r} is not served here", error_type="forbidden")
    origin = request.headers.get("origin")
    if origin is not None and request.method not in ("GET", "HEAD", "OPTIONS") \
            and origin.split("://", 1)[-1] != host:
        # Web pages elsewhere may not upload, delete or ask on the user's behalf.
        return ApiError(403, f"cross-origin request from {origin} refused", error_type="forbidden")
    refused = access.refusal(request)  # the API key or a login session (client.access)
    if refused is not None:
        return refused
    declared = request.headers.get("content-length", "")
    if request.url.path.endswith("completions") and declared.isdigit() \
            and int(declared) > _MAX_JSON_BYTES:
        return ApiError(413, f"the request body is larger than {_MAX_JSON_BYTES} bytes",
                        error_type="too_large")
    return None


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def _add_page_routes(app: FastAPI, daemon: Daemon) -> None:
    services = daemon.services

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = resources.files("client").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": services.model_name,
                "queued": len(daemon.worker.queue), "busy": daemon.worker.busy,
                "running": daemon.worker.running,
                "uptime_s": round(time.time() - daemon.started, 3)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(daemon.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": services.model_name, "object": "model", "created": int(daemon.started),
            "owned_by": "tandem"}]}

    @app.get("/v1/egress/{request_id}")
    async def egress(request_id: str) -> dict[str, Any]:
        if services.egress_reader is None:
            return {"request_id": request_id, "records": []}
        records = await asyncio.to_thread(services.egress_reader, request_id)
        return {"request_id": request_id, "records": records}


def _client_key(request: Request, body: GenerationBody) -> str:
    host = request.client.host if request.client else "local"
    return f"{host}:{body.user or ''}"


def _add_completion_routes(app: FastAPI, daemon: Daemon) -> None:
    services = daemon.services

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionBody,
                               request: Request) -> JSONResponse | StreamingResponse:
        turns = [ChatTurn(message.role, message.text()) for message in body.messages]
        if not any(turn.role == "user" for turn in turns):
            raise ApiError(400, "messages needs at least one user message", param="messages")
        question = daemon.question(body, messages=turns, max_tokens=body.max_completion_tokens)
        request_id = new_request_id("chatcmpl")
        run = daemon.submit(question, request_id=request_id, client=_client_key(request, body),
                             stream=bool(body.stream))
        shape = ChatShape(request_id, services.model_name)
        return await _respond(run, shape, body)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody,
                          request: Request) -> JSONResponse | StreamingResponse:
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        question = daemon.question(body, prompt=prompt)
        request_id = new_request_id("cmpl")
        run = daemon.submit(question, request_id=request_id, client=_client_key(request, body),
                             stream=bool(body.stream))
        shape = CompletionShape(request_id, services.model_name, prompt if body.echo else "")
        return await _respond(run, shape, body)


async def _respond(run: AnswerRun, shape: ChatShape,
                   body: GenerationBody) -> JSONResponse | StreamingResponse:
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(run, shape, include_usage=include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": shape.request_id})
    try:
        async for event in run.events():
            if isinstance(event, Answer):
                return JSONResponse(shape.whole(event), headers={"X-Request-Id": shape.request_id})
    finally:
        run.cancelled.set()  # a no-op once answered; stops the decoder if the client left
    raise ApiError(500, "the answer ended without a result", error_type="server_error")


async def _stream(run: AnswerRun, shape: ChatShape, *, include_usage: bool) -> AsyncIterator[bytes]:
    first = shape.first_chunk()
    if first is not None:
        yield _sse(first)
    try:
        async for event in run.events():
            if isinstance(event, AnswerToken):
                yield _sse(shape.token_chunk(event))
                continue
            yield _sse(shape.last_chunk(event))
            if include_usage:
                yield _sse(shape.usage_chunk(event))
    except Exception as exc:
        yield _sse(error_json(error_for(exc)))
    finally:
        run.cancelled.set()
    yield _sse("[DONE]")


def _add_document_routes(app: FastAPI, daemon: Daemon) -> None:
    services = daemon.services

    @app.get("/v1/documents")
    async def list_documents() -> dict[str, Any]:
        documents = await asyncio.to_thread(services.documents.list_documents)
        return {"object": "list", "data": [_document_json(info) for info in documents]}

    @app.get("/v1/documents/{document_id}")
    async def get_document(document_id: str) -> dict[str, Any]:
        return _document_json(await asyncio.to_thread(services.documents.get, document_id))

    @app.delete("/v1/documents/{document_id}")
    async def delete_document(document_id: str) -> dict[str, Any]:
        await asyncio.to_thread(services.documents.delete, document_id)
        return {"id": document_id, "object": "document", "deleted": True}

    @app.post("/v1/documents", status_code=201)
    async def upload(request: Request) -> JSONResponse:
        body = await _read_capped(request, services.max_upload_bytes)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            stored = await _ingest_multipart(request, body, services)
        elif content_type.startswith("application/json"):
            stored = [await _ingest_json(body, services)]
        else:
            raise ApiError(415, "send multipart/form-data (field `file`) or JSON "
                           "{name, text, media_type}", error_type="unsupported_media_type")
        return JSONResponse({"object": "list", "data": [_document_json(i) for i in stored]},
                            status_code=201)


def _document_json(info: DocumentInfo) -> dict[str, Any]:
    return {"object": "document", **asdict(info)}


# Multipart framing around a file is small; this much over the limit is still a legal upload.
_MULTIPART_SLACK = 64 * 1024


async def _read_capped(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it passes ``limit`` (the rest is drained, not kept)."""
    cap = limit + _MULTIPART_SLACK
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the upload is larger than the limit of {limit} bytes",
                         error_type="too_large")
    if declared.isdigit() and int(declared) > cap * 8:
        raise too_large  # not worth draining; the server closes the connection
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received <= cap:
            chunks.append(chunk)
        elif received > cap * 8:
            raise too_large
    if received > cap:
        raise too_large
    return b"".join(chunks)


async def _ingest_multipart(request: Request, body: bytes,
                            services: DaemonServices) -> list[DocumentInfo]:
    from starlette.datastructures import UploadFile

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=16, max_fields=16)
    except Exception as exc:  # python-multipart raises several unrelated types
        raise ApiError(400, f"malformed multipart body: {exc}") from exc
    try:
        uploads = [value for value in form.values() if isinstance(value, UploadFile)]
        if not uploads:
            raise ApiError(400, "the multipart body has no file field", param="file")
        stored = []
        for upload in uploads:
            data = await upload.read()
            name = upload.filename or "upload"
            stored.append(await asyncio.to_thread(
                services.documents.ingest, name, data, media_type=upload.content_type))
        return stored
    finally:
        await form.close()


async def _ingest_json(body: bytes, services: DaemonServices) -> DocumentInfo:
    from pydantic import ValidationError

    try:
        document = TextDocumentBody.model_validate_json(body)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise ApiError(400, f"{where}: {problem['msg']}" if where else problem["msg"]) from exc
    return await asyncio.to_thread(services.documents.add_text, document.name, document.text,
                                   media_type=document.media_type)
