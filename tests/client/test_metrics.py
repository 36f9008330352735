"""The daemon's metrics: today's names, types and help, one registry per daemon, closed label sets."""

from __future__ import annotations

import typing
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from client.assistant import Answer
from client.daemon import create_app
from client.egress import EgressSummary
from client.metrics import FINISH_REASONS, OTHER, PROVENANCES, ROUTES, STATUSES, UNMATCHED, Metrics
from tandem_core.server import ServerThread
from tests.client.daemon_fakes import fake_services

SECRET = "secret-7f3a"
EXPOSED = {  # name as scraped: (type, help)
    "tandem_http_requests_total": ("counter", "HTTP requests by route and status"),
    "tandem_answers_total": ("counter", "answers by finish reason"),
    "tandem_answer_tokens_total": ("counter",
                                   "generated tokens by provenance (base, expert, fallback, denied)"),
    "tandem_expert_calls_total": ("counter", "remote expert calls sent"),
    "tandem_egress_tokens_total": ("counter", "tokens sent to the expert"),
    "tandem_policy_denials_total": ("counter", "expert calls refused by the egress policy"),
    "tandem_expert_failures_total": ("counter", "expert calls that failed (the base answered instead)"),
    "tandem_http_request_duration_seconds": ("histogram",
                                             "time to answer an HTTP request (streams: until headers)"),
    "tandem_queue_depth": ("gauge", "requests waiting for the model"),
    "tandem_worker_busy": ("gauge", "1 while the model is decoding"),
    "tandem_answers_running": ("gauge", "answers decoding together now"),
    "tandem_documents": ("gauge", "stored documents"),
}
CLOSED = {"route": ROUTES | {UNMATCHED}, "status": STATUSES | {OTHER},
          "finish_reason": {*FINISH_REASONS, OTHER}, "provenance": {*PROVENANCES, OTHER}}


def _metrics() -> Metrics:
    return Metrics(queue_depth=lambda: 2, worker_busy=lambda: 1, documents=lambda: 5)


def _headers(text: str) -> dict[str, tuple[str, str]]:
    """Each family's exposed name with its TYPE and HELP, read from the # lines."""
    found: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            kind, name, value = line[2:].split(" ", 2)
            found.setdefault(name, {})[kind] = value
    return {name: (entry["TYPE"], entry["HELP"]) for name, entry in found.items()}


def _label_values(text: str) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name != "le":
                    values.setdefault(name, set()).add(value)
    return values


def _answer(finish_reason: str) -> Answer:
    return Answer(request_id=SECRET, text=SECRET, tokens=[], passages=[],
                  finish_reason=finish_reason,  # type: ignore[arg-type]
                  prompt_tokens=3, egress=EgressSummary(calls=2, tokens_sent=9, denials=1, failures=1))


def test_names_types_and_help_are_todays_and_no_created_series() -> None:
    metrics = _metrics()
    metrics.record_request("/v1/completions", 200, 0.3)
    metrics.record_answer(_answer("stop"))
    text = metrics.render()
    assert _headers(text) == EXPOSED
    assert "_created" not in text
    assert "tandem_expert_calls_total 2.0" in text and "tandem_egress_tokens_total 9.0" in text
    assert 'tandem_answers_total{finish_reason="stop"} 1.0' in text
    assert 'tandem_answers_total{finish_reason="length"} 0.0' in text  # closed sets start at zero
    assert 'tandem_http_request_duration_seconds_bucket{le="0.5"} 1.0' in text
    assert "tandem_queue_depth 2.0" in text and "tandem_documents 5.0" in text


def test_label_values_outside_their_closed_sets_are_never_exposed() -> None:
    metrics = _metrics()
    metrics.record_request(f"/v1/documents/{SECRET}", 200, 0.1)  # a raw path, not a template
    metrics.record_request("/v1/documents/{document_id}", 799, 0.1)
    metrics.record_answer(_answer(SECRET))
    text = metrics.render()
    assert SECRET not in text
    assert 'tandem_http_requests_total{route="unmatched",status="200"} 1.0' in text
    assert 'tandem_http_requests_total{route="/v1/documents/{document_id}",status="other"} 1.0' in text
    assert 'tandem_answers_total{finish_reason="other"} 1.0' in text


def test_each_daemon_has_its_own_registry() -> None:
    first, second = _metrics(), _metrics()
    first.record_request("/health", 200, 0.01)
    assert 'route="/health"' in first.render()
    assert 'route="/health"' not in second.render()


def test_closed_sets_cover_every_route_and_answer_field(tmp_path: Path) -> None:
    app = create_app(fake_services(tmp_path))
    assert {getattr(route, "path", "") for route in app.routes} <= ROUTES
    hints = typing.get_type_hints(Answer)
    assert set(typing.get_args(hints["finish_reason"])) <= set(FINISH_REASONS)


def test_a_scrape_over_http_carries_no_ids_keys_or_content(tmp_path: Path) -> None:
    server = ServerThread(create_app(fake_services(tmp_path)))
    url = server.start()
    try:
        headers = {"Authorization": f"Bearer {SECRET}", "X-Session": SECRET}
        with httpx.Client(base_url=url, headers=headers) as http:
            http.post("/v1/completions", json={"model": "t", "prompt": SECRET, "max_tokens": 4})
            http.get(f"/v1/documents/{SECRET}")
            http.get(f"/v1/egress/{SECRET}")
            http.get(f"/{SECRET}")
            text = http.get("/metrics").text
    finally:
        server.stop()
    assert SECRET not in text
    values = _label_values(text)
    assert values["route"] >= {"/v1/completions", "/v1/documents/{document_id}", "/v1/egress/{request_id}",
                               UNMATCHED}
    for name, seen in values.items():
        assert seen <= CLOSED[name], name
