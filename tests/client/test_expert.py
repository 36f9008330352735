"""HttpExpert over httpx.MockTransport and a real uvicorn; the in-process expert on the toy pair."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from client.errors import CircuitOpenError, ExpertAuthError, ExpertRateLimitedError, ExpertUnavailableError
from client.expert import CircuitBreaker, HttpExpert, InProcessExpert, parse_error
from client.settings import ExpertSettings
from tandem_core.errors import ConfigError, ExpertError, ExpertRejectedError, SessionLostError
from tandem_core.protocol import sample_from_logits

FINGERPRINT = "ef" * 32
URL = "https://gateway.test"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reply(tokens: list[int], held: int) -> dict[str, Any]:
    return {"tokens": tokens, "held": held, "model": "toy-expert"}


def make_expert(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> HttpExpert:
    sleeps: list[float] = []
    kwargs.setdefault("sleep", sleeps.append)
    return HttpExpert(URL, model="toy-expert", tokenizer=FINGERPRINT,
                      client=httpx.Client(transport=httpx.MockTransport(handler)), **kwargs)


def test_continue_sends_the_wire_request_and_parses_the_reply() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=reply([7, 8], 12))

    expert = make_expert(handler, token=SecretStr("s3cret"))
    answer = expert.continue_(session="abc", held=4, tokens=[1, 2, 3], max_tokens=2,
                              temperature=0.5, seed=9, top_logprobs=3)
    assert answer.tokens == [7, 8] and answer.held == 12
    assert seen[0].url == f"{URL}/v1/continue"
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    body = json.loads(seen[0].content)
    assert body == {"session": "abc", "model": "toy-expert", "held": 4, "tokens": [1, 2, 3],
                    "max_tokens": 2, "temperature": 0.5, "seed": 9, "top_logprobs": 3,
                    "tokenizer": FINGERPRINT}


def test_no_token_sends_no_authorization_header() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers
        return httpx.Response(200, json=reply([1], 2))

    assert make_expert(handler).continue_(session="s", held=0, tokens=[5], max_tokens=1).tokens == [1]


def test_score_and_models_parse_their_replies() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=[{"name": "toy-expert", "vocab_size": 260,
                                              "tokenizer": FINGERPRINT, "max_context": 512}])
        body = json.loads(request.content)
        assert body["sequences"] == [{"tokens": [1, 2, 3], "start": 1}]
        return httpx.Response(200, json={"results": [{"logprobs": [-0.5, -1.0], "argmax": [2, 4]}]})

    expert = make_expert(handler)
    assert expert.score([([1, 2, 3], 1)])[0].argmax == [2, 4]
    assert expert.models()[0].max_context == 512


@pytest.mark.parametrize(("status", "error_class"), [
    (400, ExpertRejectedError), (401, ExpertAuthError), (403, ExpertAuthError),
    (404, ExpertRejectedError), (409, SessionLostError), (413, ExpertRejectedError),
    (422, ExpertRejectedError), (429, ExpertRateLimitedError), (500, ExpertUnavailableError),
    (503, ExpertUnavailableError),
])
def test_parse_error_maps_each_status(status: int, error_class: type[ExpertError]) -> None:
    response = httpx.Response(status, json={"error": {"type": "kind", "message": "what happened"}},
                              headers={"retry-after": "7"})
    error = parse_error(response)
    assert type(error) is error_class
    assert "what happened" in str(error) and str(status) in str(error)
    if isinstance(error, ExpertRejectedError):
        assert error.status_code == status and error.error_type == "kind"
    if isinstance(error, ExpertRateLimitedError):
        assert error.retry_after == 7.0


def test_parse_error_survives_a_body_that_is_not_json() -> None:
    error = parse_error(httpx.Response(502, text="<html>Bad gateway</html>"))
    assert isinstance(error, ExpertUnavailableError) and "Bad gateway" in str(error)
    error = parse_error(httpx.Response(400, json=["not", "an", "object"]))
    assert isinstance(error, ExpertRejectedError)


def test_unavailable_calls_are_retried_then_succeed() -> None:
    statuses = iter([503, 200])
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        return httpx.Response(status, json=reply([3], 1) if status == 200 else {})

    expert = make_expert(handler, retries=1, sleep=sleeps.append)
    assert expert.continue_(session="s", held=0, tokens=[1], max_tokens=1).tokens == [3]
    assert len(sleeps) == 1


def test_rejections_are_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(409, json={"error": {"type": "session_lost", "message": "gone"}})

    with pytest.raises(SessionLostError):
        make_expert(handler, retries=3).continue_(session="s", held=5, tokens=[1], max_tokens=1)
    assert len(calls) == 1


TRANSPORT_ERRORS = [httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.CloseError,
                    httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.ProxyError,
                    httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout]


@pytest.mark.parametrize("exception", TRANSPORT_ERRORS)
def test_every_httpx_transport_error_becomes_unavailable(exception: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exception("boom", request=request)  # type: ignore[call-arg]

    with pytest.raises(ExpertUnavailableError) as caught:
        make_expert(handler, retries=0).continue_(session="s", held=0, tokens=[1], max_tokens=1)
    assert isinstance(caught.value.__cause__, exception)


def test_the_list_of_mapped_transport_errors_is_complete() -> None:
    def subclasses(root: type) -> set[type]:
        found = set(root.__subclasses__())
        for child in list(found):
            found |= subclasses(child)
        return found

    concrete = {cls for cls in subclasses(httpx.TransportError) if not cls.__subclasses__()}
    assert concrete - {httpx.UnsupportedProtocol} <= set(TRANSPORT_ERRORS)


def test_other_httpx_failures_are_mapped() -> None:
    def decoding(request: httpx.Request) -> httpx.Response:
        raise httpx.DecodingError("bad gzip", request=request)

    with pytest.raises(ExpertError, match="unreadable"):
        make_expert(decoding).continue_(session="s", held=0, tokens=[1], max_tokens=1)
    with pytest.raises(ConfigError):
        HttpExpert("ftp://gateway.test", model="m", tokenizer=FINGERPRINT).continue_(
            session="s", held=0, tokens=[1], max_tokens=1)
    with pytest.raises(ConfigError):
        HttpExpert("http://[::1", model="m", tokenizer=FINGERPRINT).continue_(
            session="s", held=0, tokens=[1], max_tokens=1)


def test_malformed_and_oversized_replies_are_expert_errors() -> None:
    expert = make_expert(lambda request: httpx.Response(200, json={"tokens": "nope"}))
    with pytest.raises(ExpertError, match="malformed"):
        expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    expert = make_expert(lambda request: httpx.Response(200, json=reply([1, 2, 3], 4)))
    with pytest.raises(ExpertError, match="3 tokens, asked for 2"):
        expert.continue_(session="s", held=0, tokens=[1], max_tokens=2)


def test_an_invalid_request_is_refused_before_sending() -> None:
    expert = make_expert(lambda request: pytest.fail("nothing should be sent"))
    with pytest.raises(ExpertRejectedError, match="invalid expert request"):
        expert.continue_(session="has spaces", held=0, tokens=[1], max_tokens=1)


def test_the_circuit_opens_after_consecutive_failures_and_half_opens_later() -> None:
    clock = Clock()
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"error": {"type": "unavailable", "message": "busy"}})

    expert = make_expert(handler, retries=0,
                         breaker=CircuitBreaker(failures=2, reset_s=30.0, clock=clock))
    for _ in range(2):
        with pytest.raises(ExpertUnavailableError):
            expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    assert not expert.ready()
    with pytest.raises(CircuitOpenError):
        expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    assert len(calls) == 2
    clock.now += 31.0
    assert expert.ready()
    with pytest.raises(ExpertUnavailableError):  # the half-open trial call fails: open again
        expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    assert len(calls) == 3 and not expert.ready()


def test_a_success_closes_the_circuit() -> None:
    clock = Clock()
    statuses = iter([503, 503, 200, 503])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        return httpx.Response(status, json=reply([3], 1) if status == 200 else {})

    breaker = CircuitBreaker(failures=2, reset_s=5.0, clock=clock)
    expert = make_expert(handler, retries=0, breaker=breaker)
    for _ in range(2):
        with pytest.raises(ExpertUnavailableError):
            expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    clock.now += 6.0
    expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    with pytest.raises(ExpertUnavailableError):  # one failure after a success: still closed
        expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    assert expert.ready()


def test_retries_stop_when_the_circuit_opens() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503)

    expert = make_expert(handler, retries=5, breaker=CircuitBreaker(failures=2, reset_s=5.0))
    with pytest.raises(ExpertUnavailableError):
        expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    assert len(calls) == 2


def test_from_settings_uses_every_setting() -> None:
    settings = ExpertSettings(url="http://gpu-box:8400/", model="big", retries=4,
                              breaker_failures=7, breaker_reset_s=9.0, allow_insecure_http=True)
    expert = HttpExpert.from_settings(settings, tokenizer=FINGERPRINT)
    assert expert.destination == "http://gpu-box:8400" and expert.model == "big"
    assert expert.retries == 4
    assert expert.breaker.failure_limit == 7 and expert.breaker.reset_s == 9.0
    expert.close()


# -- a real server on 127.0.0.1, for deadlines and refused connections -------------------------

async def slow_continue(request: Request) -> JSONResponse:
    import asyncio

    body = await request.json()
    await asyncio.sleep(float(body["session"].split("-")[1]) / 1000)
    return JSONResponse(reply([4], body["held"] + len(body["tokens"]) + 1))


@pytest.fixture(scope="module")
def slow_gateway() -> Iterator[str]:
    app = Starlette(routes=[Route("/v1/continue", slow_continue, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def test_a_real_gateway_answers_within_the_deadline(slow_gateway: str) -> None:
    expert = HttpExpert(slow_gateway, model="toy-expert", tokenizer=FINGERPRINT, timeout_s=5.0)
    assert expert.continue_(session="wait-0", held=0, tokens=[1, 2], max_tokens=1).held == 3
    expert.close()


def test_a_slow_real_gateway_times_out(slow_gateway: str) -> None:
    expert = HttpExpert(slow_gateway, model="toy-expert", tokenizer=FINGERPRINT, timeout_s=0.2,
                        retries=1, sleep=lambda seconds: None)
    # Without the deadline the call would succeed after 1.5 s.
    with pytest.raises(ExpertUnavailableError, match=r"did not answer within 0\.2s"):
        expert.continue_(session="wait-1500", held=0, tokens=[1], max_tokens=1)
    expert.close()


def test_a_refused_connection_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    expert = HttpExpert(f"http://127.0.0.1:{port}", model="toy-expert", tokenizer=FINGERPRINT,
                        retries=0)
    with pytest.raises(ExpertUnavailableError, match="cannot reach"):
        expert.continue_(session="s", held=0, tokens=[1], max_tokens=1)
    expert.close()


# -- the in-process expert on the toy pair -----------------------------------------------------

@pytest.fixture(scope="module")
def toy_expert_model(toy_pair: Any) -> Iterator[Any]:
    from tandem_core.base_model import LlamaModel

    model = LlamaModel(toy_pair.expert_gguf, n_ctx=512)
    yield model
    model.close()


def test_in_process_expert_samples_like_the_gateway_contract(toy_expert_model: Any) -> None:
    prompt = toy_expert_model.tokenize("Question: what is 2+2?\nAnswer:", add_bos=True)
    expert = InProcessExpert(toy_expert_model)
    answer = expert.continue_(session="a", held=0, tokens=prompt, max_tokens=4, temperature=0.8,
                              seed=11, top_logprobs=3)
    sequence = list(prompt)
    for token in answer.tokens:
        toy_expert_model.reset()
        logits = toy_expert_model.decode(sequence).logits[-1]
        assert token == sample_from_logits(logits, temperature=0.8, seed=11, position=len(sequence))
        sequence.append(token)
    assert answer.held == len(sequence)
    assert answer.logprobs is not None and len(answer.logprobs[0].top) == 3


def test_in_process_expert_keeps_sessions_like_the_gateway(toy_expert_model: Any) -> None:
    prompt = toy_expert_model.tokenize("Question: what is 2+2?\nAnswer:", add_bos=True)
    expert = InProcessExpert(toy_expert_model)
    first = expert.continue_(session="a", held=0, tokens=prompt, max_tokens=3)
    # Building on part of the held sequence cuts it back; the answer matches a fresh call.
    again = expert.continue_(session="a", held=len(prompt), tokens=[], max_tokens=3)
    assert again.tokens == first.tokens
    fresh = InProcessExpert(toy_expert_model).continue_(session="b", held=0, tokens=prompt,
                                                         max_tokens=3)
    assert fresh.tokens == first.tokens
    with pytest.raises(SessionLostError):
        expert.continue_(session="a", held=first.held + 1, tokens=[1], max_tokens=1)
    expert.forget("a")
    with pytest.raises(SessionLostError):
        expert.continue_(session="a", held=1, tokens=[1], max_tokens=1)
    with pytest.raises(ExpertRejectedError):
        expert.continue_(session="c", held=0, tokens=[], max_tokens=1)
