"""GSM8K loading, the fixed held-out split, annotation parsing and exact arithmetic."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from export import gsm8k
from export.gsm8k_corpus import write_corpora
from export.math_data import synthetic_expression


def test_exact_evaluation_uses_fractions() -> None:
    assert gsm8k.evaluate("0.1+0.2") == Fraction(3, 10)
    assert gsm8k.evaluate("(3+4)*2/7") == 2
    assert gsm8k.evaluate("2*20*.01") == Fraction(2, 5)
    assert gsm8k.evaluate("1,000-1") == 999


@pytest.mark.parametrize("bad", ["", "2**10", "__import__('os')", "1/0", "a+1", "2 if 1 else 3"])
def test_bad_expressions_are_refused(bad: str) -> None:
    with pytest.raises(gsm8k.GSM8KError):
        gsm8k.evaluate(bad)


def test_results_are_judged_against_the_value() -> None:
    third = Fraction(10, 3)
    assert gsm8k.result_is_right("3.33", third) and gsm8k.result_is_right("3.3333", third)
    assert not gsm8k.result_is_right("3", third)
    assert gsm8k.result_is_right("144.00", Fraction(144)) and not gsm8k.result_is_right(
        "144.1", Fraction(144)
    )
    assert not gsm8k.result_is_right("twelve", Fraction(12))
    assert gsm8k.format_result(third) == "3.33"
    assert gsm8k.format_result(Fraction(5, 2)) == "2.5"
    assert gsm8k.format_result(Fraction(-7)) == "-7"


def test_annotations_and_probes() -> None:
    problem = gsm8k.Problem("How many?", "She sold 48/2 = <<48/2=24>>24 clips.\n#### 24")
    (annotation,) = gsm8k.find_annotations(problem.answer)
    assert (annotation.expression, annotation.written_result) == ("48/2", "24")
    (probe,) = gsm8k.probes([problem])
    assert probe.prompt == "Question: How many?\nAnswer: She sold 48/2 = <<48/2="
    assert probe.value == 24
    assert gsm8k.final_answer_is_right("so 24.\n#### 24", problem)
    assert not gsm8k.final_answer_is_right("so 24.", problem)


def test_held_out_split_is_fixed_and_disjoint() -> None:
    problems = gsm8k.load_problems()
    train, held_out = gsm8k.split(problems)
    _, again_held = gsm8k.split(list(reversed(problems)))
    assert {p.key for p in held_out} == {p.key for p in again_held}
    assert not {p.key for p in train} & {p.key for p in held_out}
    assert 0.08 < len(held_out) / len(problems) < 0.12


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(gsm8k.GSM8KError, match="TANDEM_GSM8K"):
        gsm8k.load_problems(tmp_path / "nope.jsonl")


def test_synthetic_expressions_reach_beyond_the_annotations() -> None:
    import random

    rng = random.Random(0)
    expressions = [synthetic_expression(rng) for _ in range(300)]
    assert all(gsm8k.evaluate(text) == value for text, value in expressions)
    assert any("(" in text for text, _ in expressions) and any("." in text for text, _ in expressions)
    assert max(sum(text.count(op) for op in "+-*/") for text, _ in expressions) == 3
    assert max(abs(value) for _, value in expressions) > 10**6


def test_pipeline_corpora_never_use_held_out_problems_for_training(tmp_path: Path) -> None:
    paths = write_corpora(
        tmp_path, gsm8k_path=None, seed=0, limits={"train": 20, "validation": 5, "sweep": 6, "test": 6}
    )
    _, held_out = gsm8k.split(gsm8k.load_problems())
    held_questions = {p.question for p in held_out}
    for name in ("train", "validation", "sweep"):
        for line in paths[name].read_text().splitlines():
            prompt = json.loads(line)["prompt"]
            question = prompt.removeprefix("Question: ").split("\nAnswer:")[0]
            assert question not in held_questions
    test_lines = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert len(test_lines) == 6 and all(r["prompt"].endswith("=") for r in test_lines)


def test_pipeline_corpora_write_a_share_of_annotations_as_smollm2_writes_its_sums(tmp_path: Path) -> None:
    limits = {"train": 40, "validation": 5, "sweep": 6, "test": 6}
    gold = write_corpora(tmp_path / "gold", gsm8k_path=None, seed=0, limits=limits)
    plain = write_corpora(tmp_path / "plain", gsm8k_path=None, seed=0, limits=limits, plain_share=0.5)
    gold_rows = [json.loads(line) for line in gold["train"].read_text().splitlines()]
    plain_rows = [json.loads(line) for line in plain["train"].read_text().splitlines()]
    assert [r["prompt"] for r in gold_rows] == [r["prompt"] for r in plain_rows]
    assert gold["test"].read_text() == plain["test"].read_text()  # probes stay annotations
    plain_text = "".join(r["answer"] for r in plain_rows)
    sums = re.findall(r"(?<![\d./])(\d[\d.]*(?: [-+*/] [\d.]+)+) = (\d+(?:\.\d+)?)(?![\d.])", plain_text)
    assert len(sums) >= 20 and all(
        gsm8k.result_is_right(result, gsm8k.evaluate(expression)) for expression, result in sums
    )
    annotations = len(gsm8k.find_annotations(plain_text))
    assert 0.3 < len(sums) / (len(sums) + annotations) < 0.7
    assert all(row["answer"].startswith(" ") and "#### " in row["answer"] for row in plain_rows)
    assert "Question:" not in plain_text and not plain_text.endswith("\n\n")
