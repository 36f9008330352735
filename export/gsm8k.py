"""GSM8K problems, their ``<<expr=result>>`` calculator annotations, and exact arithmetic.

The train split is read from ``../shared/data/gsm8k/train.jsonl`` next to the repository (or
``$TANDEM_GSM8K``). A fixed tenth of it, chosen by a hash of the question text, is held out for
evaluation and never trained on: the split does not depend on file order or on the Python
version, so every tool that asks gets the same held-out problems.

Expressions are evaluated exactly (``fractions.Fraction`` over a parsed ``ast``, never ``eval``),
so ``0.1+0.2`` is ``3/10`` and a result is judged against the true value, not against the number
GSM8K's authors wrote (a few of those are wrong).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from tandem_core.errors import TandemError

GSM8K_ENV = "TANDEM_GSM8K"
HELD_OUT_PER_MILLE = 100
ANNOTATION = re.compile(r"<<([^=<>]*)=([^<>]*)>>")
NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
MAX_RESULT_DECIMALS = 2


class GSM8KError(TandemError):
    """The GSM8K file is missing or malformed, or an expression cannot be evaluated."""


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # solution text with annotations, ending in "#### <final answer>"

    @property
    def final_answer(self) -> str:
        return self.answer.rsplit("####", 1)[-1].strip().replace(",", "")

    @property
    def key(self) -> str:
        return hashlib.sha256(self.question.encode("utf-8")).hexdigest()

    @property
    def held_out(self) -> bool:
        return int(self.key[:8], 16) % 1000 < HELD_OUT_PER_MILLE


@dataclass(frozen=True)
class Annotation:
    """One ``<<expr=result>>`` inside a solution; offsets index into the solution text."""

    expression: str
    written_result: str
    start: int  # index of "<<"
    result_start: int  # first character after "="
    end: int  # index just after ">>"


def default_path() -> Path:
    if os.environ.get(GSM8K_ENV):
        return Path(os.environ[GSM8K_ENV])
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def load_problems(path: Path | None = None) -> list[Problem]:
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise GSM8KError(f"GSM8K train split not found at {path}; set {GSM8K_ENV} or pass --gsm8k")
    problems = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(Problem(question=str(row["question"]), answer=str(row["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise GSM8KError(f"{path}:{line_number}: not a GSM8K row ({exc})") from exc
    if not problems:
        raise GSM8KError(f"{path} holds no problems")
    return problems


def split(problems: Sequence[Problem]) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): the held-out tenth is fixed by the question text alone."""
    train = [p for p in problems if not p.held_out]
    held_out = [p for p in problems if p.held_out]
    return train, held_out


def find_annotations(solution: str) -> list[Annotation]:
    found = []
    for match in ANNOTATION.finditer(solution):
        found.append(
            Annotation(
                expression=match.group(1),
                written_result=match.group(2),
                start=match.start(),
                result_start=match.start(2),
                end=match.end(),
            )
        )
    return found


_OPERATORS = {
    ast.Add: Fraction.__add__,
    ast.Sub: Fraction.__sub__,
    ast.Mult: Fraction.__mul__,
    ast.Div: Fraction.__truediv__,
}


def evaluate(expression: str) -> Fraction:
    """The exact value of ``+ - * /`` with decimals and parentheses; GSM8KError otherwise."""
    text = expression.replace(",", "").replace(" ", "")
    if not text or len(text) > 200:
        raise GSM8KError(f"not a calculator expression: {expression!r}")
    try:
        tree = ast.parse(text, mode="eval")
        return _value(tree.body)
    except (SyntaxError, ZeroDivisionError, ValueError, RecursionError) as exc:
        raise GSM8KError(f"cannot evaluate {expression!r}: {exc}") from exc


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand)
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return Fraction(str(node.value))
    raise GSM8KError(f"unsupported element {ast.dump(node)[:40]}")


def format_result(value: Fraction) -> str:
    """The canonical written result: exact when it has at most two decimals, else rounded to two."""
    rounded = round(value, MAX_RESULT_DECIMALS)
    text = f"{float(rounded):.{MAX_RESULT_DECIMALS}f}" if rounded.denominator != 1 else str(rounded)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def result_is_right(written: str, value: Fraction) -> bool:
    """A written result is right when it equals the value, or is the value rounded to its decimals.

    ``3.33`` and ``3.3333`` are both right for 10/3; ``3`` is not, and neither is ``144.1`` for 144.
    Trailing zeros (``144.00``) do not matter.
    """
    text = written.strip().replace(",", "").replace("$", "")
    if not NUMBER.fullmatch(text):
        return False
    number = Fraction(text)
    if number == value:
        return True
    decimals = len(text.split(".", 1)[1].rstrip("0")) if "." in text else 0
    return decimals >= 1 and abs(number - value) <= Fraction(1, 2 * 10**decimals) + Fraction(1, 10**9)


@dataclass(frozen=True)
class Probe:
    """A prompt ending in ``<<expr=`` and the true value of ``expr``."""

    prompt: str
    expression: str
    value: Fraction
    written_result: str


QUESTION_PREFIX, ANSWER_PREFIX = "Question: ", "\nAnswer: "


def problem_text(problem: Problem, solution_prefix: str) -> str:
    """The plain-text format used everywhere: probes, few-shot prompts and training rows."""
    return f"{QUESTION_PREFIX}{problem.question}{ANSWER_PREFIX}{solution_prefix}"


def probes(problems: Sequence[Problem]) -> Iterator[Probe]:
    """Every evaluable annotation of every problem, as question + solution up to ``<<expr=``."""
    for problem in problems:
        for annotation in find_annotations(problem.answer):
            try:
                value = evaluate(annotation.expression)
            except GSM8KError:
                continue
            yield Probe(
                prompt=problem_text(problem, problem.answer[: annotation.result_start]),
                expression=annotation.expression,
                value=value,
                written_result=annotation.written_result,
            )


def answer_number(text: str) -> str | None:
    """The number a generated answer ends with after ``####`` (GSM8K's convention), if any."""
    _, marker, tail = text.partition("####")
    if not marker:
        return None
    match = NUMBER.search(tail.replace(",", "").replace("$", ""))
    return match.group(0) if match else None


def final_answer_is_right(generated: str, problem: Problem) -> bool:
    number = answer_number(generated)
    if number is None:
        return False
    try:
        return Fraction(number) == Fraction(problem.final_answer)
    except (ValueError, ZeroDivisionError):
        return False
