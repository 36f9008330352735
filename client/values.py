"""Short private values: the numbers, dates, IDs and names a passage holds, found again elsewhere.

Copy detection by long substrings (``taint_min_chars``) misses what matters most in business
documents: ``184,500``, ``2024-03-05``, ``4417``, ``Whitfield``. A *value* here is
- a run of letters and digits that holds a digit, with inner ``. , : / -`` joining digit groups
  (``184,500``, ``2024-03-05``, ``A-113``, ``37``), compared without those separators and case;
- a name: a capitalised word of three or more letters inside a sentence of the private text
  (not its first word, not a common function word), compared case-insensitively in public text.

``find_values`` scans public text for whole values equal to a private one. With ``open_end``
(the text the decoder is still writing) a last value that is the beginning of a private value
counts too: ``18`` at the end of ``earns 18`` is on its way to ``184,500``. Whole values are
compared, so ``37`` in ``137`` is not a copy of ``37``, but ``37`` in ``37+48`` is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_NUMBER = re.compile(r"\b[^\W_]*\d[^\W_]*(?:[.,:/-]\d[^\W_]*)*")
_WORD = re.compile(r"\b[^\W\d_]{3,}\b")
_SEPARATORS = str.maketrans("", "", ".,:/-")
_SENTENCE_END = (".", "!", "?", ":", ";", "\n")
# Capitalised words that name nobody: kept out so "The" or "Total" in an answer is not a copy.
_COMMON = frozenset({
    "the", "and", "for", "from", "with", "this", "that", "these", "those", "there", "then",
    "than", "what", "when", "where", "which", "who", "why", "how", "not", "but", "all", "any",
    "are", "was", "were", "has", "have", "had", "its", "our", "your", "their", "his", "her",
    "she", "him", "they", "you", "yes", "per", "via", "total", "note", "page", "date", "name",
})


@dataclass(frozen=True)
class Value:
    """A value found in public text: characters ``[start, end)``, the text, its private source."""

    start: int
    end: int
    text: str
    source: str


@dataclass(frozen=True)
class PrivateValues:
    """Normalised values of private text, each with the name of the first source holding it."""

    numbers: dict[str, str]
    names: dict[str, str]

    @classmethod
    def of(cls, texts: Sequence[tuple[str, str]], *, min_chars: int = 2) -> PrivateValues:
        """Values of each ``(text, source name)``; shorter than ``min_chars``: ignored."""
        numbers: dict[str, str] = {}
        names: dict[str, str] = {}
        for text, source in texts:
            for match in _NUMBER.finditer(text):
                key = _number_key(match.group())
                if len(key) >= min_chars:
                    numbers.setdefault(key, source)
            for match in _WORD.finditer(text):
                word = match.group()
                if word[0].isupper() and not _sentence_start(text, match.start()) \
                        and word.lower() not in _COMMON and len(word) >= min_chars:
                    names.setdefault(word.lower(), source)
        return cls(numbers, names)

    def __bool__(self) -> bool:
        return bool(self.numbers or self.names)


def find_values(text: str, values: PrivateValues, *, min_chars: int = 2,
                open_end: bool = False) -> list[Value]:
    """Whole values of ``text`` that equal (or, at an open end, begin) a private value."""
    if not values:
        return []
    found = []
    for kind, pattern, known in (("number", _NUMBER, values.numbers),
                                 ("name", _WORD, values.names)):
        for match in pattern.finditer(text):
            key = _number_key(match.group()) if kind == "number" else match.group().lower()
            source = known.get(key) if len(key) >= min_chars else None
            if source is None and open_end and match.end() == len(text) \
                    and key not in _COMMON:
                source = _begun(key, known)
            if source is not None:
                found.append(Value(match.start(), match.end(), match.group(), source))
    return found


def word_spans(text: str) -> Iterator[tuple[int, int]]:
    """``[start, end)`` of each run of letters and digits."""
    for match in re.finditer(r"[^\W_]+", text):
        yield match.start(), match.end()


def _number_key(text: str) -> str:
    return text.translate(_SEPARATORS).lower()


def _begun(prefix: str, known: dict[str, str]) -> str | None:
    """The source of a private value that ``prefix`` is the beginning of."""
    if not prefix:
        return None
    for value, source in known.items():
        if len(value) > len(prefix) and value.startswith(prefix):
            return source
    return None


def _sentence_start(text: str, position: int) -> bool:
    before = text[:position].rstrip(" \t\"'(")
    return not before or before.endswith(_SENTENCE_END)
