"""The private document assistant: retrieve passages, build a prompt with private spans, decode.

Retrieved passages enter the prompt as private segments, so the egress policy can keep them on
the machine; the toy pair reads the plain format it was trained on, chat models their GGUF chat
template. The decoder is a seam (``TokenSource``): ``build_runtime`` wires the real CoDecoder for
the daemon and ``tandem ask``; tests pass fakes.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import SecretStr

from client.documents import DocumentStore, Passage
from client.egress import EgressSummary
from client.errors import ConfigError
from client.prompting import Segment, plain_prompt
from client.settings import ClientSettings, PolicySettings
from client.tokens import GeneratedToken, Provenance

Role = Literal["system", "user", "assistant", "developer", "tool"]


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    content: str


@dataclass(frozen=True)
class Question:
    """What to answer: a conversation (chat) or a raw prompt (completion), and how."""

    messages: Sequence[ChatTurn] = ()
    prompt: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    retrieve: bool = True

    @property
    def query(self) -> str:
        """The text retrieval searches for: the last user turn, or the raw prompt."""
        if self.prompt is not None:
            return self.prompt
        users = [turn.content for turn in self.messages if turn.role == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True)
class AnswerToken:
    """One token of an answer with the text it adds (whole UTF-8 characters only)."""

    token_id: int
    text: str
    provenance: Provenance
    deferral_probability: float


@dataclass
class Answer:
    request_id: str
    text: str
    tokens: list[AnswerToken]
    passages: list[Passage]
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    egress: EgressSummary = field(default_factory=EgressSummary)

    @property
    def provenance_counts(self) -> dict[str, int]:
        counts = {"base": 0, "expert": 0, "fallback": 0, "denied": 0}
        for token in self.tokens:
            counts[token.provenance] += 1
        return counts


class TokenSource(Protocol):
    """The decoder as the assistant needs it: prompt segments in, tokens with provenance out."""

    def prompt_length(self, segments: Sequence[Segment]) -> int:
        """How many tokens the prompt takes."""
        ...

    def generate(self, segments: Sequence[Segment], *, request_id: str, max_tokens: int,
                 temperature: float, seed: int | None) -> Iterator[GeneratedToken]:
        """Decode after the prompt until end of generation or ``max_tokens``."""
        ...


class EgressLedger(Protocol):
    """Reads what left the machine for one request (the audit log)."""

    def summary(self, request_id: str) -> EgressSummary:
        ...


class PromptBuilder(Protocol):
    def __call__(self, question: Question, passages: Sequence[str]) -> list[Segment]:
        ...


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Assistant:
    """Answers questions over the local documents with a collaborative decoder."""

    def __init__(self, *, decoder: TokenSource, documents: DocumentStore | None,
                 prompt_builder: PromptBuilder, ledger: EgressLedger | None = None,
                 retrieve_passages: int = 1) -> None:
        self.decoder = decoder
        self.documents = documents
        self.prompt_builder = prompt_builder
        self.ledger = ledger
        self.retrieve_passages = retrieve_passages

    def retrieve(self, question: Question) -> list[Passage]:
        if not question.retrieve or self.documents is None or self.retrieve_passages == 0:
            return []
        return self.documents.search(question.query, self.retrieve_passages)

    def segments(self, question: Question, passages: Sequence[Passage]) -> list[Segment]:
        return self.prompt_builder(question, [passage.text for passage in passages])

    def answer(self, question: Question, *, request_id: str | None = None,
               on_token: Callable[[AnswerToken], None] | None = None,
               cancelled: threading.Event | None = None) -> Answer:
        """Decode an answer; ``on_token`` sees each token once it can no longer be cut by a stop."""
        request_id = request_id or new_request_id()
        passages = self.retrieve(question)
        segments = self.segments(question, passages)
        prompt_tokens = self.decoder.prompt_length(segments)
        stream = self.decoder.generate(
            segments, request_id=request_id, max_tokens=question.max_tokens,
            temperature=question.temperature, seed=question.seed,
        )
        cutter = StopCutter(question.stop)
        finish: Literal["stop", "length", "cancelled"] = "stop"
        for generated in stream:
            for token in cutter.push(generated):
                if on_token is not None:
                    on_token(token)
            if cutter.stopped:
                break
            if cancelled is not None and cancelled.is_set():
                finish = "cancelled"
                break
        else:
            finish = "length" if cutter.generated >= question.max_tokens else "stop"
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # a generator stopped early releases the decoder's state now
        for token in cutter.flush():
            if on_token is not None:
                on_token(token)
        if cutter.stopped:
            finish = "stop"
        egress = self.ledger.summary(request_id) if self.ledger is not None else EgressSummary()
        return Answer(request_id, cutter.text, cutter.tokens, passages, finish, prompt_tokens,
                      egress)


class StopCutter:
    """Turns token bytes into text and cuts the answer at the first stop sequence.

    Tokens are released only when no stop sequence could still begin inside their text, so a
    streamed answer never shows text that the final answer cuts off.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        import codecs

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


def plain_prompt_builder(question: Question, passages: Sequence[str]) -> list[Segment]:
    """The toy format: passages, then the question (a raw prompt is used as it is)."""
    if question.prompt is not None:
        return [*_document_segments(passages), Segment(question.prompt)]
    return plain_prompt(passages, question.query)


def _document_segments(passages: Sequence[str]) -> list[Segment]:
    segments: list[Segment] = []
    for passage in passages:
        segments += [Segment("Document: "), Segment(passage, private=True), Segment("\n")]
    return segments


_PASSAGE_MARK = "\x1etandem-private-passage-{index}\x1e"


class ChatTemplatePrompt:
    """Renders a GGUF chat template; passages become separate private segments.

    The passages go into the last user turn as marker strings, the template is rendered once,
    and the rendered text is split at the markers, so the template's own control text stays
    public and each passage is exactly one private segment.
    """

    def __init__(self, template: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = environment.from_string(template)
        self._bos_token = bos_token
        self._eos_token = eos_token

    def __call__(self, question: Question, passages: Sequence[str]) -> list[Segment]:
        if question.prompt is not None:
            return [*_document_segments(passages), Segment(question.prompt)]
        messages = [{"role": turn.role, "content": turn.content} for turn in question.messages]
        marks = [_PASSAGE_MARK.format(index=index) for index in range(len(passages))]
        if marks:
            last_user = max(i for i, turn in enumerate(messages) if turn["role"] == "user")
            documents = "".join(f"Document: {mark}\n" for mark in marks)
            messages[last_user]["content"] = f"{documents}\n{messages[last_user]['content']}"
        rendered = self._template.render(
            messages=messages, add_generation_prompt=True,
            bos_token=self._bos_token, eos_token=self._eos_token,
        )
        return _split_marks(rendered, marks, passages)


def _split_marks(rendered: str, marks: Sequence[str], passages: Sequence[str]) -> list[Segment]:
    segments: list[Segment] = []
    rest = rendered
    for mark, passage in zip(marks, passages, strict=True):
        before, found, rest = rest.partition(mark)
        if not found:
            raise ConfigError("the base model's chat template dropped a document passage")
        if before:
            segments.append(Segment(before))
        segments.append(Segment(passage, private=True))
    if rest:
        segments.append(Segment(rest))
    return segments


# -- wiring the real parts ------------------------------------------------------------------------

class CoDecoderSource:
    """Adapts ``client.decoding.CoDecoder`` to ``TokenSource`` and remembers each egress summary.

    Control tokens (EOS, ``<|im_end|>``) carry no text and are not part of the answer.
    """

    def __init__(self, decoder: Any, *, audit_path: Path | None = None,
                 pool: Any | None = None) -> None:
        self.decoder = decoder
        self.audit_path = audit_path
        self.pool = pool  # client.serving.DecoderPool: one decoder per concurrent answer
        self._summaries: dict[str, EgressSummary] = {}
        self._lock = threading.Lock()

    def prompt_length(self, segments: Sequence[Segment]) -> int:
        return int(self.decoder.prompt_length(segments))

    def generate(self, segments: Sequence[Segment], *, request_id: str, max_tokens: int,
                 temperature: float, seed: int | None) -> Iterator[GeneratedToken]:
        lease = self.pool.checkout() if self.pool is not None else contextlib.nullcontext(self.decoder)
        with lease as decoder:
            yield from self._generate(decoder, segments, request_id=request_id,
                                      max_tokens=max_tokens, temperature=temperature, seed=seed)

    def _generate(self, decoder: Any, segments: Sequence[Segment], *, request_id: str,
                  max_tokens: int, temperature: float, seed: int | None
                  ) -> Iterator[GeneratedToken]:
        stream = decoder.stream(segments, request_id=request_id, max_tokens=max_tokens,
                                temperature=temperature, seed=seed)
        try:
            while True:
                try:
                    token = next(stream)
                except StopIteration as done:
                    self._remember(request_id, done.value.egress)
                    return
                if token.text:
                    yield token
        finally:
            stream.close()  # an answer cut short releases the decoder (and its lock) at once

    def _remember(self, request_id: str, egress: EgressSummary) -> None:
        destination = getattr(self.decoder.expert, "destination", "")
        with self._lock:
            self._summaries[request_id] = replace(
                egress, destinations=(destination,) if egress.calls else ())

    def summary(self, request_id: str) -> EgressSummary:
        """The decoder's count when it ran to the end, else the audit log's account."""
        with self._lock:
            known = self._summaries.pop(request_id, None)
        if known is not None:
            return known
        if self.audit_path is None:
            return EgressSummary()
        return summarize_egress(audit_records(self.audit_path, request_id))


class NeverDefer:
    """A switch that always keeps the base: used when no head exists for the base model."""

    threshold = 1.0

    def score(self, hidden: Any) -> Any:
        import numpy as np

        return np.zeros(len(hidden), dtype=np.float32)


def audit_records(audit_path: Path, request_id: str) -> list[dict[str, Any]]:
    """The audit log's egress and outcome records of one request, for the egress panel."""
    from client import audit

    if not audit_path.exists():
        return []
    return audit.show(audit_path, request_id)


def summarize_egress(records: Sequence[dict[str, Any]]) -> EgressSummary:
    egress = [record for record in records if record.get("kind") == "egress"]
    sent = [record for record in egress if record.get("sent")]
    return EgressSummary(
        calls=len(sent),
        tokens_sent=sum(len(record.get("sent_tokens", [])) for record in sent),
        denials=sum(1 for record in egress if not record.get("decision", {}).get("allowed")),
        failures=sum(1 for record in records
                     if record.get("kind") == "outcome" and record.get("error")),
        destinations=tuple(sorted({str(record.get("destination", "")) for record in sent})),
    )


@dataclass
class Runtime:
    """The loaded parts behind the assistant; ``close`` releases them in reverse order."""

    assistant: Assistant
    documents: DocumentStore
    model_name: str
    audit_path: Path
    closers: list[Callable[[], None]] = field(default_factory=list)
    max_parallel: int = 1  # answers decoded together

    def close(self) -> None:
        while self.closers:
            self.closers.pop()()


def build_runtime(settings: ClientSettings, policy_settings: PolicySettings, *,
                  base_path: Path, switch_path: Path | None, audit_key: SecretStr,
                  gateway_token: SecretStr | None = None) -> Runtime:
    """Load base, head, expert client, policy, audit log and document store once."""
    from client.audit import AuditLog
    from client.base_model import LlamaModel
    from client.batch_engine import BatchEngine
    from client.decoding import CoDecoder, DecodingOptions
    from client.expert import HttpExpert
    from client.policy import Policy
    from client.serving import DecoderPool
    from client.switch import OnnxSwitch

    closers: list[Callable[[], None]] = []
    try:
        parallel = settings.base.max_parallel
        base = LlamaModel(base_path, n_ctx=settings.base.n_ctx * parallel,
                          n_batch=settings.base.n_batch, n_threads=settings.base.n_threads,
                          n_seq_max=parallel, n_ctx_seq=settings.base.n_ctx)
        closers.append(base.close)
        switch: Any = NeverDefer() if switch_path is None else OnnxSwitch.for_base(
            switch_path, base, provider=settings.switch.provider)
        expert = HttpExpert.from_settings(settings.expert, tokenizer=base.fingerprint,
                                          token=gateway_token)
        closers.append(expert.close)
        policy = Policy.from_settings(policy_settings, tokenizer=base)
        closers.append(policy.close)
        audit = AuditLog(policy_settings.audit_log, key=audit_key,
                         rotate_bytes=policy_settings.audit_rotate_bytes)
        engine = BatchEngine(base, scorer=switch)
        closers.append(engine.close)
        options = DecodingOptions.from_settings(settings)
        pool = DecoderPool(engine, switch=switch, expert=expert, make=lambda view, head, proxy: (
            CoDecoder(base=view, switch=head, expert=proxy, policy=policy, audit=audit,
                      options=options, seq=view.seq)))
        decoder = pool.decoder
        documents = DocumentStore(settings.daemon.data_dir / "documents.sqlite3",
                                  max_bytes=settings.daemon.max_upload_bytes,
                                  passage_chars=settings.daemon.passage_chars)
        closers.append(documents.close)
        source = CoDecoderSource(decoder, audit_path=policy_settings.audit_log, pool=pool)
        assistant = Assistant(decoder=source, documents=documents,
                              prompt_builder=prompt_builder_for(base, settings.base.prompt_style),
                              ledger=source, retrieve_passages=settings.daemon.retrieve_passages)
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    name = f"tandem-{settings.base.preset}"
    return Runtime(assistant, documents, name, policy_settings.audit_log, closers,
                   max_parallel=settings.base.max_parallel)


def prompt_builder_for(base: Any, style: str) -> PromptBuilder:
    """plain: the toy format; chat: the GGUF chat template; auto: chat when the GGUF has one."""
    template = base.chat_template
    if style == "chat" and template is None:
        raise ConfigError("base.prompt_style is 'chat' but the base model has no chat template")
    if style == "plain" or template is None:
        return plain_prompt_builder
    bos = base.detokenize([base.bos_id], special=True).decode("utf-8", errors="replace")
    eos = base.detokenize([base.eos_id], special=True).decode("utf-8", errors="replace")
    return ChatTemplatePrompt(template, bos_token=bos, eos_token=eos)
