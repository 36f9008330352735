"""Where private prompt text came from: the source label a private segment carries.

``client.prompting.Segment`` says only *whether* text is private; the egress policy also needs
*why*, to apply the rule for it and to name it in the audit record: the document a passage came
from (``passage:invoice-4417.txt``), an earlier answer the client sent back (``assistant-turn``),
or the document a piece of the user's own text repeats (``repeat:invoice-4417.txt``).
``SourcedSegment`` adds that label; it compares equal to a plain segment with the same text and
privacy, so the label is metadata, not content. (A subclass rather than a new field keeps
``prompting.py``, which the toy build hashes, unchanged.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from client.prompting import Segment, plain_prompt

ASSISTANT_TURN = "assistant-turn"
_PASSAGE_SLOT = "\x00tandem-passage\x00"
_QUESTION_SLOT = "\x00tandem-question\x00"


@dataclass(frozen=True, eq=False)
class SourcedSegment(Segment):
    """A segment with the label of where its text came from."""

    source: str = ""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Segment):
            return (self.text, self.private) == (other.text, other.private)
        return NotImplemented

    __hash__ = Segment.__hash__


def source_of(segment: Segment) -> str:
    """The segment's source label ('' when it has none)."""
    return segment.source if isinstance(segment, SourcedSegment) else ""


def private(text: str, source: str) -> SourcedSegment:
    return SourcedSegment(text, True, source)


def passage_segment(passage: str | Segment) -> Segment:
    """A passage as a private segment (a bare string has no known document)."""
    if isinstance(passage, Segment):
        return passage if passage.private else SourcedSegment(passage.text, True,
                                                              source_of(passage))
    return SourcedSegment(passage, True, "passage")


def join_public(segments: Sequence[Segment]) -> list[Segment]:
    """Empty segments dropped and neighbouring public ones merged (as the models were trained)."""
    joined: list[Segment] = []
    for segment in segments:
        if not segment.text:
            continue
        if joined and not segment.private and not joined[-1].private:
            joined[-1] = Segment(joined[-1].text + segment.text)
        else:
            joined.append(segment)
    return joined


def plain_prompt_with_sources(passages: Sequence[str | Segment],
                              question: Sequence[Segment]) -> list[Segment]:
    """``client.prompting.plain_prompt`` with sourced passages and a question in segments.

    The toy format stays defined once, in ``plain_prompt``: it is rendered with slot strings,
    which are then replaced by the passages and the question's parts.
    """
    template = plain_prompt([_PASSAGE_SLOT] * len(passages), _QUESTION_SLOT)
    filled: list[Segment] = []
    remaining = iter(passages)
    for segment in template:
        if segment.private and segment.text == _PASSAGE_SLOT:
            filled.append(passage_segment(next(remaining)))
            continue
        before, found, after = segment.text.partition(_QUESTION_SLOT)
        if not found:
            filled.append(segment)
            continue
        filled += join_public([Segment(before), *question, Segment(after)])
    return filled
