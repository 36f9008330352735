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

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx
import numpy as np
from pydantic import SecretStr, ValidationError

from client.egress import common_prefix_length
from client.errors import (
    CircuitOpenError,
    ConfigError,
    ContextOverflowError,
    ExpertAuthError,
    ExpertError,
    ExpertRateLimitedError,
    ExpertRejectedError,
    ExpertUnavailableError,
    ModelError,
    SessionLostError,
)
from client.settings import ExpertSettings
from expert_gateway.protocol import (
    ContinueReply,
    ContinueRequest,
    ModelInfo,
    ScoreReply,
    ScoreRequest,
    ScoreResult,
    ScoreSequence,
    TokenLogprob,
    log_softmax,
    sample_from_logits,
)

ExpertReply = ContinueReply


class Expert(Protocol):
    """Continues a session's token sequence with up to ``max_tokens`` expert tokens."""

    destination: str
    model: str

    def continue_(self, *, session: str, held: int, tokens: Sequence[int], max_tokens: int,
                  temperature: float = 0.0, seed: int | None = None,
                  top_logprobs: int = 0) -> ExpertReply:
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
    """An expert running a local ``LlamaModel`` with the gateway's session and sampling rules."""

    base: Any  # a client.base_model.LlamaModel; Any keeps llama_cpp out of import time
    model: str = "toy-expert"
    destination: str = "in-process"
    calls: list[ExpertCall] = field(default_factory=list)
    _sessions: dict[str, list[int]] = field(default_factory=dict)

    def forget(self, session: str) -> None:
        """Drop a session, as a gateway does on eviction or restart."""
        self._sessions.pop(session, None)

    def continue_(self, *, session: str, held: int, tokens: Sequence[int], max_tokens: int,
                  temperature: float = 0.0, seed: int | None = None,
                  top_logprobs: int = 0) -> ExpertReply:
        self.calls.append(ExpertCall(session, held, tuple(tokens), max_tokens))
        history = self._sessions.get(session, [])
        if held > len(history):
            raise SessionLostError(f"session {session} holds {len(history)} tokens, not {held}",
                                   status_code=409, error_type="session_lost")
        sequence = history[:held] + [int(token) for token in tokens]
        if not sequence:
            raise ExpertRejectedError("nothing to continue: the sequence is empty",
                                      status_code=422, error_type="invalid_request")
        try:
            generated, logprobs = self._generate(sequence, max_tokens, temperature, seed,
                                                 top_logprobs)
        except ContextOverflowError as exc:
            raise ExpertRejectedError(str(exc), status_code=413, error_type="too_large") from exc
        except ModelError as exc:
            raise ExpertUnavailableError(f"expert model failed: {exc}") from exc
        self._sessions[session] = sequence + generated
        return ContinueReply(tokens=generated, logprobs=logprobs if top_logprobs else None,
                             held=len(sequence) + len(generated), model=self.model)

    def _generate(self, sequence: list[int], max_tokens: int, temperature: float,
                  seed: int | None, top_logprobs: int) -> tuple[list[int], list[TokenLogprob]]:
        logits = self._logits_after(sequence)
        generated: list[int] = []
        logprobs: list[TokenLogprob] = []
        while True:
            token = sample_from_logits(logits, temperature=temperature, seed=seed,
                                       position=len(sequence) + len(generated))
            generated.append(token)
            if top_logprobs:
                logprobs.append(_token_logprob(logits, token, top_logprobs))
            if len(generated) == max_tokens or self.base.is_end_of_generation(token):
                return generated, logprobs
            logits = self._logits_after(sequence + generated)

    def _logits_after(self, sequence: list[int]) -> np.ndarray:
        """Logits for the token after ``sequence``, reusing the KV cache where it agrees."""
        shared = common_prefix_length(self.base.cached_tokens(), sequence)
        shared = min(shared, len(sequence) - 1)  # always decode at least one token for logits
        self.base.rollback(shared)
        output = self.base.decode(sequence[shared:], last_only=True)
        return np.asarray(output.logits[-1])


def _token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    logprobs = log_softmax(np.asarray(logits, dtype=np.float64))
    best = np.argsort(-logprobs, kind="stable")[:top]
    return TokenLogprob(token=token, logprob=float(logprobs[token]),
                        top=[(int(index), float(logprobs[index])) for index in best])


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


def parse_error(response: httpx.Response) -> ExpertError:
    """Turn a gateway error response (status + ``{error: {type, message}}``) into an error."""
    status = response.status_code
    error_type, message = _error_fields(response)
    text = f"expert gateway answered {status} {error_type}: {message}".rstrip(": ")
    if status in (401, 403):
        return ExpertAuthError(text + "; check the token (`tandem keys set gateway`)",
                               status_code=status, error_type=error_type)
    if status == 409:
        return SessionLostError(text, status_code=status, error_type=error_type)
    if status == 429:
        return ExpertRateLimitedError(text, status_code=status, error_type=error_type,
                                      retry_after=_retry_after(response))
    if status >= 500:
        return ExpertUnavailableError(text)
    return ExpertRejectedError(text, status_code=status, error_type=error_type)


def _error_fields(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
        error = body["error"]
        return str(error.get("type", "")), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", response.text[:200]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
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


class HttpExpert:
    """An expert behind the gateway's HTTP API, with deadlines, retries and a circuit breaker."""

    def __init__(self, url: str, *, model: str, tokenizer: str, token: SecretStr | None = None,
                 client: httpx.Client | None = None, connect_timeout_s: float = 2.0,
                 timeout_s: float = 10.0, retries: int = 1, breaker: CircuitBreaker | None = None,
                 sleep: Callable[[float], None] = time.sleep, verify_tls: bool = True) -> None:
        self.destination = url.rstrip("/")
        self.model = model
        self.tokenizer = tokenizer
        self.retries = retries
        self.breaker = breaker or CircuitBreaker()
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._owns_client = client is None
        self._client = client or httpx.Client(verify=verify_tls)
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
                   verify_tls=settings.verify_tls)

    def ready(self) -> bool:
        return not self.breaker.is_open

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def continue_(self, *, session: str, held: int, tokens: Sequence[int], max_tokens: int,
                  temperature: float = 0.0, seed: int | None = None,
                  top_logprobs: int = 0) -> ExpertReply:
        try:
            request = ContinueRequest(session=session, model=self.model, held=held,
                                      tokens=list(tokens), max_tokens=max_tokens,
                                      temperature=temperature, seed=seed,
                                      top_logprobs=top_logprobs, tokenizer=self.tokenizer)
        except ValidationError as exc:
            raise ExpertRejectedError(f"invalid expert request: {exc.errors()[0]['msg']}",
                                      status_code=422, error_type="invalid_request") from exc
        reply = self._post("/v1/continue", request.model_dump(mode="json"), ContinueReply)
        if len(reply.tokens) > max_tokens:
            raise ExpertError(f"expert returned {len(reply.tokens)} tokens, asked for {max_tokens}")
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

    def _post(self, path: str, body: dict[str, Any], reply_type: Any) -> Any:
        return self._send("POST", path, body, reply_type.model_validate_json)

    def _send(self, method: str, path: str, body: dict[str, Any] | None,
              parse: Callable[[bytes], Any]) -> Any:
        self.breaker.check()
        attempt = 0
        while True:
            try:
                result = self._attempt(method, path, body, parse)
            except ExpertUnavailableError:
                self.breaker.record_failure()
                if attempt >= self.retries or self.breaker.is_open:
                    raise
                self._sleep(min(2.0, 0.1 * 2**attempt))
                attempt += 1
            else:
                self.breaker.record_success()
                return result

    def _attempt(self, method: str, path: str, body: dict[str, Any] | None,
                 parse: Callable[[bytes], Any]) -> Any:
        url = self.destination + path
        with map_httpx_errors(url, self._timeout_s):
            response = self._client.request(method, url, json=body, headers=self._headers,
                                            timeout=self._timeout)
        if response.status_code >= 400:
            raise parse_error(response)
        try:
            return parse(response.content)
        except ValidationError as exc:
            raise ExpertError(f"expert gateway {url} sent a malformed reply: "
                              f"{exc.errors()[0]['msg']}") from exc
