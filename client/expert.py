"""The remote expert: the ``Expert`` protocol, an in-process expert and ``HttpExpert``.

An expert continues a session's token sequence. The gateway keeps, per session, the sequence it
holds; a call says how many of those tokens the client still relies on (``held``, the gateway
cuts back to it) and sends only what follows. Because a call fully states the sequence it
continues, repeating it gives the same answer, so failed calls are safe to retry.

``InProcessExpert`` runs a ``LlamaModel`` in this process and samples exactly as the gateway does
(``sample_from_logits`` at the absolute position of each token), so tests and benchmarks exercise
the real algorithm without a network. ``HttpExpert`` is the one boundary where httpx errors and
gateway error replies become ``client.errors`` exceptions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx
from pydantic import SecretStr, ValidationError

from client.errors import CircuitOpenError, ExpertAuthError, ExpertRateLimitedError, ExpertUnavailableError
from client.settings import ExpertSettings
from client.transport import DeadlineTransport, call_deadline, check_gateway_url
from tandem_core.base_model import BaseModel
from tandem_core.continuation import ContinueOptions, continue_sequence
from tandem_core.errors import (
    ConfigError,
    ContextOverflowError,
    ExpertError,
    ExpertRejectedError,
    ModelError,
    SessionLostError,
)
from tandem_core.protocol import (
    ContinueReply,
    ContinueRequest,
    ModelInfo,
    ScoreReply,
    ScoreRequest,
    ScoreResult,
    ScoreSequence,
)

ExpertReply = ContinueReply


class Expert(Protocol):
    """Continues a session's token sequence with up to ``max_tokens`` expert tokens."""

    destination: str
    model: str

    def continue_(self, *, session: str, held: int, tokens: Sequence[int], max_tokens: int,
                  temperature: float = 0.0, seed: int | None = None,
                  top_logprobs: int = 0, before_retry: RetryGate | None = None) -> ExpertReply:
        ...


@runtime_checkable
class Gated(Protocol):
    """An expert that can say up front that calling it now is pointless (open circuit)."""

    def ready(self) -> bool:
        ...


@dataclass(frozen=True)
class ExpertCall:
    """One call as an expert received it (for tests and benchmarks)."""

    session: str
    held: int
    tokens: tuple[int, ...]
    max_tokens: int


@dataclass
class InProcessExpert:
    """An expert running a local ``BaseModel`` with the gateway's session and sampling rules.

    The sampling loop and the cache-reusing prefill are ``tandem_core.continuation``'s, the same
    code the gateway's llama.cpp backend runs; only the session table and the mapping of model
    errors to the gateway's statuses are kept here.
    """

    base: BaseModel  # a LlamaModel in practice (tandem_core.base_model imports llama_cpp lazily)
    model: str = "toy-expert"
    destination: str = "in-process"
    calls: list[ExpertCall] = field(default_factory=list)
    _sessions: dict[str, list[int]] = field(default_factory=dict)

    def forget(self, session: str) -> None:
        """Drop a session, as a gateway does on eviction or restart."""
        self._sessions.pop(session, None)

    def continue_(self, *, session: str, held: int, tokens: Sequence[int], max_tokens: int,
                  temperature: float = 0.0, seed: int | None = None,
                  top_logprobs: int = 0, before_retry: RetryGate | None = None) -> ExpertReply:
        self.calls.append(ExpertCall(session, held, tuple(tokens), max_tokens))
        history = self._sessions.get(session, [])
        if held > len(history):
            raise SessionLostError(f"session {session} holds {len(history)} tokens, not {held}",
                                   status_code=409, error_type="session_lost")
        sequence = history[:held] + [int(token) for token in tokens]
        if not sequence:
            raise ExpertRejectedError("nothing to continue: the sequence is empty",
                                      status_code=422, error_type="invalid_request")
        options = ContinueOptions(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                  top_logprobs=top_logprobs, want_logprobs=top_logprobs > 0)
        try:
            generated, logprobs, _ = continue_sequence(self.base, sequence, options=options)
        except ContextOverflowError as exc:
            raise ExpertRejectedError(str(exc), status_code=413, error_type="too_large") from exc
        except ModelError as exc:
            raise ExpertUnavailableError(f"expert model failed: {exc}") from exc
        self._sessions[session] = sequence + generated
        return ContinueReply(tokens=generated, logprobs=logprobs,
                             held=len(sequence) + len(generated), model=self.model)


class CircuitBreaker:
    """Stops calling a failing expert: opens after N consecutive failures, retries after a pause.

    After ``reset_s`` the circuit is half-open: one call goes through; success closes it, failure
    opens it again for another ``reset_s``.
    """

    def __init__(self, *, failures: int = 3, reset_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_limit = failures
        self.reset_s = reset_s
        self._clock = clock
        self._consecutive_failures = 0
        self._opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        if self._opened_at is None:
            return False
        return self._clock() - self._opened_at < self.reset_s

    def check(self) -> None:
        if self.is_open:
            raise CircuitOpenError(
                f"expert skipped: {self._consecutive_failures} consecutive failures, "
                f"retrying in {self.reset_s - (self._clock() - (self._opened_at or 0.0)):.0f}s"
            )

    def record_success(self) -> None:
        self._consecutive_failures = 0
        self._opened_at = None

    def record_failure(self) -> None:
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.failure_limit:
            self._opened_at = self._clock()


MAX_ERROR_TEXT = 300  # characters of a gateway's error message kept (audit log, exceptions)
DEFAULT_MAX_REPLY_BYTES = 4 * 1024 * 1024


class RetryGate(Protocol):
    """Called before each retry of a call; raises (e.g. ``ExpertDeniedError``) to stop it.

    Every attempt is a request on the wire, so whoever authorizes calls must see each one:
    the decoder writes a fresh audit record and counts the attempt against the caps here.
    """

    def __call__(self, attempt: int, error: ExpertError, /) -> None:
        ...


def parse_error(response: httpx.Response, content: bytes | None = None) -> ExpertError:
    """Turn a gateway error response (status + ``{error: {type, message}}``) into an error.

    ``content``: the body when it was streamed (and capped) rather than read by httpx.
    """
    status, headers = response.status_code, response.headers
    error_type, message = _error_fields(response.content if content is None else content)
    text = f"expert gateway answered {status} {error_type}: {message}".rstrip(": ")
    if status in (401, 403):
        return ExpertAuthError(text + "; check the token (`tandem keys set gateway`)",
                               status_code=status, error_type=error_type)
    if status == 409:
        return SessionLostError(text, status_code=status, error_type=error_type)
    if status == 429:
        return ExpertRateLimitedError(text, status_code=status, error_type=error_type,
                                      retry_after=_retry_after(headers))
    if status >= 500:
        return ExpertUnavailableError(text)
    return ExpertRejectedError(text, status_code=status, error_type=error_type)


def _error_fields(content: bytes) -> tuple[str, str]:
    try:
        error = json.loads(content)["error"]
        return str(error.get("type", ""))[:64], str(error.get("message", ""))[:MAX_ERROR_TEXT]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", content[:MAX_ERROR_TEXT].decode("utf-8", "replace")


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        return max(0.0, float(headers.get("retry-after", "")))
    except ValueError:
        return None


@contextmanager
def map_httpx_errors(url: str, timeout_s: float) -> Iterator[None]:
    """The one place httpx exceptions become client errors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ExpertUnavailableError(
            f"expert gateway {url} did not answer within {timeout_s:g}s ({type(exc).__name__})"
        ) from exc
    except httpx.UnsupportedProtocol as exc:
        raise ConfigError(f"expert gateway URL {url} needs http:// or https://") from exc
    except httpx.TransportError as exc:
        raise ExpertUnavailableError(f"cannot reach expert gateway {url}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise ExpertError(f"expert gateway {url} sent an unreadable response: {exc}") from exc
    except httpx.InvalidURL as exc:
        raise ConfigError(f"bad expert gateway URL {url}: {exc}") from exc
    except httpx.StreamError as exc:
        raise ExpertError(f"expert gateway {url}: {exc}") from exc


class _Delivery:
    """Watches httpcore's trace events: did the request body reach the socket?"""

    def __init__(self) -> None:
        self.delivered = False

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event in ("http11.send_request_body.complete", "http2.send_request_body.complete"):
            self.delivered = True


class HttpExpert:
    """An expert behind the gateway's HTTP API, with deadlines, retries and a circuit breaker.

    ``timeout_s`` is a total deadline for one call, retries included: every socket operation is
    clamped to the time left (``client.transport``). Replies larger than ``max_reply_bytes`` are
    refused while they stream in, before anything is parsed. Each failure says whether the
    request was delivered (its body written to the socket) and whether anything answered.
    """

    def __init__(self, url: str, *, model: str, tokenizer: str, token: SecretStr | None = None,
                 client: httpx.Client | None = None, connect_timeout_s: float = 2.0,
                 timeout_s: float = 10.0, retries: int = 1, breaker: CircuitBreaker | None = None,
                 sleep: Callable[[float], None] = time.sleep, verify_tls: bool = True,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
                 allow_insecure_http: bool = False) -> None:
        check_gateway_url(url, allow_insecure_http=allow_insecure_http)
        self.destination = url.rstrip("/")
        self.model = model
        self.tokenizer = tokenizer
        self.retries = retries
        self.breaker = breaker or CircuitBreaker()
        self.max_reply_bytes = max_reply_bytes
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._owns_client = client is None
        self._client = client or httpx.Client(transport=DeadlineTransport(verify=verify_tls))
        self._headers = {"authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    @classmethod
    def from_settings(cls, settings: ExpertSettings, *, tokenizer: str,
                      token: SecretStr | None = None,
                      client: httpx.Client | None = None) -> HttpExpert:
        return cls(settings.url, model=settings.model, tokenizer=tokenizer, token=token,
                   client=client, connect_timeout_s=settings.connect_timeout_s,
                   timeout_s=settings.timeout_s, retries=settings.retries,
                   breaker=CircuitBreaker(failures=settings.breaker_failures,
                                          reset_s=settings.breaker_reset_s),
                   verify_tls=settings.verify_tls, max_reply_bytes=settings.max_reply_bytes,
                   allow_insecure_http=settings.allow_insecure_http)

    def ready(self) -> bool:
        return not self.breaker.is_open

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def probe(self, *, timeout_s: float = 2.0) -> str | None:
        """Why the gateway cannot be reached right now, or None when it answers ``/health``."""
        url = self.destination + "/health"
        try:
            with map_httpx_errors(url, timeout_s), call_deadline(time.monotonic() + timeout_s):
                response = self._client.get(url, timeout=timeout_s)
        except (ExpertError, ConfigError) as exc:
            return str(exc)
        if response.status_code >= 500:
            return f"{url} answered {response.status_code}"
        return None

    def continue_(self, *, session: str, held: int, tokens: Sequence[int], max_tokens: int,
                  temperature: float = 0.0, seed: int | None = None,
                  top_logprobs: int = 0, before_retry: RetryGate | None = None) -> ExpertReply:
        try:
            request = ContinueRequest(session=session, model=self.model, held=held,
                                      tokens=list(tokens), max_tokens=max_tokens,
                                      temperature=temperature, seed=seed,
                                      top_logprobs=top_logprobs, tokenizer=self.tokenizer)
        except ValidationError as exc:
            raise ExpertRejectedError(f"invalid expert request: {exc.errors()[0]['msg']}",
                                      status_code=422, error_type="invalid_request") from exc
        reply = self._post("/v1/continue", request.model_dump(mode="json"), ContinueReply,
                           before_retry)
        _check_continue_reply(reply, max_tokens, top_logprobs)
        return reply

    def score(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[ScoreResult]:
        """Expert log-probs of ``tokens[start:]`` for each ``(tokens, start)``."""
        request = ScoreRequest(model=self.model, tokenizer=self.tokenizer, sequences=[
            ScoreSequence(tokens=list(tokens), start=start) for tokens, start in sequences])
        return self._post("/v1/score", request.model_dump(mode="json"), ScoreReply).results

    def models(self) -> list[ModelInfo]:
        """The models the gateway serves."""
        from pydantic import TypeAdapter

        return self._send("GET", "/v1/models", None, TypeAdapter(list[ModelInfo]).validate_json)

    def _post(self, path: str, body: dict[str, Any], reply_type: Any,
              before_retry: RetryGate | None = None) -> Any:
        return self._send("POST", path, body, reply_type.model_validate_json, before_retry)

    def _send(self, method: str, path: str, body: dict[str, Any] | None,
              parse: Callable[[bytes], Any], before_retry: RetryGate | None = None) -> Any:
        self.breaker.check()
        deadline = time.monotonic() + self._timeout_s
        attempt = 0
        while True:
            try:
                result = self._attempt(method, path, body, parse, deadline)
            except ExpertUnavailableError as exc:
                self.breaker.record_failure()
                pause = min(2.0, 0.1 * 2**attempt)
                if attempt >= self.retries or self.breaker.is_open \
                        or time.monotonic() + pause >= deadline:
                    raise
                self._sleep(pause)
                attempt += 1
                if before_retry is not None:
                    before_retry(attempt, exc)  # audits and counts the retry, or stops it
            else:
                self.breaker.record_success()
                return result

    def _attempt(self, method: str, path: str, body: dict[str, Any] | None,
                 parse: Callable[[bytes], Any], deadline: float) -> Any:
        url = self.destination + path
        delivery = _Delivery()
        try:
            with map_httpx_errors(url, self._timeout_s), call_deadline(deadline), \
                    self._client.stream(method, url, json=body, headers=self._headers,
                                        timeout=self._timeout,
                                        extensions={"trace": delivery}) as response:
                delivery.delivered = True  # a status line came back: the request got there
                content = self._read_capped(response, url)
        except ExpertError as exc:
            exc.delivered = delivery.delivered
            raise
        if response.status_code >= 400:
            raise _answered(parse_error(response, content))
        try:
            return parse(content)
        except ValidationError as exc:
            raise _answered(ExpertError(f"expert gateway {url} sent a malformed reply: "
                                        f"{_first_error(exc)}")) from exc

    def _read_capped(self, response: httpx.Response, url: str) -> bytes:
        limit = self.max_reply_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _answered(ExpertError(
                f"expert gateway {url} announced a {declared}-byte reply; the limit is {limit}"))
        chunks: list[bytes] = []
        received = 0
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > limit:
                raise _answered(ExpertError(
                    f"expert gateway {url} sent more than {limit} bytes; reply refused"))
            chunks.append(chunk)
        return b"".join(chunks)


def _answered(exc: ExpertError) -> ExpertError:
    exc.delivered = True
    exc.answered = True
    return exc


def _first_error(exc: ValidationError) -> str:
    problem = exc.errors()[0]
    where = ".".join(str(part) for part in problem.get("loc", ()))
    return f"{where}: {problem['msg']}"[:MAX_ERROR_TEXT] if where else problem["msg"][:MAX_ERROR_TEXT]


def reply_problem(reply: ContinueReply, vocab_size: int) -> str | None:
    """Why a reply cannot be used with a base of ``vocab_size`` tokens, or None.

    Top-logprob ids are token ids too (compose mode indexes the base's distribution with
    them), and log-probs must be real log-probabilities: finite and at most 0.
    """
    for entry in reply.logprobs or ():
        for token in (entry.token, *(token for token, _ in entry.top)):
            if not 0 <= token < vocab_size:
                return f"expert returned top-logprob token {token} outside the base vocabulary"
        for logprob in (entry.logprob, *(logprob for _, logprob in entry.top)):
            if not (math.isfinite(logprob) and logprob <= _LOGPROB_SLACK):
                return f"expert returned log-prob {logprob!r}, not a log-probability"
    return None


_LOGPROB_SLACK = 1e-4  # rounding can put log(1) a hair above 0


def _check_continue_reply(reply: ContinueReply, max_tokens: int, top_logprobs: int) -> None:
    """What the schema cannot say: counts agree with the request, log-probs are real log-probs."""
    if len(reply.tokens) > max_tokens:
        raise _answered(ExpertError(
            f"expert returned {len(reply.tokens)} tokens, asked for {max_tokens}"))
    if reply.logprobs is None:
        return
    if len(reply.logprobs) > len(reply.tokens):
        raise _answered(ExpertError(
            f"expert returned {len(reply.logprobs)} log-prob entries for {len(reply.tokens)} tokens"))
    for entry in reply.logprobs:
        if len(entry.top) > max(top_logprobs, 1) * 2:
            raise _answered(ExpertError(
                f"expert returned {len(entry.top)} top log-probs, asked for {top_logprobs}"))
