"""Calibration: quantile thresholds keep their promise; picking; the table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.calibrate import (
    CalibrationError,
    SweepPoint,
    calibration_table,
    candidates,
    deferral_rate,
    pick,
    plot,
    quantile_threshold,
    quantile_thresholds,
    sweep,
    write_table,
)


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.25, 0.333, 0.5, 0.9, 1.0])
def test_quantile_threshold_defers_the_promised_share(rate: float) -> None:
    scores = np.random.default_rng(1).random(1000)
    threshold = quantile_threshold(scores, rate)
    assert int(np.sum(scores > threshold)) == int(np.floor(rate * 1000))


def test_ties_never_push_deferral_above_the_target() -> None:
    scores = np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    for rate in (0.1, 0.2, 0.3, 0.5):
        assert deferral_rate(scores, quantile_threshold(scores, rate)) <= rate


def test_quantile_thresholds_are_keyed_by_rate() -> None:
    table = quantile_thresholds(np.linspace(0, 1, 101), rates=(0.1, 0.5))
    assert set(table) == {"0.1", "0.5"}
    assert table["0.1"] > table["0.5"]


def test_bad_rates_and_empty_scores_are_errors() -> None:
    with pytest.raises(CalibrationError):
        quantile_threshold(np.array([0.5]), 1.5)
    with pytest.raises(CalibrationError):
        quantile_threshold(np.array([]), 0.1)


def point(threshold: float, accuracy: float, deferred: float) -> SweepPoint:
    return SweepPoint(threshold, None, accuracy, deferred, 0, 0, 0.0)


def test_pick_by_accuracy_prefers_fewer_deferrals_on_ties() -> None:
    points = [point(0.9, 0.5, 0.05), point(0.5, 0.95, 0.2), point(0.1, 0.95, 0.6)]
    assert pick(points).threshold == 0.5


def test_pick_within_a_deferral_budget() -> None:
    points = [point(0.9, 0.5, 0.05), point(0.5, 0.95, 0.2), point(0.1, 0.99, 0.6)]
    assert pick(points, rule="max-deferral", max_deferral=0.25).threshold == 0.5
    assert pick(points).threshold == 0.1
    with pytest.raises(CalibrationError, match="needs --max-deferral"):
        pick(points, rule="max-deferral")
    with pytest.raises(CalibrationError, match="no swept threshold"):
        pick(points, max_deferral=0.01)


def test_sweep_runs_each_distinct_threshold_once() -> None:
    asked: list[float] = []

    def run(threshold: float) -> SweepPoint:
        asked.append(threshold)
        return point(threshold, 1 - threshold, 1 - threshold)

    points = sweep(candidates({"0.1": 0.8, "0.2": 0.8, "0.5": 0.3}, fixed=(0.3, 0.6)), run, progress=False)
    assert sorted(asked) == [0.3, 0.6, 0.8]
    assert {p.threshold: p.target_rate for p in points}[0.6] is None
    assert [p.deferred_fraction for p in points] == sorted(p.deferred_fraction for p in points)


def test_table_and_plot_are_written(tmp_path: Path) -> None:
    points = [point(0.9, 0.2, 0.0), point(0.5, 0.9, 0.2)]
    table = calibration_table(quantiles={"0.2": 0.5}, points=points, chosen=pick(points), rule="accuracy",
                              max_deferral=None, base_accuracy=0.2, expert_accuracy=0.1,
                              validation_positions=10)
    write_table(tmp_path / "calibration.json", table)
    assert json.loads((tmp_path / "calibration.json").read_text())["chosen"]["threshold"] == 0.5
    pytest.importorskip("matplotlib")
    plot(points, tmp_path / "plot.png", base_accuracy=0.2, expert_accuracy=0.1)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
