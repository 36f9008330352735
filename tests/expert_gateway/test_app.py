"""Gateway HTTP behaviour over a real uvicorn, with a fake backend to isolate the logic."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from expert_gateway.app import create_app
from expert_gateway.keys import KeyStore
from expert_gateway.settings import GatewaySettings
from tandem_core.protocol import ERROR_TYPES, MAX_CONTINUE_TOKENS

from .conftest import FAKE_FINGERPRINT, FakeBackend, Gateway, gateway_settings, serve


@pytest.fixture(scope="module")
def fake_backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fake_backend: FakeBackend) -> Iterator[Gateway]:
    keys_file = tmp_path_factory.mktemp("fake-keys") / "keys.json"
    store = KeyStore(keys_file)
    _, secret = store.add("tests", requests_per_minute=100_000)
    settings = gateway_settings(keys_file, server={"max_body_bytes": 4096},
                                sessions={"max_sessions": 4, "memory_budget_tokens": 1024})
    app = create_app(settings, backend=fake_backend)
    with serve(app) as url:
        yield Gateway(url=url, key=secret, store=store, app=app)


def _continue_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"session": "s", "model": "fake-expert", "held": 0, "tokens": [1, 2, 3],
                               "max_tokens": 2, "tokenizer": FAKE_FINGERPRINT}
    return {**body, **overrides}


def _assert_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == ERROR_TYPES[status]
    assert error["message"]
    return str(error["message"])


def test_continue_then_extend_the_session(gateway: Gateway, fake_backend: FakeBackend) -> None:
    with gateway.client() as client:
        first = client.post("/v1/continue", json=_continue_body(session="extend")).json()
        assert first["held"] == 5 and len(first["tokens"]) == 2
        assert [entry["token"] for entry in first["logprobs"]] == first["tokens"]
        # Accept one expert token, add one of our own.
        second = client.post("/v1/continue", json=_continue_body(session="extend", held=4, tokens=[7]))
    assert second.status_code == 200
    session, sequence = fake_backend.calls[-1]
    # The backend sees the session inside the calling key's namespace.
    assert session.endswith("/extend") and sequence == [1, 2, 3, first["tokens"][0], 7]
    assert second.json()["held"] == 7


def test_auth_missing_bad_and_revoked_keys_are_401(gateway: Gateway) -> None:
    _, revoked = gateway.store.add("soon-revoked")
    with gateway.client(revoked) as client:
        assert client.post("/v1/continue", json=_continue_body(session="auth")).status_code == 200
    gateway.store.revoke("soon-revoked")
    for key in (None, "tgw_not-a-real-key", revoked):
        with gateway.client(key) as client:
            message = _assert_error(client.post("/v1/continue", json=_continue_body()), 401)
            assert "tgw_" not in message  # keys are never echoed
    response = httpx.get(gateway.url + "/v1/models", headers={"Authorization": "Basic abc"})
    _assert_error(response, 401)


def test_requests_per_minute_quota_is_429_with_retry_after(gateway: Gateway) -> None:
    _, secret = gateway.store.add("slow", requests_per_minute=2)
    with gateway.client(secret) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models").status_code == 200
        response = client.get("/v1/models")
    _assert_error(response, 429)
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_tokens_per_day_quota_is_429(gateway: Gateway) -> None:
    _, secret = gateway.store.add("small", tokens_per_day=5)  # one call: 3 in + 2 out
    with gateway.client(secret) as client:
        assert client.post("/v1/continue", json=_continue_body(session="q")).status_code == 200
        response = client.post("/v1/continue", json=_continue_body(session="q"))
    _assert_error(response, 429)
    assert int(response.headers["Retry-After"]) >= 1


def test_oversized_body_is_413(gateway: Gateway) -> None:
    with gateway.client() as client:
        big = _continue_body(tokens=[1] * 3000)
        _assert_error(client.post("/v1/continue", json=big), 413)
        # Without Content-Length (chunked), the body is counted as it streams in.
        chunks = iter([b'{"session": "s", "tokens": [' + b"1," * 3000, b"1]}"])
        _assert_error(client.post("/v1/continue", content=chunks,
                                  headers={"Content-Type": "application/json"}), 413)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"tokens": [1, 50]}, "outside the vocabulary"),
        ({"tokens": [-1]}, "tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": MAX_CONTINUE_TOKENS + 1}, "max_tokens"),
        ({"tokens": [1] * 255, "max_tokens": 2}, "exceeds the expert's context"),
        ({"tokens": []}, "empty"),
        ({"session": "bad session"}, "session"),
        ({"extra": 1}, "extra"),
        ({"tokenizer": "ab" * 32}, "fafa"),
    ],
)
def test_out_of_bounds_requests_are_422(gateway: Gateway, overrides: dict[str, object],
                                        fragment: str) -> None:
    with gateway.client() as client:
        message = _assert_error(client.post("/v1/continue", json=_continue_body(**overrides)), 422)
    assert fragment in message


def test_tokenizer_mismatch_names_both_fingerprints(gateway: Gateway) -> None:
    with gateway.client() as client:
        message = _assert_error(client.post("/v1/continue", json=_continue_body(tokenizer="ab" * 32)), 422)
    assert "ab" * 32 in message and FAKE_FINGERPRINT in message


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b""])
def test_malformed_json_is_422(gateway: Gateway, body: bytes) -> None:
    with gateway.client() as client:
        response = client.post("/v1/continue", content=body, headers={"Content-Type": "application/json"})
    _assert_error(response, 422)


def test_unknown_model_and_route_are_404(gateway: Gateway) -> None:
    with gateway.client() as client:
        _assert_error(client.post("/v1/continue", json=_continue_body(model="other")), 404)
        _assert_error(client.get("/v1/nothing"), 404)


def test_resync_after_eviction_is_409_then_held_zero_works(gateway: Gateway,
                                                          fake_backend: FakeBackend) -> None:
    with gateway.client() as client:
        assert client.post("/v1/continue", json=_continue_body(session="evicted")).status_code == 200
        for index in range(4):  # max_sessions = 4: push "evicted" out
            client.post("/v1/continue", json=_continue_body(session=f"filler-{index}"))
        assert any(name.endswith("/evicted") for name in fake_backend.forgotten)
        message = _assert_error(client.post("/v1/continue",
                                            json=_continue_body(session="evicted", held=5, tokens=[4])), 409)
        assert "held = 0" in message
        resent = client.post("/v1/continue", json=_continue_body(session="evicted", tokens=[1, 2, 3, 4]))
        assert resent.status_code == 200
        metrics = client.get("/metrics").text
    assert "tandem_gateway_session_conflicts_total" in metrics


def test_score_returns_one_entry_per_scored_token(gateway: Gateway) -> None:
    body = {"model": "fake-expert", "tokenizer": FAKE_FINGERPRINT,
            "sequences": [{"tokens": [1, 2, 3, 4], "start": 1}, {"tokens": [5, 6], "start": 2}]}
    with gateway.client() as client:
        results = client.post("/v1/score", json=body).json()["results"]
        past_end = {**body, "sequences": [{"tokens": [1, 2], "start": 3}]}
        _assert_error(client.post("/v1/score", json=past_end), 422)
    assert [len(result["logprobs"]) for result in results] == [3, 0]
    assert len(results[0]["argmax"]) == 3


def test_concurrent_sessions_give_the_same_tokens_as_sequential(gateway: Gateway) -> None:
    bodies = [_continue_body(session=f"conc-{index}", tokens=[index + 1, 2, 3], max_tokens=4)
              for index in range(8)]
    with gateway.client() as client:
        sequential = [client.post("/v1/continue", json=body).json()["tokens"] for body in bodies]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(lambda body: client.post("/v1/continue", json=body).json()["tokens"],
                                     bodies))
    assert parallel == sequential


def test_health_and_metrics_need_no_key(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/health").json()["status"] == "ok"
    text = httpx.get(gateway.url + "/metrics").text
    for name in ("tandem_gateway_requests_total", "tandem_gateway_tokens_in_total",
                 "tandem_gateway_tokens_out_total", "tandem_gateway_prefill_tokens_saved_total",
                 "tandem_gateway_request_duration_seconds_bucket", "tandem_gateway_active_sessions"):
        assert name in text


def test_auth_can_be_off_only_on_loopback(tmp_path: Path) -> None:
    settings = GatewaySettings(auth={"enabled": False, "keys_file": tmp_path / "k.json"})
    with serve(create_app(settings, backend=FakeBackend())) as url:
        assert httpx.get(url + "/v1/models").status_code == 200
    with pytest.raises(ValueError, match="loopback"):
        GatewaySettings(auth={"enabled": False}, server={"host": "0.0.0.0"})


def test_a_full_queue_is_503_and_the_gateway_recovers(tmp_path: Path) -> None:
    slow = FakeBackend(delay_s=0.5, max_concurrency=1)
    settings = gateway_settings(tmp_path / "keys.json", auth={"enabled": False}, server={"max_queue": 1})
    bodies = [_continue_body(session=f"queue-{index}") for index in range(3)]
    with serve(create_app(settings, backend=slow)) as url, httpx.Client(base_url=url, timeout=30) as client:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            statuses = sorted(pool.map(lambda body: client.post("/v1/continue", json=body).status_code,
                                       bodies))
        assert statuses[0] == 200 and statuses[-1] == 503
        assert client.post("/v1/continue", json=bodies[0]).status_code == 200
