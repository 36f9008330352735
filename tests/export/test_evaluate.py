"""Evaluation: answer scoring, baseline switches, and real decoding of the four systems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.evaluate import (
    ConstantSwitch,
    DecodingSetup,
    RandomSwitch,
    SystemResult,
    decode_corpus,
    exact_match,
    final_number,
    format_table,
    numeric_match,
    open_models,
    plot_results,
)


@pytest.mark.parametrize(("text", "number"), [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    (" Invoice 4417 total: 37+48=85.", "85"),
    ("no number here", None),
    ("It costs 2.50 dollars", "2.5"),
])
def test_final_number(text: str, number: str | None) -> None:
    assert final_number(text) == number


def test_exact_and_numeric_match() -> None:
    assert exact_match(" 37+48=85.", "37+48=85. ")
    assert not exact_match("37+48=86.", "37+48=85.")
    assert numeric_match("so the answer is #### 85", "blah\n#### 85")
    assert not numeric_match("#### 84", "#### 85")
    assert not numeric_match("85", "no number")


def test_baseline_switches() -> None:
    hidden = np.zeros((1000, 4), np.float32)
    assert ConstantSwitch(0.0).score(hidden).max() == 0.0
    assert ConstantSwitch(1.0).score(hidden).min() == 1.0
    draws = RandomSwitch(0).score(hidden)
    assert 0.17 < float(np.mean(draws > 0.8)) < 0.23
    assert np.array_equal(draws, RandomSwitch(0).score(hidden))


def test_table_and_plot(tmp_path: Path) -> None:
    results = [SystemResult("base", 0.5, 10, 0.2, 0.2, 0.0, 100, 0, 0, 1.0),
               SystemResult("co-llm", 0.3, 10, 0.9, 0.9, 0.2, 100, 12, 400, 2.0)]
    table = format_table(results)
    assert "co-llm" in table and "90.0%" in table
    pytest.importorskip("matplotlib")
    plot_results(results, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 1000


def test_real_decoding_of_base_and_expert(toy_pair: Any, tmp_path: Path) -> None:
    from export.collect import read_corpus

    setup = DecodingSetup(base_gguf=Path(toy_pair.base_gguf), expert_gguf=Path(toy_pair.expert_gguf),
                          prompt_style="plain", n_ctx=512, max_tokens=40,
                          audit_log=tmp_path / "audit.jsonl")
    examples = read_corpus(Path(toy_pair.test_jsonl), limit=3)
    with open_models(setup, audit_default=tmp_path / "unused.jsonl") as models:
        base = decode_corpus(models, examples, switch=ConstantSwitch(0.0), threshold=0.5, setup=setup,
                             system="base", progress=False)
        expert = decode_corpus(models, examples, switch=ConstantSwitch(1.0), threshold=0.5, setup=setup,
                               system="expert", progress=False)
    assert base.remote_calls == 0 and base.deferred_fraction == 0.0 and base.generated_tokens > 0
    assert expert.deferred_fraction == 1.0 and expert.remote_calls >= 3 and expert.tokens_sent > 0
    assert (tmp_path / "audit.jsonl").exists()
