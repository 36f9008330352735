"""The daemon's Prometheus metrics, rendered in the text exposition format (version 0.0.4).

A handful of counters and one latency histogram do not justify a dependency; the format is a
few lines of text per metric.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.assistant import Answer

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_HELP = {
    "tandem_http_requests_total": "HTTP requests by route and status",
    "tandem_answers_total": "answers by finish reason",
    "tandem_answer_tokens_total": "generated tokens by provenance (base, expert, fallback, denied)",
    "tandem_expert_calls_total": "remote expert calls sent",
    "tandem_egress_tokens_total": "tokens sent to the expert",
    "tandem_policy_denials_total": "expert calls refused by the egress policy",
    "tandem_expert_failures_total": "expert calls that failed (the base answered instead)",
}
Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Thread-safe counters and a request-latency histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._latency_counts = [0] * len(LATENCY_BUCKETS_S)
        self._latency_sum = 0.0
        self._latency_total = 0

    def increment(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += amount

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.increment("tandem_http_requests_total", route=route, status=str(status))
        with self._lock:
            self._latency_sum += seconds
            self._latency_total += 1
            for index, bound in enumerate(LATENCY_BUCKETS_S):
                if seconds <= bound:
                    self._latency_counts[index] += 1

    def record_answer(self, answer: Answer) -> None:
        self.increment("tandem_answers_total", finish_reason=answer.finish_reason)
        for provenance, count in answer.provenance_counts.items():
            self.increment("tandem_answer_tokens_total", count, provenance=provenance)
        self.increment("tandem_expert_calls_total", answer.egress.calls)
        self.increment("tandem_egress_tokens_total", answer.egress.tokens_sent)
        self.increment("tandem_policy_denials_total", answer.egress.denials)
        self.increment("tandem_expert_failures_total", answer.egress.failures)

    def render(self, gauges: Mapping[str, tuple[float, str]]) -> str:
        lines: list[str] = []
        with self._lock:
            for name in sorted(set(_HELP) | set(self._counters)):
                lines += [f"# HELP {name} {_HELP.get(name, name)}", f"# TYPE {name} counter"]
                series = self._counters.get(name) or {(): 0.0}
                lines += [f"{name}{_labels(labels)} {_number(value)}"
                          for labels, value in sorted(series.items())]
            lines += self._histogram_lines()
        for name, (value, description) in sorted(gauges.items()):
            lines += [f"# HELP {name} {description}", f"# TYPE {name} gauge",
                      f"{name} {_number(value)}"]
        return "\n".join(lines) + "\n"

    def _histogram_lines(self) -> list[str]:
        name = "tandem_http_request_duration_seconds"
        lines = [f"# HELP {name} time to answer an HTTP request (streams: until headers)",
                 f"# TYPE {name} histogram"]
        for bound, count in zip(LATENCY_BUCKETS_S, self._latency_counts, strict=True):
            lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self._latency_total}',
                  f"{name}_sum {_number(self._latency_sum)}",
                  f"{name}_count {self._latency_total}"]
        return lines


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (f'{key}="{_escape(value)}"' for key, value in labels)
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
