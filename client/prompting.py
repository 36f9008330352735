"""Prompt segments: text pieces that remember whether they are private, and why.

The plain format below is the toy pair's training format (export/toy.py builds its corpus with
it), so the daemon's prompts and the toy models agree byte for byte. Each segment is tokenized on
its own and the ids concatenated, which keeps the private/public boundary on a token boundary.

A private segment carries its ``source``: the document a passage came from (``invoice-4417.txt``),
``assistant-turn`` for an earlier answer the client sent back, or the document a piece of the
user's own text repeats. The egress policy names the source in the audit record, so "what left"
can say where a value came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

ASSISTANT_TURN = "assistant-turn"


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text; private segments never leave the machine under redact_private."""

    text: str
    private: bool = False
    source: str = field(default="", compare=False)  # why it is private; metadata only


def passage_segment(passage: str | Segment) -> Segment:
    """A passage as a private segment (a bare string has no known document)."""
    if isinstance(passage, Segment):
        return passage if passage.private else Segment(passage.text, True, passage.source)
    return Segment(passage, private=True, source="document")


def plain_prompt(passages: Sequence[str | Segment], question: str | Sequence[Segment]
                 ) -> list[Segment]:
    """The toy format: one ``Document:`` line per passage, then the question and ``Answer:``.

    ``question`` may be given as segments, where parts that repeat a stored document are private.
    """
    segments: list[Segment] = []
    for passage in passages:
        segments += [Segment("Document: "), passage_segment(passage), Segment("\n")]
    parts = [Segment(question)] if isinstance(question, str) else list(question)
    return segments + join_public([Segment("Question: "), *parts, Segment("\nAnswer:")])


def join_public(segments: Sequence[Segment]) -> list[Segment]:
    """Neighbouring public segments merged (the tokenization the models were trained on)."""
    joined: list[Segment] = []
    for segment in segments:
        if not segment.text:
            continue
        if joined and not segment.private and not joined[-1].private:
            joined[-1] = Segment(joined[-1].text + segment.text)
        else:
            joined.append(segment)
    return joined
