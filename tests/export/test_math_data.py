"""The math expert's training rows: which tokens are targets, and that pieces tokenize as whole text."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from export import gsm8k, math_data

NATALIA = gsm8k.Problem(
    question="Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?",
    answer="Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
)
PLAIN = math_data.RowOptions(synthetic_share=0.0, plain_share=0.0, chat_share=0.0)


def marked(segments: list[math_data.Segment]) -> str:
    return "".join(f"[{text}]" if is_target else text for text, is_target in segments)


def test_results_their_copies_solution_numbers_and_the_final_answer_are_targets() -> None:
    text = marked(math_data.problem_segments(NATALIA, random.Random(0), PLAIN))
    assert text == (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer: "
        "Natalia sold [48]/[2] = <<48/2=[24>>][24] clips in May.\n"
        "Natalia sold [48]+[24] = <<48+24=[72>>][72] clips altogether in April and May.\n#### [72]\n\n"
    )


def test_plain_form_drops_the_brackets_and_keeps_the_result_a_target() -> None:
    options = math_data.RowOptions(synthetic_share=0.0, plain_share=1.0, spaced_share=0.0, chat_share=0.0)
    text = marked(math_data.problem_segments(NATALIA, random.Random(0), options))
    assert "Natalia sold [48]/[2] = [24] clips in May.\n" in text
    assert "<<" not in text and text.endswith("#### [72]\n\n")
    problem = gsm8k.Problem("q", "She earns $<<12*5=60>>60 a week.\n#### 60")
    assert marked(math_data.problem_segments(problem, random.Random(0), options)).endswith(
        "She earns $[12]*[5] = [60] a week.\n#### [60]\n\n"
    )


def test_plain_form_with_spaced_operators_as_smollm2_writes_them() -> None:
    options = math_data.RowOptions(synthetic_share=0.0, plain_share=1.0, spaced_share=1.0, chat_share=0.0)
    text = marked(math_data.problem_segments(NATALIA, random.Random(0), options))
    assert "Natalia sold [48] / [2] = [24] clips in May.\n" in text
    assert "Natalia sold [48] + [24] = [72] clips" in text
    problem = gsm8k.Problem("q", "She earns $<<12*5=60>>60 a week.\n#### 60")
    assert marked(math_data.problem_segments(problem, random.Random(0), options)).endswith(
        "She earns $[12] * [5] = [60] a week.\n#### [60]\n\n"
    )


def test_a_copy_with_thousands_commas_or_after_a_dollar_is_rewritten_once() -> None:
    problem = gsm8k.Problem("q", "He earns 45000*5 = $<<45000*5=225000>>225,000 a year.\n#### 225000")
    spaced = math_data.RowOptions(synthetic_share=0.0, plain_share=1.0, spaced_share=1.0, chat_share=0.0)
    assert marked(math_data.problem_segments(problem, random.Random(0), spaced)).endswith(
        "He earns [45000] * [5] = [225000] a year.\n#### [225000]\n\n"
    )
    assert marked(math_data.problem_segments(problem, random.Random(0), PLAIN)).endswith(
        "He earns [45000]*[5] = $<<45000*5=[225000>>][225000] a year.\n#### [225000]\n\n"
    )
    problem = gsm8k.Problem("q", "He eats .25+.25=<<.25+.25=.5>>.5 pounds.\n#### .5")
    assert marked(math_data.problem_segments(problem, random.Random(0), spaced)).endswith(
        "He eats .[25] + .[25] = [0.5] pounds.\n#### [0.5]\n\n"
    )


def test_spaced_keeps_signs_and_parentheses() -> None:
    assert math_data.spaced("7*365") == "7 * 365"
    assert math_data.spaced("-5+(3.5*2)/4") == "-5 + (3.5 * 2) / 4"
    assert math_data.spaced("2*-3") == "2 * -3"


def test_a_synthetic_last_result_carries_into_the_copy_and_the_final_answer() -> None:
    options = math_data.RowOptions(synthetic_share=1.0, plain_share=0.0, chat_share=0.0)
    segments = math_data.problem_segments(NATALIA, random.Random(0), options)
    text = "".join(t for t, _ in segments)
    annotations = gsm8k.find_annotations(text)
    assert [a.expression for a in annotations] != ["48/2", "48+24"]
    last = gsm8k.format_result(gsm8k.evaluate(annotations[-1].expression))
    assert text.endswith(f"={last}>>{last} clips altogether in April and May.\n#### {last}\n\n")


def test_bare_documents_come_as_annotations_and_as_plain_expressions() -> None:
    rng = random.Random(0)
    rows = [math_data.bare_segments(rng, ["apples", "Tom"]) for _ in range(60)]
    kinds = {"<<" in row[0][0] for row in rows}
    assert kinds == {True, False}
    assert any(" * " in row[0][0] or " + " in row[0][0] for row in rows)
    for row in rows:
        found = re.search(r"([\d(.][\d.+\-*/() ]*)=$", row[0][0].rstrip(" "))
        assert found is not None, row
        expression = found.group(1)
        value = gsm8k.format_result(gsm8k.evaluate(expression))
        assert row[1] == (value + (">>" if "<<" in row[0][0] else ""), True)


@pytest.mark.slow
def test_pieces_tokenize_as_the_whole_text() -> None:
    """Targets are cut out at digit and ``=`` boundaries; SmolLM2's pre-tokenizer cuts there too,
    so the client, which tokenizes whole text, sees the same tokens the expert was trained on."""
    from tandem_core.base_model import smollm2_path

    tokenizer = math_data.HFTokenizer.from_gguf(Path(smollm2_path()))
    train, _ = gsm8k.split(gsm8k.load_problems())
    options = math_data.RowOptions(synthetic_share=0.0, plain_share=0.3)
    rng = random.Random(0)
    same = 0
    for problem in train[:200]:
        segments = math_data.problem_segments(problem, rng, options)
        pieces = [token for text, _ in segments for token in tokenizer.encode(text)]
        same += pieces == tokenizer.encode("".join(text for text, _ in segments))
    assert same == 200
