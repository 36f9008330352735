"""Threshold calibration: quantiles of s for target deferral rates, and an accuracy sweep.

Two views of the same knob. Quantiles of ``s`` on the validation positions (teacher-forced on
gold prefixes) give the threshold that defers a promised fraction of tokens. Real Co-LLM
decoding on a validation corpus then measures what each threshold does to task accuracy and to
the share of tokens the expert actually wrote, which is what a budget of remote calls is about.
The decoder defers when ``s > threshold``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tandem_core.errors import TandemError

DEFAULT_RATES = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
# Scores of a trained head are often bimodal, so rate quantiles can jump from 0.999 to 0.004
# and skip the useful middle; the sweep also tries these plain probabilities.
DEFAULT_FIXED_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
PickRule = Literal["accuracy", "max-deferral"]


class CalibrationError(TandemError):
    """Thresholds could not be chosen from the given scores or sweep."""


def quantile_threshold(scores: np.ndarray, rate: float) -> float:
    """The threshold at which ``s > threshold`` holds for ``floor(rate * n)`` positions.

    Ties can only lower the deferred share, so the promise is: at most ``rate`` of the positions
    are deferred, and with distinct scores exactly ``floor(rate * n)``. Rate 1 gives 0 (every
    position with s > 0 defers); rate 0 gives the largest score (nothing is above it).
    """
    if not 0.0 <= rate <= 1.0:
        raise CalibrationError(f"deferral rate {rate} is outside [0, 1]")
    values = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))[::-1]
    if values.size == 0:
        raise CalibrationError("no validation scores to calibrate on")
    deferred = int(np.floor(rate * values.size + 1e-9))
    if deferred >= values.size:
        return 0.0
    return float(values[deferred])


def quantile_thresholds(scores: np.ndarray, rates: Sequence[float] = DEFAULT_RATES) -> dict[str, float]:
    """``{"0.1": threshold, ...}`` for each target rate."""
    return {f"{rate:g}": quantile_threshold(scores, rate) for rate in rates}


def deferral_rate(scores: np.ndarray, threshold: float) -> float:
    values = np.asarray(scores).reshape(-1)
    return float(np.mean(values > threshold)) if values.size else 0.0


@dataclass(frozen=True)
class SweepPoint:
    """Real decoding on the validation corpus at one threshold."""

    threshold: float
    target_rate: float | None
    accuracy: float | None  # None: chosen by quantile alone, no decoding measured it
    deferred_fraction: float
    remote_calls: int
    tokens_sent: int
    wall_s: float


def candidates(quantiles: Mapping[str, float],
               fixed: Sequence[float] = DEFAULT_FIXED_THRESHOLDS) -> list[tuple[float | None, float]]:
    """``(target rate or None, threshold)`` pairs: the rate quantiles, then the fixed thresholds."""
    return [(float(rate), threshold) for rate, threshold in quantiles.items()] + [
        (None, float(threshold)) for threshold in fixed]


def sweep(thresholds: Sequence[tuple[float | None, float]], run: Callable[[float], SweepPoint],
          *, progress: bool = True) -> list[SweepPoint]:
    """Run real decoding at each distinct threshold; points ordered by deferred share."""
    from tqdm import tqdm

    seen: dict[float, SweepPoint] = {}
    ordered = sorted(thresholds, key=lambda item: item[1])
    for rate, threshold in tqdm(ordered, desc="calibration sweep", disable=not progress):
        if threshold not in seen:
            point = run(threshold)
            seen[threshold] = SweepPoint(**{**asdict(point), "target_rate": rate})
    return sorted(seen.values(), key=lambda point: (point.deferred_fraction, -point.threshold))


def pick(points: Sequence[SweepPoint], *, rule: PickRule = "accuracy",
         max_deferral: float | None = None) -> SweepPoint:
    """The best accuracy (ties: fewest deferrals), optionally within a deferral budget.

    ``max-deferral`` requires ``max_deferral``; ``accuracy`` honours it when given.
    """
    if rule == "max-deferral" and max_deferral is None:
        raise CalibrationError("picking by max deferral rate needs --max-deferral")
    allowed = [p for p in points if max_deferral is None or p.deferred_fraction <= max_deferral + 1e-12]
    if not allowed:
        raise CalibrationError(f"no swept threshold defers at most {max_deferral:.1%} of tokens")
    return min(allowed, key=lambda p: (-(p.accuracy or 0.0), p.deferred_fraction, -p.threshold))


def plot(points: Sequence[SweepPoint], png: Path, *, base_accuracy: float | None,
         expert_accuracy: float | None, title: str = "Co-LLM on the validation corpus") -> None:
    """Accuracy against % of tokens deferred, with base-only and expert-only lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    xs = [100 * p.deferred_fraction for p in points]
    axes.plot(xs, [100 * (p.accuracy or 0.0) for p in points], marker="o", label="Co-LLM")
    if base_accuracy is not None:
        axes.axhline(100 * base_accuracy, color="tab:red", linestyle="--", label="base only")
    if expert_accuracy is not None:
        axes.axhline(100 * expert_accuracy, color="tab:green", linestyle=":", label="expert only")
    axes.set(xlabel="% of answer tokens deferred", ylabel="accuracy (%)", title=title, ylim=(-2, 102))
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)


def calibration_table(*, quantiles: Mapping[str, float], points: Sequence[SweepPoint],
                      chosen: SweepPoint | None, rule: str, max_deferral: float | None,
                      base_accuracy: float | None, expert_accuracy: float | None,
                      validation_positions: int) -> dict[str, Any]:
    return {
        "format": "tandem-calibration/1",
        "validation_positions": validation_positions,
        "quantile_thresholds": dict(quantiles),
        "sweep": [asdict(point) for point in points],
        "base_accuracy": base_accuracy,
        "expert_accuracy": expert_accuracy,
        "pick": {"rule": rule, "max_deferral": max_deferral},
        "chosen": asdict(chosen) if chosen is not None else None,
    }


def write_table(path: Path, table: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")


def format_sweep(points: Sequence[SweepPoint]) -> str:
    lines = [f"{'threshold':>10} {'target':>7} {'deferred':>9} {'accuracy':>9} {'calls':>6} {'sent':>7}"]
    for p in points:
        target = "-" if p.target_rate is None else f"{p.target_rate:.2f}"
        accuracy = "-" if p.accuracy is None else f"{p.accuracy:.1%}"
        lines.append(f"{p.threshold:10.4f} {target:>7} {p.deferred_fraction:9.1%} {accuracy:>9} "
                     f"{p.remote_calls:6d} {p.tokens_sent:7d}")
    return "\n".join(lines)
