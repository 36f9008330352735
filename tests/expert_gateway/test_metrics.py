"""The gateway's metrics: today's names and types, one registry per app, closed label sets."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from expert_gateway.app import create_app
from expert_gateway.keys import KeyStore
from expert_gateway.metrics import OTHER, ROUTES, STATUSES, GatewayMetrics

from .conftest import FAKE_FINGERPRINT, FakeBackend, gateway_settings, serve

SECRET = "secret-5c1d"
TYPES = {
    "tandem_gateway_requests_total": "counter", "tandem_gateway_tokens_in_total": "counter",
    "tandem_gateway_tokens_out_total": "counter", "tandem_gateway_prefill_tokens_total": "counter",
    "tandem_gateway_prefill_tokens_saved_total": "counter",
    "tandem_gateway_session_conflicts_total": "counter",
    "tandem_gateway_request_duration_seconds": "histogram",
    "tandem_gateway_backend_duration_seconds": "histogram",
    "tandem_gateway_active_sessions": "gauge", "tandem_gateway_held_tokens": "gauge",
}


def _metrics() -> GatewayMetrics:
    return GatewayMetrics(active_sessions=lambda: 1, held_tokens=lambda: 8)


def _types(text: str) -> dict[str, str]:
    return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}


def test_names_and_types_are_todays_and_no_created_series() -> None:
    metrics = _metrics()
    metrics.session_conflicts.inc()
    metrics.prefill_saved.inc(12)
    text = metrics.render()
    assert _types(text) == TYPES
    assert "_created" not in text
    assert "tandem_gateway_prefill_tokens_saved_total 12.0" in text
    assert 'tandem_gateway_tokens_in_total{route="/v1/score"} 0.0' in text  # work routes start at zero


def test_label_values_outside_their_closed_sets_are_never_exposed() -> None:
    metrics = _metrics()
    metrics.requests.inc(route=f"/v1/continue/{SECRET}", status="200")
    metrics.requests.inc(route="/v1/score", status=SECRET)
    metrics.latency.observe(0.2, route=SECRET)
    text = metrics.render()
    assert SECRET not in text
    assert 'tandem_gateway_requests_total{route="other",status="200"} 1.0' in text
    assert 'tandem_gateway_requests_total{route="/v1/score",status="other"} 1.0' in text
    assert 'tandem_gateway_request_duration_seconds_count{route="other"} 1.0' in text


def test_each_app_has_its_own_registry() -> None:
    first, second = _metrics(), _metrics()
    first.requests.inc(route="/health", status="200")
    assert 'route="/health"' in first.render()
    assert 'route="/health"' not in second.render()


def test_every_served_route_is_in_the_closed_set(tmp_path: Path) -> None:
    app = create_app(gateway_settings(tmp_path / "keys.json"), backend=FakeBackend())
    assert {getattr(route, "path", "") for route in app.routes} <= ROUTES


def test_a_scrape_over_http_carries_no_session_ids_keys_or_content(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    _, key = KeyStore(keys_file).add("tests", requests_per_minute=100_000)
    body = {"session": SECRET, "model": "fake-expert", "held": 0, "tokens": [1, 2, 3],
            "max_tokens": 2, "tokenizer": FAKE_FINGERPRINT}
    with serve(create_app(gateway_settings(keys_file), backend=FakeBackend())) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
            assert http.post("/v1/continue", json=body).status_code == 200
            assert http.post("/v1/continue", json={**body, "held": 99}).status_code == 409
            http.get(f"/v1/sessions/{SECRET}")
        httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {SECRET}"})
        text = httpx.get(url + "/metrics").text
    assert SECRET not in text and key not in text
    closed = {"route": ROUTES | {OTHER}, "status": STATUSES | {OTHER}}
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name != "le":
                    seen.setdefault(name, set()).add(value)
    assert seen["route"] >= {"/v1/continue", "/v1/models", OTHER}
    assert seen["status"] >= {"200", "401", "404", "409"}
    for name, values in seen.items():
        assert values <= closed[name], name
