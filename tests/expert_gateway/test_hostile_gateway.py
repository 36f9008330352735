"""Gateway findings of the security review: session ownership, quotas under concurrency and
across restarts, charging re-read context, API docs and metrics exposure, lock leaks.

Real uvicorn on 127.0.0.1 with the deterministic fake backend.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from expert_gateway.app import create_app
from expert_gateway.keys import KeyStore

from .conftest import FAKE_FINGERPRINT, FakeBackend, gateway_settings, serve


def body(session: str = "s", held: int = 0, tokens: list[int] | None = None,
         max_tokens: int = 2) -> dict[str, object]:
    return {"session": session, "model": "fake-expert", "held": held,
            "tokens": [1, 2, 3] if tokens is None else tokens, "max_tokens": max_tokens,
            "tokenizer": FAKE_FINGERPRINT}


def client(url: str, secret: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, str, str]:
    keys_file = tmp_path / "keys.json"
    store = KeyStore(keys_file)
    _, first = store.add("alice", requests_per_minute=100_000, tokens_per_day=10**6)
    _, second = store.add("bob", requests_per_minute=100_000, tokens_per_day=10**6)
    return keys_file, first, second


def test_a_session_belongs_to_the_key_that_opened_it(keys: tuple[Path, str, str]) -> None:
    keys_file, alice, bob = keys
    backend = FakeBackend()
    with serve(create_app(gateway_settings(keys_file), backend=backend)) as url, \
            client(url, alice) as as_alice, client(url, bob) as as_bob:
        opened = as_alice.post("/v1/continue", json=body(session="shared"))
        assert opened.status_code == 200
        held = opened.json()["held"]
        # Bob names Alice's session: he must neither extend it nor read its continuation.
        hijack = as_bob.post("/v1/continue", json=body(session="shared", held=held, tokens=[4]))
        assert hijack.status_code == 409, hijack.text
        # Bob's own "shared" is a different session; Alice's is untouched by it.
        assert as_bob.post("/v1/continue", json=body(session="shared", tokens=[9, 9])).status_code == 200
        again = as_alice.post("/v1/continue", json=body(session="shared", held=held, tokens=[4]))
        assert again.status_code == 200 and again.json()["held"] == held + 1 + 2


def test_concurrent_calls_cannot_overspend_the_daily_quota(tmp_path: Path) -> None:
    """12 concurrent calls used 492 tokens against a limit of 100; now the sum stays <= 100."""
    keys_file = tmp_path / "keys.json"
    store = KeyStore(keys_file)
    key, secret = store.add("small", requests_per_minute=100_000, tokens_per_day=100)
    app = create_app(gateway_settings(keys_file), backend=FakeBackend(delay_s=0.3))
    with serve(app) as url, client(url, secret) as http:
        def call(index: int) -> int:
            return http.post("/v1/continue", json=body(session=f"c{index}", tokens=[1] * 20,
                                                      max_tokens=4)).status_code

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(call, range(12)))
        used = app.state.gateway.authenticator.used_today(key)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 429}
    assert used <= 100, used


def test_re_read_context_is_charged(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key, secret = KeyStore(keys_file).add("k", requests_per_minute=100_000, tokens_per_day=10**6)
    backend = FakeBackend()
    app = create_app(gateway_settings(keys_file), backend=backend)
    authenticator = app.state.gateway.authenticator
    with serve(app) as url, client(url, secret) as http:
        first = http.post("/v1/continue", json=body(tokens=[1] * 30, max_tokens=2)).json()
        assert authenticator.used_today(key) == 30 + 2
        backend.cached.clear()  # the backend lost its cache: the next call re-reads everything
        http.post("/v1/continue", json=body(held=first["held"], tokens=[5], max_tokens=2))
        assert authenticator.used_today(key) == 32 + (32 + 1) + 2


def test_quotas_survive_a_restart(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    _, secret = KeyStore(keys_file).add("k", requests_per_minute=100_000, tokens_per_day=40)
    settings = gateway_settings(keys_file)
    with serve(create_app(settings, backend=FakeBackend())) as url, client(url, secret) as http:
        assert http.post("/v1/continue", json=body(tokens=[1] * 30, max_tokens=2)).status_code == 200
    with serve(create_app(settings, backend=FakeBackend())) as url, client(url, secret) as http:
        refused = http.post("/v1/continue", json=body(session="t", tokens=[1] * 10, max_tokens=2))
    assert refused.status_code == 429, refused.text


@pytest.fixture()
def plain_gateway(keys: tuple[Path, str, str]) -> Iterator[tuple[str, str]]:
    keys_file, alice, _ = keys
    with serve(create_app(gateway_settings(keys_file, auth={"metrics_require_key": True}),
                          backend=FakeBackend())) as url:
        yield url, alice


def test_api_docs_are_off_and_metrics_can_need_a_key(plain_gateway: tuple[str, str]) -> None:
    url, secret = plain_gateway
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(url + path).status_code == 404, path
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    granted = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {secret}"})
    assert granted.status_code == 200 and "tandem_gateway" in granted.text
    assert httpx.get(url + "/health").status_code == 200


def test_api_docs_can_be_turned_on(keys: tuple[Path, str, str]) -> None:
    keys_file, _, _ = keys
    with serve(create_app(gateway_settings(keys_file, server={"api_docs": True}),
                          backend=FakeBackend())) as url:
        assert httpx.get(url + "/openapi.json").status_code == 200


def test_rejected_sessions_leave_no_lock_behind(keys: tuple[Path, str, str]) -> None:
    keys_file, secret, _ = keys
    app = create_app(gateway_settings(keys_file), backend=FakeBackend())
    with serve(app) as url, client(url, secret) as http:
        for index in range(300):
            assert http.post("/v1/continue", json=body(session=f"ghost{index}", held=5,
                                                       tokens=[1])).status_code == 409
        assert http.post("/v1/continue", json=body(session="real")).status_code == 200
    assert len(app.state.gateway.sessions._locks) == 0
