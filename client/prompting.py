"""Prompt segments: text pieces that remember whether they are private.

The plain format below is the toy pair's training format (export/toy.py builds its corpus with
it), so the daemon's prompts and the toy models agree byte for byte. Each segment is tokenized on
its own and the ids concatenated, which keeps the private/public boundary on a token boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text; private segments never leave the machine under redact_private."""

    text: str
    private: bool = False


def plain_prompt(passages: Sequence[str], question: str) -> list[Segment]:
    """The toy format: one ``Document:`` line per passage, then the question and ``Answer:``."""
    segments: list[Segment] = []
    for passage in passages:
        segments += [Segment("Document: "), Segment(passage, private=True), Segment("\n")]
    segments.append(Segment(f"Question: {question}\nAnswer:"))
    return segments
