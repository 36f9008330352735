"""CoDecoder: Co-LLM decoding with a local base, a switch head and a remote expert.

At each position the switch scores the base's final hidden state ``h_t``; above the threshold the
token comes from the expert, else from the base (docs/DESIGN.md, "Decoding"). The expert is asked for
up to ``lookahead`` tokens at once; the span is fed to the base in ONE batched decode, which
yields the hidden state after each expert token, and expert tokens are accepted for as long as
the switch still defers there. At the first position where it does not, the base's own token
(from the same batch) is used and the KV cache is rolled back. Every random draw uses the
uniform of its absolute position (``sample_from_logits``), so the output is token for token that
of one-token-per-call Co-LLM, with fewer round trips.

Egress: before each call the policy decides what the expert may see and the audit sink records
it; only the tokens the expert session does not hold yet are sent.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from client.egress import (
    AuditSink,
    EgressDecision,
    EgressOutcome,
    EgressPolicy,
    EgressRecord,
    EgressRequest,
    EgressSummary,
    SendEverything,
)
from client.errors import AuditError, ExpertDeniedError
from client.expert import Expert, ExpertReply, Gated, reply_problem
from client.prompting import Segment
from client.provenance import source_of
from client.settings import ClientSettings, DecodingSettings, SwitchSettings
from client.switch import SwitchScorer
from client.tokens import GeneratedToken, Provenance
from tandem_core.base_model import BaseModel, DecodeOutput
from tandem_core.batch_engine import RunAhead, RunsAhead
from tandem_core.errors import ContextOverflowError, ExpertError, ModelError, SessionLostError
from tandem_core.protocol import TokenLogprob, sample_from_logits
from tandem_core.settings import default_of
from tandem_core.tokens import common_prefix_length

logger = logging.getLogger(__name__)
FinishReason = Literal["stop", "length"]
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode; ``threshold=None`` uses the switch head's calibrated threshold.

    The defaults are those of ``DecodingSettings`` and ``SwitchSettings`` (one source each).
    """

    max_tokens: int = default_of(DecodingSettings, "max_tokens")
    temperature: float = default_of(DecodingSettings, "temperature")
    seed: int | None = None
    threshold: float | None = default_of(SwitchSettings, "threshold")
    warmup_tokens: int = default_of(SwitchSettings, "warmup_tokens")
    warmup_threshold: float = default_of(SwitchSettings, "warmup_threshold")
    lookahead: int = default_of(DecodingSettings, "lookahead")
    compose: bool = default_of(DecodingSettings, "compose")
    top_logprobs: int = default_of(DecodingSettings, "top_logprobs")
    stop: tuple[str, ...] = ()
    incremental: bool = True  # send only what the expert session lacks (False: whole prefix)

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> DecodingOptions:
        decoding, switch = settings.decoding, settings.switch
        return cls(max_tokens=decoding.max_tokens, temperature=decoding.temperature,
                   threshold=switch.threshold, warmup_tokens=switch.warmup_tokens,
                   warmup_threshold=switch.warmup_threshold, lookahead=decoding.lookahead,
                   compose=decoding.compose, top_logprobs=decoding.top_logprobs)


@dataclass(frozen=True)
class AnswerToken:
    """One token of an answer with the text it adds (whole UTF-8 characters only)."""

    token_id: int
    text: str
    provenance: Provenance
    deferral_probability: float


class StopCutter:
    """Turns token bytes into text and cuts the answer at the first stop sequence.

    Tokens are released only when no stop sequence could still begin inside their text, so a
    streamed answer never shows text that the final answer cuts off.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held: list[AnswerToken] = []
        self.tokens: list[AnswerToken] = []
        self.text = ""
        self.stopped = False
        self.generated = 0

    def push(self, generated: GeneratedToken) -> list[AnswerToken]:
        if self.stopped:
            return []
        self.generated += 1
        piece = self._decoder.decode(generated.text)
        self._held.append(AnswerToken(generated.token_id, piece, generated.provenance,
                                      generated.deferral_probability))
        return self._release(final=False)

    def flush(self) -> list[AnswerToken]:
        if not self.stopped:
            tail = self._decoder.decode(b"", final=True)
            if tail and self._held:
                last = self._held[-1]
                self._held[-1] = AnswerToken(last.token_id, last.text + tail, last.provenance,
                                             last.deferral_probability)
        return self._release(final=True)

    def _release(self, *, final: bool) -> list[AnswerToken]:
        pending = "".join(token.text for token in self._held)
        cut = self._first_stop(self.text, pending)
        if cut is not None:
            self.stopped = True
            return self._take(cut)
        keep = 0 if final else self._unsafe_suffix(self.text + pending)
        return self._take(len(pending) - keep)

    def _first_stop(self, released: str, pending: str) -> int | None:
        """Where, in ``pending``, the first stop sequence begins (it may start in released text)."""
        window = released[-max((len(stop) for stop in self.stops), default=0):] + pending
        offset = len(window) - len(pending)
        found = [window.find(stop) for stop in self.stops]
        starts = [position for position in found if position >= 0]
        return max(0, min(starts) - offset) if starts else None

    def _unsafe_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _take(self, characters: int) -> list[AnswerToken]:
        released: list[AnswerToken] = []
        while self._held and characters >= len(self._held[0].text):
            token = self._held.pop(0)
            characters -= len(token.text)
            released.append(token)
        if self.stopped and self._held and characters > 0:
            token = self._held[0]
            released.append(AnswerToken(token.token_id, token.text[:characters], token.provenance,
                                        token.deferral_probability))
        if self.stopped:
            self._held.clear()
        self.tokens += released
        self.text += "".join(token.text for token in released)
        return released


@dataclass(frozen=True)
class DecodeResult:
    request_id: str
    tokens: list[GeneratedToken]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    egress: EgressSummary

    @property
    def token_ids(self) -> list[int]:
        return [token.token_id for token in self.tokens]

    @property
    def provenance_counts(self) -> dict[str, int]:
        counts = {"base": 0, "expert": 0, "fallback": 0, "denied": 0}
        for token in self.tokens:
            counts[token.provenance] += 1
        return counts


@dataclass
class _Row:
    """Base outputs for the next position: logits [vocab], hidden state [d], and the logits'
    argmax when the base already took it."""

    logits: np.ndarray
    hidden: np.ndarray
    argmax: int | None = None

    @classmethod
    def last(cls, output: DecodeOutput) -> _Row:
        return cls(output.logits[-1], output.hidden[-1], output.last_argmax)


@dataclass
class _Answer:
    """Mutable state of one answer."""

    request_id: str
    session: str
    tokens: list[int]
    private_mask: list[bool]
    prompt_length: int
    max_new: int
    options: DecodingOptions
    generated: list[GeneratedToken] = field(default_factory=list)
    held_view: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    counters: dict[str, int] = field(default_factory=dict)
    private_sources: list[str] = field(default_factory=list)  # per token; "" when public
    last_error: str = ""
    cutter: StopCutter = field(init=False)

    def __post_init__(self) -> None:
        self.cutter = StopCutter(self.options.stop)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.generated)


class CoDecoder:
    """The Co-LLM decoding loop over one base model (one answer at a time)."""

    def __init__(self, *, base: BaseModel, switch: SwitchScorer, expert: Expert | None,
                 policy: EgressPolicy | None = None, audit: AuditSink | None = None,
                 options: DecodingOptions | None = None, seq: int = 0) -> None:
        self.base = base
        self.switch = switch
        self.expert = expert
        self.policy = policy or SendEverything()
        self.audit = audit
        self.options = options or DecodingOptions()
        self.seq = seq
        self.threshold = self._resolve_threshold()
        self._lock = threading.Lock()

    def _resolve_threshold(self) -> float:
        if self.options.threshold is not None:
            return self.options.threshold
        # A calibrated head (OnnxSwitch) carries its threshold; plain scorers get 0.5.
        return float(getattr(self.switch, "threshold", DEFAULT_THRESHOLD))

    # -- public API ------------------------------------------------------------------------

    def encode(self, prompt: Sequence[Segment] | Sequence[int]) -> tuple[list[int], list[bool]]:
        """Token ids and private mask of a prompt given as segments or as token ids."""
        tokens, mask, _ = self.encode_with_sources(prompt)
        return tokens, mask

    def encode_with_sources(self, prompt: Sequence[Segment] | Sequence[int]
                            ) -> tuple[list[int], list[bool], list[str]]:
        """Token ids, private mask and each private token's source (its segment's)."""
        if len(prompt) == 0:
            raise ModelError("the prompt is empty")
        if all(isinstance(part, Segment) for part in prompt):
            tokens: list[int] = list(self.base.tokenize("", add_bos=True))
            mask = [False] * len(tokens)
            sources = [""] * len(tokens)
            for segment in prompt:
                assert isinstance(segment, Segment)
                # Control tokens are parsed only in public text: a passage cannot forge them.
                ids = self.base.tokenize(segment.text, special=not segment.private)
                tokens += ids
                mask += [segment.private] * len(ids)
                sources += [source_of(segment) if segment.private else ""] * len(ids)
            return tokens, mask, sources
        ids = [int(token) for token in prompt]  # type: ignore[arg-type]
        return ids, [False] * len(ids), [""] * len(ids)

    def prompt_length(self, prompt: Sequence[Segment] | Sequence[int]) -> int:
        return len(self.encode(prompt)[0])

    def generate(self, prompt: Sequence[Segment] | Sequence[int], *,
                 on_token: Callable[[GeneratedToken], None] | None = None,
                 request_id: str | None = None, **overrides: Any) -> DecodeResult:
        """Decode an answer; ``overrides`` replace fields of the decoder's options."""
        stream = self.stream(prompt, request_id=request_id, **overrides)
        while True:
            try:
                token = next(stream)
            except StopIteration as done:
                result: DecodeResult = done.value
                return result
            if on_token is not None:
                on_token(token)

    def stream(self, prompt: Sequence[Segment] | Sequence[int], *, request_id: str | None = None,
               **overrides: Any) -> Generator[GeneratedToken, None, DecodeResult]:
        """Yield tokens as they are accepted; the generator's return value is the result."""
        options = replace(self.options, **{key: value for key, value in overrides.items()
                                           if value is not None})
        if options.temperature > 0 and options.seed is None and isinstance(self.base, RunsAhead):
            # An unseeded answer draws a seed of its own: its tokens are as random as before,
            # and the batching engine can repeat its draws (positional uniforms) to run ahead.
            options = replace(options, seed=secrets.randbits(31))
        tokens, mask, sources = self.encode_with_sources(prompt)
        if not tokens:
            raise ModelError("the prompt has no tokens")
        if len(tokens) >= self.base.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(tokens)} tokens; the context "
                                       f"window holds {self.base.n_ctx}")
        answer = _Answer(request_id or f"req-{uuid.uuid4().hex[:24]}",
                         f"tandem-{uuid.uuid4().hex}", tokens, mask, len(tokens),
                         min(options.max_tokens, self.base.n_ctx - len(tokens)), options,
                         private_sources=sources)
        return self._locked_run(answer)

    def _locked_run(self, answer: _Answer) -> Generator[GeneratedToken, None, DecodeResult]:
        with self._lock:
            return (yield from self._run(answer))

    # -- the loop ----------------------------------------------------------------------------

    def _run(self, answer: _Answer) -> Generator[GeneratedToken, None, DecodeResult]:
        with self._running_ahead(answer):
            row: _Row | None = self._prefill(answer.tokens)
            while answer.finish is None:
                if row is None:
                    row = self._decode_tail(answer)
                score = float(self._score(row.hidden[None, :])[0])
                before = len(answer.generated)
                if score > self._threshold_for(answer):
                    row = self._defer(answer, row, score)
                else:
                    self._accept(answer, self._sample_row(row, answer), "base", score)
                    row = None
                yield from answer.generated[before:]
            if self.base.position(self.seq) > len(answer.tokens):
                self.base.rollback(len(answer.tokens), seq=self.seq)
        return self._result(answer)

    def _running_ahead(self, answer: _Answer) -> contextlib.AbstractContextManager[None]:
        """On a batching engine's sequence: let the engine feed the base tokens this loop takes.

        The rule given is the loop's own (``_sample`` unless the score is above
        ``_threshold_for``), so the engine's guess is the token this loop then decodes; a wrong
        guess only costs the rows decoded ahead.
        """
        if not isinstance(self.base, RunsAhead):
            return contextlib.nullcontext()
        options = answer.options
        return self.base.running_ahead(RunAhead(
            feed_until=answer.prompt_length + answer.max_new - 1,
            temperature=options.temperature, seed=options.seed, threshold=self.threshold,
            warmup_until=answer.prompt_length + options.warmup_tokens,
            warmup_threshold=options.warmup_threshold))

    def _prefill(self, prompt: list[int]) -> _Row:
        shared = common_prefix_length(self.base.cached_tokens(self.seq), prompt)
        shared = min(shared, len(prompt) - 1)  # decode at least one token to get its outputs
        self.base.rollback(shared, seq=self.seq)
        output = self.base.decode(prompt[shared:], seq=self.seq, last_only=True)
        return _Row.last(output)

    def _decode_tail(self, answer: _Answer) -> _Row:
        missing = answer.tokens[self.base.position(self.seq):]
        output = self.base.decode(missing, seq=self.seq, last_only=True)
        return _Row.last(output)

    def _score(self, hidden: np.ndarray) -> np.ndarray:
        return np.asarray(self.switch.score(hidden), dtype=np.float64)

    def _threshold_for(self, answer: _Answer) -> float:
        if len(answer.generated) < answer.options.warmup_tokens:
            return answer.options.warmup_threshold
        return self.threshold

    def _sample_row(self, row: _Row, answer: _Answer) -> int:
        if row.argmax is not None and answer.options.temperature <= 0:
            return row.argmax  # greedy: the base's own argmax of these logits
        return self._sample(row.logits, answer)

    def _sample(self, logits: np.ndarray, answer: _Answer) -> int:
        return sample_from_logits(logits, temperature=answer.options.temperature,
                                  seed=answer.options.seed, position=len(answer.tokens))

    def _accept(self, answer: _Answer, token: int, provenance: Provenance, score: float) -> None:
        answer.tokens.append(token)
        answer.private_mask.append(False)
        answer.private_sources.append("")
        generated = GeneratedToken(token, self.base.token_bytes(token), provenance, score)
        answer.generated.append(generated)
        answer.cutter.push(generated)
        if self.base.is_end_of_generation(token) or answer.cutter.stopped:
            answer.finish = "stop"
        elif answer.remaining <= 0:  # max_tokens, or the end of the context window
            answer.finish = "length"

    def _result(self, answer: _Answer) -> DecodeResult:
        answer.cutter.flush()
        counters = answer.counters
        summary = EgressSummary(calls=counters.get("calls", 0),
                                tokens_sent=counters.get("tokens_sent", 0),
                                tokens_received=counters.get("tokens_received", 0),
                                denials=counters.get("denials", 0),
                                failures=counters.get("failures", 0),
                                deferred_positions=counters.get("deferred", 0),
                                delivered=counters.get("delivered", 0),
                                tokens_delivered=counters.get("tokens_delivered", 0),
                                answered=counters.get("answered", 0),
                                denial_reasons=tuple(sorted(
                                    name[7:] for name in counters if name.startswith("denied:"))),
                                last_error=answer.last_error)
        assert answer.finish is not None
        return DecodeResult(answer.request_id, answer.generated, answer.cutter.text,
                            answer.finish, answer.prompt_length, summary)

    # -- deferral ----------------------------------------------------------------------------

    def _defer(self, answer: _Answer, row: _Row, score: float) -> _Row | None:
        """Handle a deferred position; return the next row when the base already computed it."""
        answer.count("deferred")
        if self.expert is None or (isinstance(self.expert, Gated) and not self.expert.ready()):
            self._accept(answer, self._sample_row(row, answer), "fallback", score)
            return None
        span = min(answer.options.lookahead, answer.remaining)
        outcome = self._call_expert(answer, span)
        if isinstance(outcome, str):
            self._accept(answer, self._sample_row(row, answer), outcome, score)
            return None
        reply, egress_id, started = outcome
        accepted, next_row = self._verify_span(answer, row, score, reply)
        self._record_outcome(egress_id, EgressOutcome(
            received_tokens=list(reply.tokens), accepted_tokens=accepted,
            latency_s=time.monotonic() - started))
        return next_row

    def _verify_span(self, answer: _Answer, row: _Row, score: float,
                     reply: ExpertReply) -> tuple[int, _Row | None]:
        """Accept expert tokens while the switch defers; return (accepted, next row or None)."""
        span = list(reply.tokens)
        start = len(answer.tokens)
        token = self._deferred_token(answer, row.logits, score, reply, 0)
        self._accept(answer, token, "expert", score)
        if token != span[0] or answer.finish is not None or len(span) == 1:
            return int(token == span[0]), None
        output = self.base.decode(span, seq=self.seq)
        scores = self._score(output.hidden[:-1])
        for index in range(1, len(span)):
            logits, position_score = output.logits[index - 1], float(scores[index - 1])
            if position_score > self._threshold_for(answer):
                answer.count("deferred")
                token = self._deferred_token(answer, logits, position_score, reply, index)
                self._accept(answer, token, "expert", position_score)
                if token != span[index]:
                    self.base.rollback(start + index, seq=self.seq)
                    return index, None
            else:
                self._accept(answer, self._sample(logits, answer), "base", position_score)
                self.base.rollback(start + index, seq=self.seq)
                return index, None
            if answer.finish is not None:
                return index + 1, None
        return len(span), _Row(output.logits[-1], output.hidden[-1])

    def _deferred_token(self, answer: _Answer, base_logits: np.ndarray, score: float,
                        reply: ExpertReply, index: int) -> int:
        """The token at a deferred position: the expert's, or the composed mixture's."""
        expert_token = int(reply.tokens[index])
        if not answer.options.compose:
            return expert_token
        top = reply.logprobs[index] if reply.logprobs and index < len(reply.logprobs) else None
        mixture = compose_distribution(base_logits, score, expert_token, top)
        return sample_from_logits(np.log(np.maximum(mixture, 1e-300)),
                                  temperature=answer.options.temperature,
                                  seed=answer.options.seed, position=len(answer.tokens))

    # -- egress --------------------------------------------------------------------------------

    def _call_expert(self, answer: _Answer, span: int
                     ) -> tuple[ExpertReply, str | None, float] | Provenance:
        """One expert call through policy and audit; a provenance string when it did not work."""
        assert self.expert is not None
        for attempt in range(2):
            if not answer.options.incremental:
                answer.held_view = []
            decision, egress_id = self._authorize(answer)
            if not decision.allowed:
                answer.count("denials")
                answer.count(f"denied:{decision.reason}")
                return "denied"
            started = time.monotonic()
            new_tokens = list(decision.new_tokens)
            answer.count("calls")
            answer.count("tokens_sent", len(new_tokens))

            def before_retry(_: int, error: ExpertError, sent: list[int] = new_tokens) -> None:
                # A retry is another request on the wire: its own audit record and cap count.
                nonlocal egress_id, started
                self._record_failure(egress_id, error, started, answer, len(sent))
                retry, egress_id = self._authorize(answer)
                if not retry.allowed or list(retry.new_tokens) != sent:
                    raise ExpertDeniedError(retry.reason if not retry.allowed else "view changed")
                started = time.monotonic()
                answer.count("calls")
                answer.count("tokens_sent", len(sent))

            try:
                reply = self.expert.continue_(
                    session=answer.session, held=decision.send_from, tokens=new_tokens,
                    max_tokens=span, temperature=answer.options.temperature,
                    seed=answer.options.seed,
                    top_logprobs=answer.options.top_logprobs if answer.options.compose else 0,
                    before_retry=before_retry)
                self._check_reply(reply, span)
            except ExpertDeniedError as exc:
                answer.count("denials")
                answer.count(f"denied:{exc.reason}")
                return "denied"
            except SessionLostError as exc:
                self._record_failure(egress_id, exc, started, answer, len(new_tokens))
                answer.held_view = []  # resend the whole allowed prefix, once
                if attempt == 0:
                    continue
                answer.count("failures")
                return "fallback"
            except ExpertError as exc:
                self._record_failure(egress_id, exc, started, answer, len(new_tokens))
                answer.count("failures")
                return "fallback"
            answer.count("delivered")
            answer.count("answered")
            answer.count("tokens_delivered", len(new_tokens))
            answer.count("tokens_received", len(reply.tokens))
            answer.held_view = (list(decision.remote_view) + list(reply.tokens))[:reply.held]
            return reply, egress_id, started
        return "fallback"

    def _check_reply(self, reply: ExpertReply, span: int) -> None:
        if not reply.tokens or len(reply.tokens) > span:
            raise ExpertError(f"expert returned {len(reply.tokens)} tokens for a span of {span}")
        outside = [token for token in reply.tokens if not 0 <= token < self.base.vocab_size]
        if outside:
            raise ExpertError(f"expert returned token {outside[0]} outside the base vocabulary")
        problem = reply_problem(reply, self.base.vocab_size)  # top-logprob ids and values
        if problem is not None:
            raise ExpertError(problem)

    def _authorize(self, answer: _Answer) -> tuple[EgressDecision, str | None]:
        request = EgressRequest(answer.request_id, answer.session, list(answer.tokens),
                                list(answer.private_mask), list(answer.held_view),
                                list(answer.private_sources))
        try:
            return authorize_egress(
                self.policy, self.audit, request,
                destination=self.expert.destination if self.expert else "",
                model=self.expert.model if self.expert else "",
                detokenize=lambda ids: self.base.detokenize(ids).decode("utf-8", errors="replace"))
        except AuditError as exc:  # fail closed: no durable record, no request
            logger.error("expert call not sent: %s", exc)
            return EgressDecision(False, "audit_unavailable"), None

    def _record_failure(self, egress_id: str | None, exc: ExpertError, started: float,
                        answer: _Answer, tokens: int) -> None:
        if exc.delivered:
            answer.count("delivered")
            answer.count("tokens_delivered", tokens)
        if exc.answered:
            answer.count("answered")
        answer.last_error = f"{type(exc).__name__}: {exc}"
        self._record_outcome(egress_id, EgressOutcome(
            latency_s=time.monotonic() - started, error=answer.last_error,
            delivered=exc.delivered, answered=exc.answered))

    def _record_outcome(self, egress_id: str | None, outcome: EgressOutcome) -> None:
        if self.audit is not None and egress_id is not None:
            try:
                self.audit.record_outcome(egress_id, outcome)
            except AuditError as exc:  # the call already happened; its egress record stands
                logger.error("outcome of expert call %s not recorded: %s", egress_id, exc)


def authorize_egress(policy: EgressPolicy, audit: AuditSink | None, request: EgressRequest, *,
                     destination: str, model: str, detokenize: Callable[[list[int]], str]
                     ) -> tuple[EgressDecision, str | None]:
    """The policy's decision for ``request``, recorded by the audit before anything is sent.

    Returns the decision and the audit record's id. Raises ``AuditError`` when the record cannot
    be written; the caller must then send nothing (the decoder falls back to the base, collection
    stops). The decoder and ``export.collect`` both ask the expert through this one gate.
    """
    decision = policy.decide(request)
    if audit is None:
        return decision, None
    sent = list(decision.new_tokens) if decision.allowed else []
    record = EgressRecord(
        request_id=request.request_id, session=request.session, destination=destination,
        model=model, decision=decision, sent_tokens=sent, sent_text=detokenize(sent) if sent else "",
        held=decision.send_from if decision.allowed else 0)
    return decision, audit.record_egress(record)


def compose_distribution(base_logits: np.ndarray, score: float, expert_token: int,
                         top: TokenLogprob | None) -> np.ndarray:
    """``(1 - s) P_base + s P_expert``, P_expert from the expert's top log-probs (renormalised).

    Without log-probs the expert distribution is a point mass on the expert's token.
    """
    logits = np.asarray(base_logits, dtype=np.float64)
    base = np.exp(logits - logits.max())
    base /= base.sum()
    expert = np.zeros_like(base)
    if top is not None and top.top:
        ids = np.array([token for token, _ in top.top], dtype=np.int64)
        logprobs = np.array([logprob for _, logprob in top.top], dtype=np.float64)
        weights = np.exp(logprobs - logprobs.max())  # shifted: no overflow, never all zero
        expert[ids] += weights / weights.sum()
    else:
        expert[expert_token] = 1.0
    return (1.0 - score) * base + score * expert

