"""The egress policy: what part of a sequence the expert may see, how often, and why not.

``Policy.decide`` turns the local tokens and their private mask into the remote view:

1. Hidden tokens: private spans (unless mode is ``full``); public text that repeats
   ``taint_min_chars`` characters of a private span (the answer copying a passage); public text
   that repeats ``sensitive_min_chars`` letters or digits of a deny-pattern match inside a private
   span. The last rule is what stops an IBAN being copied digit by digit: every piece of
   ``sensitive_min_chars`` is hidden long before the whole number exists, so at most
   ``sensitive_min_chars - 1`` of its characters can ever reach the wire.
2. In ``window`` mode only the last ``window_tokens`` local tokens count; the window start moves
   in steps of a quarter window so the gateway can reuse its cache between steps.
3. Each run of hidden tokens becomes the placeholder's tokens.
4. Deny patterns run on the view's text: ``redact`` hides the tokens under a match (and the
   view is rebuilt); then a ``skip`` match denies the call.
5. Caps are checked and the call counted in one SQLite transaction (usage.py).

The view must be a function of the local sequence alone, so calls for the same prefix agree and
only new tokens are sent. The tokenizer must be byte-level (a token's bytes do not depend on its
neighbours), as llama.cpp's GPT-2 style vocabularies and the toy vocabulary are.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from client.egress import EgressDecision, EgressRequest, common_prefix_length
from client.errors import PolicyError
from client.settings import PolicySettings
from client.usage import Caps, UsageStore

_SURROGATES = "surrogateescape"


class Tokenizer(Protocol):
    """The two tokenizer calls the policy needs (``client.base_model.LlamaModel`` has both)."""

    def tokenize(self, text: str) -> Sequence[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> bytes: ...


@dataclass(frozen=True)
class _Pattern:
    name: str
    regex: re.Pattern[str]
    action: Literal["redact", "skip"]


@dataclass(frozen=True)
class _View:
    tokens: list[int]
    sources: list[int]  # local index of each view token; -1 for placeholder tokens


@dataclass(frozen=True)
class _Text:
    """Text of a token run, with the run index of the token under each character.

    A character split across tokens (BPE may cut a UTF-8 sequence) lies under several; all of
    them are listed in ``extra_tokens``, so hiding the character hides every piece of it.
    """

    text: str
    token_at_char: list[int]
    extra_tokens: dict[int, range] = field(default_factory=dict)

    def tokens_under(self, char: int) -> range:
        return self.extra_tokens.get(char) or range(self.token_at_char[char],
                                                      self.token_at_char[char] + 1)


class Policy:
    """Implements ``client.egress.EgressPolicy``."""

    def __init__(self, settings: PolicySettings, *, tokenizer: Tokenizer, usage: UsageStore) -> None:
        self._settings = settings
        self._tokenizer = tokenizer
        self._usage = usage
        self._caps = Caps(
            per_request_calls=settings.per_request_calls,
            per_request_tokens=settings.per_request_tokens,
            hourly_calls=settings.hourly_calls,
            hourly_tokens=settings.hourly_tokens,
            daily_calls=settings.daily_calls,
            daily_tokens=settings.daily_tokens,
        )
        self._patterns = [
            _Pattern(pattern.name, re.compile(pattern.regex), pattern.action)
            for pattern in settings.deny_patterns
        ]
        self._placeholder = list(tokenizer.tokenize(settings.placeholder))
        if not self._placeholder:
            raise PolicyError(f"the placeholder {settings.placeholder!r} tokenizes to nothing")
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._grams_for: tuple[tuple[str, ...], tuple[frozenset[str], frozenset[str]]] | None = None

    @classmethod
    def from_settings(cls, settings: PolicySettings, *, tokenizer: Tokenizer) -> Policy:
        return cls(settings, tokenizer=tokenizer, usage=UsageStore(settings.usage_db))

    def close(self) -> None:
        self._usage.close()

    def decide(self, request: EgressRequest) -> EgressDecision:
        """Build the remote view, apply deny patterns and caps; count the call if allowed."""
        if len(request.private_mask) != len(request.local_tokens):
            raise PolicyError(
                f"private mask has {len(request.private_mask)} entries for "
                f"{len(request.local_tokens)} tokens"
            )
        view_or_skip = self._remote_view(request.local_tokens, request.private_mask)
        if isinstance(view_or_skip, str):
            return EgressDecision(False, f"pattern:{view_or_skip}")
        view = view_or_skip.tokens
        send_from = common_prefix_length(view, request.held_view)
        new_tokens = len(view) - send_from
        dry_run = self._settings.dry_run
        if dry_run:
            exceeded = self._usage.would_exceed(request.request_id, new_tokens, self._caps)
        else:
            exceeded = self._usage.try_consume(request.request_id, new_tokens, self._caps)
        if exceeded is not None:
            return EgressDecision(False, f"cap:{exceeded}", dry_run=dry_run)
        if dry_run:
            return EgressDecision(False, "dry_run", view, send_from, dry_run=True)
        return EgressDecision(True, "ok", view, send_from)

    def remote_view(self, local_tokens: Sequence[int], private_mask: Sequence[bool]) -> list[int]:
        """The view the expert may see, or PolicyError when a skip pattern forbids any."""
        view = self._remote_view(local_tokens, private_mask)
        if isinstance(view, str):
            raise PolicyError(f"pattern:{view}")
        return view.tokens

    # --- the view ------------------------------------------------------------------------

    def _remote_view(self, local_tokens: Sequence[int], private_mask: Sequence[bool]) -> _View | str:
        tokens = [int(token) for token in local_tokens]
        hidden = self._hidden(tokens, [bool(flag) for flag in private_mask])
        start = self._window_start(len(tokens))
        view = self._build(tokens, hidden, start)
        redacted = self._pattern_hits(view, "redact")
        if redacted:
            for index in redacted:
                hidden[index] = True
            view = self._build(tokens, hidden, start)
        text = self._text(view.tokens).text
        for pattern in self._patterns:
            if pattern.action == "skip" and pattern.regex.search(text):
                return pattern.name
        return view

    def _hidden(self, tokens: list[int], private: list[bool]) -> list[bool]:
        hidden = list(private) if self._settings.mode != "full" else [False] * len(tokens)
        private_texts = tuple(
            self._text(tokens[start:end]).text for start, end in _runs(private, True)
        )
        if not private_texts:
            return hidden
        copied_grams, sensitive_grams = self._grams(private_texts)
        for start, end in _runs(private, False):
            run = self._text(tokens[start:end])
            marked = set()
            if self._settings.mode != "full":
                marked |= _exact_hits(run.text, copied_grams, self._settings.taint_min_chars)
            marked |= _normalized_hits(run.text, sensitive_grams, self._settings.sensitive_min_chars)
            for char in marked:
                for token in run.tokens_under(char):
                    hidden[start + token] = True
        return hidden

    def _grams(self, private_texts: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
        """Substrings of private text that public text may not repeat (cached per prompt)."""
        with self._lock:
            if self._grams_for is not None and self._grams_for[0] == private_texts:
                return self._grams_for[1]
        copy_size = self._settings.taint_min_chars
        sensitive_size = self._settings.sensitive_min_chars
        copied = frozenset(
            text[i:i + copy_size] for text in private_texts for i in range(len(text) - copy_size + 1)
        )
        sensitive_texts = [
            _normalize(match.group())[0]
            for text in private_texts for pattern in self._patterns
            for match in pattern.regex.finditer(text)
        ]
        sensitive = frozenset(
            text[i:i + sensitive_size]
            for text in sensitive_texts for i in range(len(text) - sensitive_size + 1)
        )
        with self._lock:
            self._grams_for = (private_texts, (copied, sensitive))
        return copied, sensitive

    def _window_start(self, length: int) -> int:
        if self._settings.mode != "window" or length <= self._settings.window_tokens:
            return 0
        stride = max(1, self._settings.window_tokens // 4)
        excess = length - self._settings.window_tokens
        return -(-excess // stride) * stride

    def _build(self, tokens: list[int], hidden: list[bool], start: int) -> _View:
        view: list[int] = []
        sources: list[int] = []
        for index in range(start, len(tokens)):
            if not hidden[index]:
                view.append(tokens[index])
                sources.append(index)
            elif index == start or not hidden[index - 1]:
                view += self._placeholder
                sources += [-1] * len(self._placeholder)
        return _View(view, sources)

    def _pattern_hits(self, view: _View, action: str) -> set[int]:
        """Local indices of the tokens under matches of the ``action`` patterns."""
        rendered = self._text(view.tokens)
        hits: set[int] = set()
        for pattern in self._patterns:
            if pattern.action != action:
                continue
            for match in pattern.regex.finditer(rendered.text):
                for char in range(match.start(), match.end()):
                    for token in rendered.tokens_under(char):
                        if view.sources[token] >= 0:
                            hits.add(view.sources[token])
        return hits

    def _text(self, tokens: Sequence[int]) -> _Text:
        """Decode tokens one by one so each character knows its token."""
        chunks = [self._piece(token) for token in tokens]
        data = b"".join(chunks)
        text = data.decode("utf-8", _SURROGATES)
        token_at_byte = [index for index, chunk in enumerate(chunks) for _ in chunk]
        if len(text) == len(data):
            return _Text(text, token_at_byte)
        token_at_char = []
        extra_tokens = {}
        offset = 0
        for index, char in enumerate(text):
            size = len(char.encode("utf-8", _SURROGATES))
            first, last = token_at_byte[offset], token_at_byte[offset + size - 1]
            token_at_char.append(first)
            if last != first:
                extra_tokens[index] = range(first, last + 1)
            offset += size
        return _Text(text, token_at_char, extra_tokens)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = bytes(self._tokenizer.detokenize([token]))
            self._pieces[token] = piece
        return piece


def _runs(mask: Sequence[bool], value: bool) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of ``value`` in ``mask``."""
    runs = []
    start = None
    for index, flag in enumerate([*mask, not value]):
        if flag == value and start is None:
            start = index
        elif flag != value and start is not None:
            runs.append((start, index))
            start = None
    return runs


def _exact_hits(text: str, grams: frozenset[str], size: int) -> set[int]:
    """Characters of ``text`` inside a ``size``-long substring that is in ``grams``."""
    hits: set[int] = set()
    for start in range(len(text) - size + 1):
        if text[start:start + size] in grams:
            hits.update(range(start, start + size))
    return hits


def _normalize(text: str) -> tuple[str, list[int]]:
    """Lower-case letters and digits only, with each kept character's index in ``text``."""
    kept = [(char.lower(), index) for index, char in enumerate(text) if char.isalnum()]
    return "".join(char for char, _ in kept), [index for _, index in kept]


def _normalized_hits(text: str, grams: frozenset[str], size: int) -> set[int]:
    """Like ``_exact_hits``, ignoring case, spaces and punctuation (``DE89 3704`` = ``de893704``)."""
    if not grams:
        return set()
    normalized, positions = _normalize(text)
    return {positions[index] for index in _exact_hits(normalized, grams, size)}
