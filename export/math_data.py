"""Training rows for the math expert: GSM8K text with calculator annotations, in SmolLM2 tokens.

A row is a run of documents packed to a fixed length. Most documents are GSM8K train problems
(question and full solution) in the plain ``Question: ... Answer: ...`` format or in SmolLM2's
chat format; a share of their annotations get a synthetic expression instead of the original
(new numbers, decimals, up to three operators, parentheses), so the expert has to compute rather
than recall. Other documents are bare annotations after short junk: GSM8K words or random
vocabulary ids, so any SmolLM2 token can precede an expression.

The loss falls on numbers the expert should write, never on other text:
- each annotation's result and its closing ``>>``;
- the same result in the other forms a model writes it: the copy after ``>>``, a bare
  ``expr = result`` without brackets (a share of annotations, and of the bare documents; half of
  them with spaced operators, ``7 * 365 = 2555``, as SmolLM2 writes), and the final ``#### answer``;
- every other number of the solution text, which a solver copies or carries from the question
  and earlier lines.
A switch head that defers in the middle of the base's own numbers, or after a bare ``=``, then
gets digits that follow from the context instead of a guess at an annotation result.

Text is tokenized in pieces cut right after each ``=`` and after each ``>>``: that is how the
client sees it (the prompt ends at ``<<expr=`` and the result is generated), and it keeps a
result such as ``-5`` from merging with ``=`` into one token.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, cast

from export.gsm8k import (
    ANSWER_PREFIX,
    QUESTION_PREFIX,
    GSM8KError,
    Problem,
    evaluate,
    find_annotations,
    format_result,
)

CHAT_USER = "<|im_start|>user\n"
CHAT_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
CHAT_END = "<|im_end|>\n"


class BatchTokenizer(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class HFTokenizer:
    """SmolLM2's byte-level BPE through the ``tokenizers`` library (Rust, fast enough to feed a GPU).

    Built from a GGUF's ``tokenizer.*`` keys: the vocabulary, the merges, and the ``smollm``
    pre-tokenizer (each digit alone, then GPT-2's split). A test checks it against llama.cpp.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_gguf(cls, path: Path) -> HFTokenizer:
        from export.gguf_writer import vocabulary_from_gguf

        vocabulary = vocabulary_from_gguf(path)
        return cls.from_vocabulary(
            vocabulary.fields["tokenizer.ggml.tokens"][0],
            vocabulary.fields["tokenizer.ggml.merges"][0],
            vocabulary.fields["tokenizer.ggml.token_type"][0],
        )

    @classmethod
    def from_vocabulary(
        cls, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int]
    ) -> HFTokenizer:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab = {token: index for index, token in enumerate(tokens)}
        # each merge is "left right"; tokenizers validates the pairs
        pairs = [cast(tuple[str, str], tuple(merge.split(" ", 1))) for merge in merges]
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        control = [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind == 3
        ]
        tokenizer.add_special_tokens(control)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: Path) -> HFTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self._tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [list(encoding.ids) for encoding in encodings]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]


# -- synthetic expressions --------------------------------------------------------------------


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.55:
        digits = rng.choices((1, 2, 3, 4, 5, 6), weights=(30, 30, 20, 10, 6, 4))[0]
        return str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1))
    if kind < 0.8:
        whole = rng.choice((0, 0, rng.randint(1, 9), rng.randint(1, 99), rng.randint(1, 999)))
        decimals = rng.choice((1, 2, 2))
        fraction = str(rng.randint(1, 10**decimals - 1)).zfill(decimals)
        return f"{'' if whole == 0 and rng.random() < 0.3 else whole}.{fraction}"
    return str(
        rng.choice((2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 24, 25, 30, 40, 50, 52, 60, 100, 365, 1000))
        * rng.choice((1, 1, 1, 10, 100))
    )


def synthetic_expression(rng: random.Random) -> tuple[str, Fraction]:
    """A GSM8K-like calculator expression of 1-3 operators, with its exact value."""
    while True:
        operators = rng.choices((1, 2, 3), weights=(50, 32, 18))[0]
        numbers = [_number(rng) for _ in range(operators + 1)]
        ops = rng.choices("+-*/", weights=(30, 16, 34, 20), k=operators)
        for index, op in enumerate(ops):
            if op == "/" and rng.random() < 0.6 and "." not in numbers[index]:
                # Mostly exact divisions, as in GSM8K: the left operand is a multiple of the right.
                divisor = rng.choice((2, 3, 4, 5, 6, 8, 10, 12, 20, 25, 50, 100, rng.randint(2, 99)))
                numbers[index + 1] = str(divisor)
                numbers[index] = str(divisor * rng.randint(1, 2000))
        parts = [numbers[0]]
        for op, number in zip(ops, numbers[1:], strict=True):
            parts += [op, number]
        if operators >= 2 and rng.random() < 0.3:
            first = 2 * rng.randint(0, operators - 1)
            parts[first] = "(" + parts[first]
            parts[first + 2] = parts[first + 2] + ")"
        expression = "".join(parts)
        try:
            value = evaluate(expression)
        except GSM8KError:
            continue
        if abs(value) > 10**9 or (value < 0 and rng.random() < 0.8):
            continue
        return expression, value


# -- documents and rows -----------------------------------------------------------------------


@dataclass(frozen=True)
class RowOptions:
    length: int = 1024
    synthetic_share: float = 0.4  # annotations of real problems that get a synthetic expression
    chat_share: float = 0.15
    bare_share: float = 0.25  # documents that are bare annotations after junk
    plain_share: float = 0.2  # real annotations written as plain ``expr = result``, no brackets
    spaced_share: float = 0.5  # plain expressions with spaced operators: ``7 * 365 = 2555``
    vocab_size: int = 49152


Segment = tuple[str, bool]  # text, and whether its tokens are loss targets


# Digits with an optional decimal part; a sign or a thousands comma is left as text, because
# SmolLM2 writes " -" and "," as tokens of their own that are not among the expert's outputs.
PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")


# A binary operator follows a digit or ")"; any other minus is a sign.
_BINARY_OPERATOR = re.compile(r"(?<=[\d)])([-+*/])(?=[\d(.-])")
# GSM8K's own expression before ``= <<``: "sold 48/2 = <<48/2=24>>", "$5 * 4 = $<<5*4=20>>".
_WRITTEN_EXPRESSION = re.compile(r"[.+\-*/()$ ]*\d[\d.+\-*/()$ ]*= ?\$?$")
# The copy of a result after ``>>``, which GSM8K sometimes writes with thousands commas.
_COPY = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")


def spaced(expression: str) -> str:
    """``7*365`` as ``7 * 365``: SmolLM2 writes its own arithmetic with spaced operators, a form
    GSM8K's annotations never use, and a switch head defers after its bare ``=`` all the same."""
    return _BINARY_OPERATOR.sub(r" \1 ", expression)


def text_segments(text: str) -> list[Segment]:
    """Solution text with each number in it a target (cut at digit boundaries, where SmolLM2's
    pre-tokenizer cuts anyway, so the pieces tokenize as the whole text does)."""
    segments: list[Segment] = []
    cursor = 0
    for match in PLAIN_NUMBER.finditer(text):
        segments += [(text[cursor : match.start()], False), (match.group(0), True)]
        cursor = match.end()
    segments.append((text[cursor:], False))
    return [segment for segment in segments if segment[0]]


def problem_segments(problem: Problem, rng: random.Random, options: RowOptions) -> list[Segment]:
    """Question and solution text, cut after each ``=`` and ``>>``; results and numbers are targets.

    Each annotation is written as it is, with a synthetic expression instead (``synthetic_share``),
    or plainly as ``expr = result`` (``plain_share``). The copy of the result after ``>>`` is
    rewritten to the canonical result, so it agrees with a synthetic expression too.
    """
    solution = problem.answer
    chat = rng.random() < options.chat_share
    head = (
        (CHAT_USER + problem.question + CHAT_ASSISTANT)
        if chat
        else (QUESTION_PREFIX + problem.question + ANSWER_PREFIX)
    )
    segments: list[Segment] = [(head, False)]
    cursor = 0
    last: tuple[str, str] = ("", "")  # the last annotation's written and canonical result
    for annotation in find_annotations(solution):
        try:
            value = evaluate(annotation.expression)
            expression = annotation.expression
        except GSM8KError:
            continue
        before = solution[cursor : annotation.start]
        after = annotation.end
        copy = _COPY.match(solution, after)
        if copy and copy.group(0).replace(",", "") == annotation.written_result.replace(",", ""):
            after = copy.end()  # the copy, rewritten below
        draw = rng.random()
        if draw < options.synthetic_share:
            expression, value = synthetic_expression(rng)
        result = format_result(value)
        last = (annotation.written_result, result)
        if options.synthetic_share <= draw < options.synthetic_share + options.plain_share:
            # "48/2 = <<48/2=24>>24" becomes "48/2 = 24"; "$<<12*5=60>>60" becomes "$12*5 = 60";
            # with spaced operators, "48 / 2 = 24" and "$12 * 5 = 60"
            written = "" if before.rstrip(" $").endswith("=") else expression + " = "
            if rng.random() < options.spaced_share and (written or _WRITTEN_EXPRESSION.search(before)):
                before = _WRITTEN_EXPRESSION.sub("", before)
                written = spaced(expression) + " = "
            if written and before and not before.endswith((" ", "$", "(", "\n")):
                written = " " + written
            segments += text_segments(before + written)
            segments.append((result, True))
        else:
            segments += text_segments(before)
            segments += [("<<" + expression + "=", False), (result + ">>", True)]
            if after > annotation.end:
                segments.append((result, True))
        cursor = after
    # "#### 72" copies the last result, so it follows a synthetic one, as the copy after ">>" does
    tail = solution[cursor:]
    if last[0] and tail.rstrip().endswith("#### " + last[0]):
        tail = tail.rstrip().removesuffix(last[0]) + last[1] + tail[len(tail.rstrip()):]
    segments += text_segments(tail)
    segments.append((CHAT_END if chat else "\n\n", False))
    return _merge(segments)


def plain_solution(problem: Problem, rng: random.Random, share: float) -> str:
    """The solution with a share of its annotations written as SmolLM2 writes its own arithmetic:
    ``48 / 2 = 24``, no brackets, spaced operators. A switch head trained on gold solutions alone
    never sees the form in which the base does most of its sums in free text."""
    options = RowOptions(synthetic_share=0.0, plain_share=share, spaced_share=1.0, chat_share=0.0)
    text = "".join(text for text, _ in problem_segments(problem, rng, options))
    return text.removeprefix(QUESTION_PREFIX + problem.question + ANSWER_PREFIX).removesuffix("\n\n")


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring segments of the same kind: text is cut only where targets start or end."""
    merged: list[Segment] = []
    for text, is_target in segments:
        if merged and not merged[-1][1] and not is_target:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, is_target))
    return merged


def bare_segments(rng: random.Random, words: Sequence[str]) -> list[Segment]:
    """A synthetic expression after junk, as an annotation or (a third of them) written plainly."""
    expression, value = synthetic_expression(rng)
    junk = " ".join(rng.choice(words) for _ in range(rng.choice((0, 0, 1, 3, 8, 20))))
    tail = (rng.choice((" ", "\n", ". ", "")), False)
    if rng.random() < 1 / 3:
        lead = rng.choice((" ", " $", "\n", " is "))  # never glued to a junk word
        written = spaced(expression) if rng.random() < 0.5 else expression
        plain = junk + lead + written + rng.choice((" = ", "="))
        return [(plain, False), (format_result(value), True), tail]
    lead = rng.choice(("", " ", " = ", " $", "\n", " is "))
    return [
        (junk + lead + "<<" + expression + "=", False),
        (format_result(value) + ">>", True),
        tail,
    ]


def make_row_factory(
    problems: Sequence[Problem], tokenizer: BatchTokenizer, options: RowOptions
) -> Callable[[random.Random], tuple[list[int], list[int]]]:
    """``make_row(rng) -> (ids, targets)``: ``targets[t]`` is 1 when ``ids[t]`` is a loss target."""
    words = sorted({word for problem in problems[:2000] for word in problem.question.split()})

    def make_row(rng: random.Random) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        targets: list[int] = []
        while len(ids) < options.length:
            segments: list[tuple[str | list[int], bool]] = []
            for _ in range(4):
                if rng.random() < 0.1:
                    segments.append(
                        ([rng.randrange(options.vocab_size) for _ in range(rng.randint(1, 12))], False)
                    )
                if rng.random() < options.bare_share:
                    segments += bare_segments(rng, words)
                else:
                    segments += problem_segments(rng.choice(problems), rng, options)
            encoded = iter(tokenizer.encode_batch([text for text, _ in segments if isinstance(text, str)]))
            for text, is_target in segments:
                pieces = next(encoded) if isinstance(text, str) else text
                ids += pieces
                targets += [int(is_target)] * len(pieces)
        return ids[: options.length], targets[: options.length]

    return make_row
