"""Prometheus text exposition (format 0.0.4) of the gateway's counters, written by hand.

Small on purpose: counters and histograms with fixed label sets, and gauges read at scrape time.
Labels never carry token content, keys or session ids.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[tuple[str, str], ...]


def _format_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in pairs)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help_text = name, help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        if not items:
            lines.append(f"{self.name} 0")
        lines += [f"{self.name}{_format_labels(labels)} {value:g}" for labels, value in items]
        return lines


class Histogram:
    """Cumulative buckets, sum and count per label set."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self._series: dict[Labels, list[float]] = {}  # bucket counts..., +Inf count, sum
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            series[bisect.bisect_left(self.buckets, value)] += 1
            series[-1] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((labels, list(series)) for labels, series in self._series.items())
        for labels, series in items:
            cumulative = 0.0
            for bound, count in zip((*self.buckets, float("inf")), series[:-1], strict=True):
                cumulative += count
                edge = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f"{self.name}_bucket{_format_labels(labels, (('le', edge),))} {cumulative:g}")
            lines.append(f"{self.name}_sum{_format_labels(labels)} {series[-1]:g}")
            lines.append(f"{self.name}_count{_format_labels(labels)} {cumulative:g}")
        return lines


class Gauge:
    """A value read from a callback at scrape time."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help_text, self.read = name, help_text, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} gauge",
                f"{self.name} {self.read():g}"]


class GatewayMetrics:
    """Every metric the gateway exports."""

    def __init__(self, *, active_sessions: Callable[[], float], held_tokens: Callable[[], float]) -> None:
        prefix = "tandem_gateway"
        self.requests = Counter(f"{prefix}_requests_total", "HTTP requests by route and status")
        self.tokens_in = Counter(f"{prefix}_tokens_in_total", "tokens received, by route")
        self.tokens_out = Counter(f"{prefix}_tokens_out_total", "tokens generated or scored, by route")
        self.prefill_tokens = Counter(f"{prefix}_prefill_tokens_total", "tokens the backend prefilled")
        self.prefill_saved = Counter(
            f"{prefix}_prefill_tokens_saved_total", "tokens served from a session's cache instead"
        )
        self.session_conflicts = Counter(f"{prefix}_session_conflicts_total", "409 answers (resync)")
        self.latency = Histogram(f"{prefix}_request_duration_seconds", "request latency by route")
        self.backend_latency = Histogram(
            f"{prefix}_backend_duration_seconds", "backend call latency by route (queue wait excluded)"
        )
        self.gauges = [
            Gauge(f"{prefix}_active_sessions", "sessions held", active_sessions),
            Gauge(f"{prefix}_held_tokens", "tokens held over all sessions", held_tokens),
        ]

    def render(self) -> str:
        families: list[Counter | Histogram | Gauge] = [
            self.requests, self.tokens_in, self.tokens_out, self.prefill_tokens, self.prefill_saved,
            self.session_conflicts, self.latency, self.backend_latency, *self.gauges,
        ]
        lines: list[str] = []
        for family in families:
            lines += family.render()
        return "\n".join(lines) + "\n"
