"""The toy domain: private invoice-like documents whose questions need one addition.

A corpus line is ``{"prompt", "answer", "passage", "question", "expression", "result"}``.
``prompt`` is the plain format of ``client.prompting`` (one passage), ``answer`` is
``" Total: 37+48=85."``; the answer ends there and the models write EOS after it
(the JSONL answer carries no EOS, since EOS is a token, not text).

Everything is a pure function of the seed: the same seed gives the same corpus bytes.
Operand pairs are split between train and held-out, so held-out expressions are new to both
models. Expert prefixes are unrelated text (random characters, random words, ``[private]``,
fragments of other expressions) and never the document/answer format.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from client.prompting import plain_prompt

OPERAND_RANGE = range(10, 100)
HELD_OUT_FRACTION = 0.1
REDACTED_PLACEHOLDER = "[private]"

DOC_KINDS = ("invoice", "order", "shipment", "receipt", "delivery", "manifest")
VENDORS = (
    "Harbor Supply", "Northwind Traders", "Acme Tools", "Blue Ridge Farms", "Kestrel Labs",
    "Old Mill Bakery", "Granite Works", "Silver Lake Foods", "Redwood Paper", "Atlas Freight",
    "Maple Hardware", "Coastal Fisheries", "Summit Textiles", "Ironbridge Metals", "Willow Dairy",
    "Pioneer Seeds", "Lumen Optics", "Quarry Stone Co", "Juniper Pharma", "Falcon Electric",
)
ITEMS = (
    "bolts", "nuts", "washers", "apples", "pears", "cables", "lamps", "pipes", "gloves", "tiles",
    "bricks", "filters", "valves", "screws", "hinges", "batteries", "bottles", "jars", "rope",
    "paper", "flour", "rice", "beans", "nails", "fuses", "boards", "sensors", "towels", "soap",
    "cups",
)
UNITS = ("crates", "boxes", "pallets", "cases", "bags", "units", "drums", "rolls", "packs")

PASSAGE_TEMPLATES = (
    "{Kind} {number} from {vendor}: {a} {unit} of {item1} and {b} {unit} of {item2}.",
    "{vendor} sent {kind} {number} with {a} {unit} of {item1} and {b} {unit} of {item2}.",
    "{Kind} {number}, {vendor}. {Item1}: {a} {unit}. {Item2}: {b} {unit}.",
    "{Kind} {number} ({vendor}) lists {a} {unit} of {item1} plus {b} {unit} of {item2}.",
    "On {kind} {number}, {vendor} delivered {a} {unit} of {item1}, then {b} {unit} of {item2}.",
)
QUESTION_TEMPLATES = (
    "How many {unit} are on {kind} {number} in total?",
    "What is the total of {unit} in {kind} {number}?",
    "How many {unit} does {kind} {number} list?",
)
ANSWER_TEMPLATE = " Total: {a}+{b}={result}."

JUNK_WORDS = (
    "the", "a", "river", "blue", "quickly", "table", "seven", "under", "music", "north", "bright",
    "garden", "is", "and", "of", "cloud", "stone", "letter", "window", "paper", "green", "old",
    "market", "train", "sun", "was", "with", "note", "city", "morning", "yes", "no", "maybe",
    "report", "meeting", "plan", "draft", "page", "line", "item", "value", "list", "code",
)
JUNK_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?()[]-_/*#@'\"\n"
EXPRESSION_ENDINGS = (".", ".", " ", "\n", ",", ";", ")", "")


@dataclass(frozen=True)
class Example:
    """One question about one private document, with its gold answer."""

    prompt: str
    answer: str
    passage: str
    question: str
    expression: str
    result: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def prompt_text(passage: str, question: str) -> str:
    """The exact prompt text the client builds for one passage."""
    return "".join(segment.text for segment in plain_prompt([passage], question))


def remote_view(question: str) -> str:
    """The prompt as the expert sees it under ``redact_private``."""
    return prompt_text(REDACTED_PLACEHOLDER, question)


@dataclass(frozen=True)
class OperandSplit:
    """Operand pairs for training, validation (early stopping) and test; the sets are disjoint."""

    train: list[tuple[int, int]]
    validation: list[tuple[int, int]]
    test: list[tuple[int, int]]


def operand_split(seed: int) -> OperandSplit:
    pairs = [(a, b) for a in OPERAND_RANGE for b in OPERAND_RANGE]
    random.Random(f"pairs-{seed}").shuffle(pairs)
    held_out_count = int(len(pairs) * HELD_OUT_FRACTION)
    return OperandSplit(
        train=pairs[2 * held_out_count :],
        validation=pairs[held_out_count : 2 * held_out_count],
        test=pairs[:held_out_count],
    )


def make_example(rng: random.Random, a: int, b: int) -> Example:
    kind = rng.choice(DOC_KINDS)
    item1, item2 = rng.sample(ITEMS, 2)
    fields = {
        "kind": kind, "Kind": kind.capitalize(), "number": str(rng.randint(1000, 9999)),
        "vendor": rng.choice(VENDORS), "unit": rng.choice(UNITS), "item1": item1, "item2": item2,
        "Item1": item1.capitalize(), "Item2": item2.capitalize(), "a": str(a), "b": str(b),
    }
    passage = rng.choice(PASSAGE_TEMPLATES).format(**fields)
    question = rng.choice(QUESTION_TEMPLATES).format(**fields)
    answer = ANSWER_TEMPLATE.format(**fields, result=a + b)
    return Example(
        prompt=prompt_text(passage, question), answer=answer, passage=passage, question=question,
        expression=f"{a}+{b}", result=a + b,
    )


def make_examples(rng: random.Random, pairs: Sequence[tuple[int, int]], count: int) -> list[Example]:
    return [make_example(rng, *rng.choice(pairs)) for _ in range(count)]


def base_training_answer(example: Example, rng: random.Random) -> str:
    """The answer with a random result: the base stands for a small model that cannot add.

    The number has a plausible length (that of a sum of two operands), so the base learns where
    the result goes and how the sentence ends, but nothing about its value.
    """
    fake = rng.randint(OPERAND_RANGE.start * 2, (OPERAND_RANGE.stop - 1) * 2)
    head = example.answer[: example.answer.rindex("=") + 1]
    return f"{head}{fake}."


def junk_prefix(rng: random.Random, pairs: Sequence[tuple[int, int]], max_chars: int) -> str:
    """Unrelated text that may precede an expression: the expert must ignore it."""
    kind = rng.randrange(7)
    length = rng.randint(1, max_chars) if max_chars > 0 else 0
    if kind == 0 or length == 0:
        return ""
    if kind == 1:
        text = "".join(rng.choice(JUNK_CHARS) for _ in range(length))
    elif kind == 2:
        text = ""
        while len(text) < length:
            text += rng.choice(JUNK_WORDS) + rng.choice(("", " ", " ", ", ", ". ", "\n"))
    elif kind == 3:
        text = " ".join([REDACTED_PLACEHOLDER] * rng.randint(1, 3))
    elif kind == 4:
        a, b = rng.choice(pairs)
        text = rng.choice((f"{a}+{b}", f"={a + b}", f"{a}+", f"{b}", f"{a}+{b}={a + b}"))
    elif kind == 5:
        text = "".join(rng.choice(JUNK_CHARS) for _ in range(length // 3))
        text += " " + rng.choice(JUNK_WORDS).capitalize() + f" {rng.randint(0, 9999)}"
    else:  # words and numbers mixed, like a document the expert may see in full
        text = ""
        while len(text) < length:
            word = str(rng.randint(0, 9999 if rng.random() < 0.3 else 99))
            word = word if rng.random() < 0.35 else rng.choice(JUNK_WORDS)
            text += word + rng.choice((" ", ", ", ": ", ". "))
    return text[:max_chars] + rng.choice((" ", ": ", "\n", " (", ", "))


def expression_text(a: int, b: int) -> str:
    return f"{a}+{b}={a + b}"


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    path.write_text("".join(example.to_json() + "\n" for example in examples), encoding="utf-8")


def read_jsonl(path: Path) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Example(**json.loads(line)) for line in lines if line.strip()]


SAMPLE_DOCUMENTS = (
    ("invoice-4417.txt", "invoice", 4417, "Harbor Supply", 37, 48, "crates", "bolts", "nuts"),
    ("order-2150.md", "order", 2150, "Willow Dairy", 26, 59, "cases", "jars", "bottles"),
    ("shipment-7302.txt", "shipment", 7302, "Atlas Freight", 64, 17, "pallets", "bricks", "tiles"),
    ("receipt-9081.md", "receipt", 9081, "Lumen Optics", 45, 38, "boxes", "lamps", "filters"),
)


def write_sample_documents(directory: Path) -> list[dict[str, str]]:
    """A few private documents for the demo; returns one demo question per document."""
    directory.mkdir(parents=True, exist_ok=True)
    questions = []
    for name, kind, number, vendor, a, b, unit, item1, item2 in SAMPLE_DOCUMENTS:
        fields = {
            "kind": kind, "Kind": kind.capitalize(), "number": str(number), "vendor": vendor,
            "unit": unit, "item1": item1, "item2": item2, "Item1": item1.capitalize(),
            "Item2": item2.capitalize(), "a": str(a), "b": str(b),
        }
        passage = PASSAGE_TEMPLATES[0].format(**fields)
        (directory / name).write_text(passage + "\n", encoding="utf-8")
        questions.append({
            "document": name,
            "question": QUESTION_TEMPLATES[0].format(**fields),
            "answer": ANSWER_TEMPLATE.format(**fields, result=a + b),
        })
    return questions
