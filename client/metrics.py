"""The daemon's Prometheus metrics, kept by prometheus_client and exposed in text format 0.0.4.

Each ``Metrics`` owns its own ``CollectorRegistry``: several daemons live in one process (the tests
start many) and must never share a counter, and nothing is registered at import time.

Label values come only from the closed sets below: route templates (``/v1/documents/{document_id}``,
never a path with an id in it), HTTP status codes, finish reasons and token provenances. A value
outside its set is counted as ``unmatched`` (routes) or ``other``, so no label can carry content, a
key, a request id or a session id, and the number of series stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from http import HTTPStatus
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics as _disable_created_series

from client.tokens import Provenance

if TYPE_CHECKING:
    from client.assistant import Answer

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Every route the daemon serves; a route missing here is counted as UNMATCHED (a test checks the app).
ROUTES = frozenset({
    "/", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/egress/{request_id}",
    "/v1/chat/completions", "/v1/completions", "/v1/documents", "/v1/documents/{document_id}",
    "/login", "/logout", "/v1/session",
})
UNMATCHED = "unmatched"
OTHER = "other"
STATUSES = frozenset(str(status.value) for status in HTTPStatus)
FINISH_REASONS = ("stop", "length", "cancelled")
PROVENANCES: tuple[str, ...] = get_args(Provenance)


def closed(value: str, allowed: Collection[str], fallback: str = OTHER) -> str:
    """``value`` if it belongs to its closed set, else ``fallback``."""
    return value if value in allowed else fallback


class Metrics:
    """The daemon's counters, its request-latency histogram and gauges read at scrape time."""

    def __init__(self, *, queue_depth: Callable[[], float], worker_busy: Callable[[], float],
                 documents: Callable[[], float],
                 answers_running: Callable[[], float] = lambda: 0) -> None:
        # The library's only switch for the `_created` series is process-wide; the daemon never
        # exported them, and a scrape should show the same names as before.
        _disable_created_series()
        self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, documentation, labels, registry=self.registry)

        self.requests = counter("tandem_http_requests_total", "HTTP requests by route and status",
                                ("route", "status"))
        self.answers = counter("tandem_answers_total", "answers by finish reason", ("finish_reason",))
        self.answer_tokens = counter(
            "tandem_answer_tokens_total", "generated tokens by provenance (base, expert, fallback, denied)",
            ("provenance",))
        self.expert_calls = counter("tandem_expert_calls_total", "remote expert calls sent")
        self.egress_tokens = counter("tandem_egress_tokens_total", "tokens sent to the expert")
        self.policy_denials = counter("tandem_policy_denials_total",
                                      "expert calls refused by the egress policy")
        self.expert_failures = counter("tandem_expert_failures_total",
                                       "expert calls that failed (the base answered instead)")
        self.latency = Histogram("tandem_http_request_duration_seconds",
                                 "time to answer an HTTP request (streams: until headers)",
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)
        for name, documentation, read in (
                ("tandem_queue_depth", "requests waiting for the model", queue_depth),
                ("tandem_worker_busy", "1 while the model is decoding", worker_busy),
                ("tandem_answers_running", "answers decoding together now", answers_running),
                ("tandem_documents", "stored documents", documents)):
            Gauge(name, documentation, registry=self.registry).set_function(read)
        # Series of the small closed sets exist from the start, so rates work before the first answer.
        for reason in FINISH_REASONS:
            self.answers.labels(finish_reason=reason)
        for provenance in PROVENANCES:
            self.answer_tokens.labels(provenance=provenance)

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=closed(route, ROUTES, UNMATCHED),
                             status=closed(str(status), STATUSES)).inc()
        self.latency.observe(seconds)

    def record_answer(self, answer: Answer) -> None:
        self.answers.labels(finish_reason=closed(answer.finish_reason, FINISH_REASONS)).inc()
        for provenance, count in answer.provenance_counts.items():
            self.answer_tokens.labels(provenance=closed(provenance, PROVENANCES)).inc(count)
        self.expert_calls.inc(answer.egress.calls)
        self.egress_tokens.inc(answer.egress.tokens_sent)
        self.policy_denials.inc(answer.egress.denials)
        self.expert_failures.inc(answer.egress.failures)

    def render(self) -> str:
        """The text exposition (format 0.0.4) of every metric, gauges read now."""
        return generate_latest(self.registry).decode()
