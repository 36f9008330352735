"""The egress policy: what part of a sequence the expert may see, how often, and why not.

``Policy.decide`` turns the local tokens and their private mask into the remote view:

1. Hidden tokens, each with the rule that hid it (the audit record counts them per rule):
   private spans (unless mode is ``full``), by where they came from: ``passage`` (a retrieved
   document passage), ``assistant_turn`` (an earlier answer the client sent back) and ``repeat``
   (the user's own text repeating a stored document); the last two may be opened by the policy
   (``assistant_turns``/``document_repeats`` = "public"). ``copy``: public text that repeats
   ``taint_min_chars`` characters of a private span, widened to whole words. ``sensitive``:
   public text that repeats ``sensitive_min_chars`` letters or digits of a deny-pattern match
   inside a private span, which stops an IBAN being copied digit by digit.
   ``derived``: a public value (a number, date, ID or name, see ``values.py``) that equals a
   value of a private span, or that the sequence ends with and that begins one (a value still
   being written). ``derived`` = deny refuses the call, redact hides the tokens, send lets them
   go and marks them in the audit record.
2. In ``window`` mode only the last ``window_tokens`` local tokens count; the window start moves
   in steps of a quarter window so the gateway can reuse its cache between steps.
3. Each run of hidden tokens becomes the placeholder's tokens; a derived value that is still
   in the view under ``derived = "deny"`` denies the call (reason ``derived``).
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
from typing import Any, Literal, Protocol

from client.egress import EgressDecision, EgressRequest
from client.errors import PolicyError
from client.settings import PolicySettings
from client.usage import Caps, UsageStore
from client.values import PrivateValues, find_values, word_spans
from tandem_core.tokens import common_prefix_length

_SURROGATES = "surrogateescape"


class Tokenizer(Protocol):
    """The two tokenizer calls the policy needs (``tandem_core.base_model.LlamaModel`` has both)."""

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


@dataclass
class _Marks:
    """Per local token: the rule that hides it ('' when visible) and the private source it
    repeats or came from; plus the derived values found in public text."""

    rule: list[str]
    source: list[str]
    derived: dict[int, tuple[str, str]] = field(default_factory=dict)  # token -> (value, source)
    opened: dict[str, int] = field(default_factory=dict)  # rule -> tokens the policy let go


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
        self._grams_for: tuple[tuple[tuple[str, ...], tuple[str, ...]],
                               tuple[frozenset[str], frozenset[str], PrivateValues]] | None = None

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
        tokens = [int(token) for token in request.local_tokens]
        sources = list(request.private_sources) or [""] * len(tokens)
        if len(sources) != len(tokens):
            raise PolicyError(f"private sources has {len(sources)} entries for "
                              f"{len(request.local_tokens)} tokens")
        view_or_skip, marks = self._remote_view(tokens, request.private_mask, sources)
        if isinstance(view_or_skip, str):
            reason = "derived" if view_or_skip == _DERIVED else f"pattern:{view_or_skip}"
            return EgressDecision(False, reason, privacy=self._privacy(marks, tokens, None, 0))
        view = view_or_skip.tokens
        send_from = common_prefix_length(view, request.held_view)
        privacy = self._privacy(marks, tokens, view_or_skip, send_from)
        new_tokens = len(view) - send_from
        dry_run = self._settings.dry_run
        if dry_run:
            exceeded = self._usage.would_exceed(request.request_id, new_tokens, self._caps)
        else:
            exceeded = self._usage.try_consume(request.request_id, new_tokens, self._caps)
        if exceeded is not None:
            return EgressDecision(False, f"cap:{exceeded}", dry_run=dry_run, privacy=privacy)
        if dry_run:
            return EgressDecision(False, "dry_run", view, send_from, dry_run=True, privacy=privacy)
        return EgressDecision(True, "ok", view, send_from, privacy=privacy)

    def remote_view(self, local_tokens: Sequence[int], private_mask: Sequence[bool],
                    private_sources: Sequence[str] = ()) -> list[int]:
        """The view the expert may see, or PolicyError when a skip pattern forbids any."""
        sources = list(private_sources) or [""] * len(local_tokens)
        view, _ = self._remote_view(local_tokens, private_mask, sources)
        if isinstance(view, str):
            raise PolicyError("derived" if view == _DERIVED else f"pattern:{view}")
        return view.tokens

    def _redacted(self, marks: _Marks, tokens: list[int]) -> list[dict[str, str]]:
        """The user's and the answer's own words that were hidden, whole, with rule and source.

        Passages and earlier answers are named only by source: their text stays out of the log.
        """
        shown: list[dict[str, str]] = []
        index = 0
        while index < len(tokens) and len(shown) < _MAX_REDACTED:
            rule = marks.rule[index]
            if rule not in _WORD_RULES:
                index += 1
                continue
            end = index
            while end < len(tokens) and marks.rule[end] == rule:
                end += 1
            text = self._text(tokens[index:end]).text.strip()
            if text:
                shown.append({"text": text[:_MAX_REDACTED_CHARS], "rule": rule,
                              "source": _name(marks.source[index]) if marks.source[index] else ""})
            index = end
        return shown

    def _privacy(self, marks: _Marks, tokens: list[int], view: _View | None,
                 send_from: int) -> dict[str, Any]:
        """The audit record's account: tokens hidden per rule, rules opened, derived tokens sent.

        ``derived_sent`` lists the values whose tokens are in this call's new tokens, with the
        indices of those tokens in ``sent_tokens``; the user's own words that were redacted are
        listed with their text, private passages and turns only by rule and source.
        """
        settings = self._settings
        hidden: dict[str, int] = {}
        for rule in marks.rule:
            if rule:
                hidden[rule] = hidden.get(rule, 0) + 1
        record: dict[str, Any] = {
            "rules": {"assistant_turns": settings.assistant_turns,
                      "document_repeats": settings.document_repeats, "derived": settings.derived},
            "hidden_tokens": hidden,
            "private_sources": sorted({_name(source) for rule, source
                                       in zip(marks.rule, marks.source, strict=True)
                                       if rule in _PROMPT_RULES and source}),
        }
        if marks.opened:
            record["opened_tokens"] = dict(marks.opened)
        redacted = self._redacted(marks, tokens)
        if redacted:
            record["redacted"] = redacted
        if view is None:
            record["derived_values"] = _values_of(
                marks.derived, [index for index in marks.derived if not marks.rule[index]])
            return record
        sent_sources = view.sources[send_from:]
        derived_sent = [index for index, local in enumerate(sent_sources) if local in marks.derived]
        if derived_sent:
            record["derived_sent_tokens"] = derived_sent
            record["derived_sent"] = _values_of(
                marks.derived, [sent_sources[index] for index in derived_sent])
        return record

    # --- the view ------------------------------------------------------------------------

    def _remote_view(self, local_tokens: Sequence[int], private_mask: Sequence[bool],
                     private_sources: Sequence[str]) -> tuple[_View | str, _Marks]:
        tokens = [int(token) for token in local_tokens]
        marks = self._marks(tokens, [bool(flag) for flag in private_mask], list(private_sources))
        start = self._window_start(len(tokens))
        derived_in_view = [index for index in marks.derived
                           if index >= start and not marks.rule[index]]
        if derived_in_view and self._settings.mode != "full":  # full sends the passages anyway
            if self._settings.derived == "deny":
                return _DERIVED, marks
            if self._settings.derived == "redact":
                for index in derived_in_view:
                    marks.rule[index] = "derived"
        hidden = [bool(rule) for rule in marks.rule]
        view = self._build(tokens, hidden, start)
        redacted = self._pattern_hits(view, "redact")
        if redacted:
            for index in redacted:
                marks.rule[index] = marks.rule[index] or "pattern"
                hidden[index] = True
            view = self._build(tokens, hidden, start)
        text = self._text(view.tokens).text
        for pattern in self._patterns:
            if pattern.action == "skip" and pattern.regex.search(text):
                return pattern.name, marks
        return view, marks

    def _marks(self, tokens: list[int], private: list[bool], sources: list[str]) -> _Marks:
        """Which tokens are hidden and why; which public tokens carry a private value."""
        settings = self._settings
        marks = _Marks(rule=[""] * len(tokens), source=[""] * len(tokens))
        for index, is_private in enumerate(private):
            if not is_private:
                continue
            rule = _rule_of(sources[index])
            if (rule == "assistant_turn" and settings.assistant_turns == "public") or \
                    (rule == "repeat" and settings.document_repeats == "public"):
                private[index] = False  # opened by the policy: public text from here on
                marks.opened[rule] = marks.opened.get(rule, 0) + 1
                continue
            marks.source[index] = sources[index]
            if settings.mode != "full":
                marks.rule[index] = rule
        private_runs = _runs(private, True)
        if not private_runs:
            return marks
        private_texts = tuple(self._text(tokens[start:end]).text for start, end in private_runs)
        run_sources = [sources[start] for start, _ in private_runs]
        copied_grams, sensitive_grams, values = self._grams(private_texts, tuple(run_sources))
        last_run = _runs(private, False)[-1:] if not private[-1] else []
        for start, end in _runs(private, False):
            run = self._text(tokens[start:end])
            self._mark_copies(marks, run, start, copied_grams, sensitive_grams)
            at_end = (start, end) in last_run
            for value in find_values(run.text, values, min_chars=settings.value_min_chars,
                                     open_end=at_end):
                for char in range(value.start, value.end):
                    for token in run.tokens_under(char):
                        marks.derived.setdefault(start + token, (value.text, value.source))
        return marks

    def _mark_copies(self, marks: _Marks, run: _Text, offset: int,
                     copied: frozenset[str], sensitive: frozenset[str]) -> None:
        """Hide public text repeating private text: whole words, whole tokens."""
        copies = set()
        if self._settings.mode != "full":
            copies = _widen_to_words(run.text, _exact_hits(_lower(run.text), copied,
                                                          self._settings.taint_min_chars))
        pieces = _normalized_hits(run.text, sensitive, self._settings.sensitive_min_chars)
        for chars, rule in ((copies, "copy"), (pieces, "sensitive")):
            for char in chars:
                for token in run.tokens_under(char):
                    marks.rule[offset + token] = marks.rule[offset + token] or rule

    def _grams(self, private_texts: tuple[str, ...], sources: tuple[str, ...]
               ) -> tuple[frozenset[str], frozenset[str], PrivateValues]:
        """Substrings and values of private text that public text may not repeat (cached)."""
        key = (private_texts, sources)
        with self._lock:
            if self._grams_for is not None and self._grams_for[0] == key:
                return self._grams_for[1]
        copy_size = self._settings.taint_min_chars
        sensitive_size = self._settings.sensitive_min_chars
        copied = frozenset(
            _lower(text)[i:i + copy_size]
            for text in private_texts for i in range(len(text) - copy_size + 1)
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
        values = PrivateValues.of(
            [(text, _name(source)) for text, source in zip(private_texts, sources, strict=True)],
            min_chars=self._settings.value_min_chars)
        with self._lock:
            self._grams_for = (key, (copied, sensitive, values))
        return copied, sensitive, values

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


_DERIVED = "\x00derived"  # _remote_view's answer when a derived value denies the call
_PROMPT_RULES = frozenset({"passage", "assistant_turn", "repeat", "private"})
_WORD_RULES = frozenset({"repeat", "copy", "sensitive", "derived", "pattern"})  # shown as text
_MAX_REDACTED = 32
_MAX_REDACTED_CHARS = 200


def _rule_of(source: str) -> str:
    """The rule a private prompt token falls under, from its segment's source label."""
    kind = source.split(":", 1)[0]
    return {"passage": "passage", "assistant-turn": "assistant_turn",
            "repeat": "repeat"}.get(kind, "private")


def _name(source: str) -> str:
    """The display name in a source label: ``passage:invoice-4417.txt`` -> ``invoice-4417.txt``."""
    if source == "assistant-turn":
        return "earlier answers"
    return source.split(":", 1)[1] if ":" in source else (source or "private text")


def _values_of(derived: dict[int, tuple[str, str]], indices: Sequence[int] | dict[int, Any]
               ) -> list[dict[str, str]]:
    """Distinct (value, source) pairs of the derived tokens at ``indices``, in order."""
    seen: dict[tuple[str, str], None] = {}
    for index in indices:
        seen.setdefault(derived[index], None)
    return [{"value": value, "source": source} for value, source in seen]


def _lower(text: str) -> str:
    """Lower case, character for character (a character whose lower case is longer stays)."""
    return "".join(char.lower() if len(char.lower()) == 1 else char for char in text)


def _widen_to_words(text: str, chars: set[int]) -> set[int]:
    """``chars`` widened to the whole words they touch, without the spaces at either end.

    No word is cut in two (``invoice 4417`` never becomes ``i[private]in``) and the user's own
    spacing around the placeholder stays.
    """
    if not chars:
        return chars
    widened = set(chars)
    for start, end in word_spans(text):
        if any(char in chars for char in range(start, end)):
            widened.update(range(start, end))
    trimmed: set[int] = set()
    for start, end in _runs([index in widened for index in range(len(text))], True):
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        trimmed.update(range(start, end))
    return trimmed


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
