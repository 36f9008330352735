"""The gateway's Prometheus metrics, kept by prometheus_client and exposed in text format 0.0.4.

Each ``GatewayMetrics`` owns its own ``CollectorRegistry`` (several apps live in one test process;
nothing is registered at import time). Label values come only from closed sets, the route
templates and HTTP status codes below; any other value is counted as ``other``, so no label can
carry token content, a key or a session id, and the number of series stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics as _disable_created_series

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WORK_ROUTES = ("/v1/continue", "/v1/score")
# Every route the gateway serves; a route missing here is counted as OTHER (a test checks the app).
ROUTES = frozenset({*WORK_ROUTES, "/v1/models", "/health", "/metrics",
                    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
OTHER = "other"
STATUSES = frozenset(str(status.value) for status in HTTPStatus)
LABEL_VALUES: Mapping[str, frozenset[str]] = {"route": ROUTES, "status": STATUSES}


def _closed(labels: Mapping[str, str]) -> dict[str, str]:
    """Each label value if it belongs to its closed set, else ``other``."""
    return {name: value if value in LABEL_VALUES[name] else OTHER for name, value in labels.items()}


class ClosedCounter:
    """A labelled counter whose label values are held to their closed sets."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.counter.labels(**_closed(labels)).inc(amount)


class ClosedHistogram:
    """A labelled histogram whose label values are held to their closed sets."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    def observe(self, value: float, **labels: str) -> None:
        self.histogram.labels(**_closed(labels)).observe(value)


class GatewayMetrics:
    """Every metric the gateway exports; the gauges are read at scrape time."""

    def __init__(self, *, active_sessions: Callable[[], float], held_tokens: Callable[[], float]) -> None:
        # The library's only switch for the `_created` series is process-wide; the gateway never
        # exported them, and a scrape should show the same names as before.
        _disable_created_series()
        self.registry = registry = CollectorRegistry()
        prefix = "tandem_gateway"

        def by_route(name: str, documentation: str, *extra: str) -> ClosedCounter:
            return ClosedCounter(Counter(f"{prefix}_{name}", documentation, ("route", *extra),
                                         registry=registry))

        def plain(name: str, documentation: str) -> Counter:
            return Counter(f"{prefix}_{name}", documentation, registry=registry)

        def latency(name: str, documentation: str) -> ClosedHistogram:
            return ClosedHistogram(Histogram(f"{prefix}_{name}", documentation, ("route",),
                                             buckets=LATENCY_BUCKETS_S, registry=registry))

        self.requests = by_route("requests_total", "HTTP requests by route and status", "status")
        self.tokens_in = by_route("tokens_in_total", "tokens received, by route")
        self.tokens_out = by_route("tokens_out_total", "tokens generated or scored, by route")
        self.prefill_tokens = plain("prefill_tokens_total", "tokens the backend prefilled")
        self.prefill_saved = plain("prefill_tokens_saved_total",
                                   "tokens served from a session's cache instead")
        self.session_conflicts = plain("session_conflicts_total", "409 answers (resync)")
        self.latency = latency("request_duration_seconds", "request latency by route")
        self.backend_latency = latency("backend_duration_seconds",
                                       "backend call latency by route (queue wait excluded)")
        Gauge(f"{prefix}_active_sessions", "sessions held", registry=registry).set_function(active_sessions)
        Gauge(f"{prefix}_held_tokens", "tokens held over all sessions",
              registry=registry).set_function(held_tokens)
        for route in WORK_ROUTES:  # series exist from the start, so rates work before the first call
            self.tokens_in.counter.labels(route=route)
            self.tokens_out.counter.labels(route=route)

    def render(self) -> str:
        """The text exposition (format 0.0.4) of every metric, gauges read now."""
        return generate_latest(self.registry).decode()
