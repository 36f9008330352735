"""The private document assistant: retrieve passages, build a prompt with private spans, decode.

Prompt text is marked by where it came from, not by which turn it is in: retrieved passages,
every assistant turn the client sends back (an earlier answer may quote a document), and any
piece of the user's own text (system, history, question, raw prompt) that repeats a stored
document enter the prompt as private segments with their source, so the egress policy can keep
them on the machine (policy.toml may open the last two). The toy pair reads the plain format it
was trained on, chat models their GGUF chat template. The decoder is a seam (``TokenSource``):
``build_runtime`` wires the real CoDecoder for the daemon and ``tandem ask``; tests pass fakes.
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import SecretStr

from client.decoding import AnswerToken, DecodeResult, StopCutter
from client.documents import DocumentStore, Passage
from client.egress import EgressSummary
from client.prompting import Segment
from client.provenance import (
    ASSISTANT_TURN,
    join_public,
    passage_segment,
    plain_prompt_with_sources,
    private,
)
from client.settings import ClientSettings, DecodingSettings, PolicySettings
from client.switch import NeverDefer as NeverDefer  # its old home, still imported from here
from client.tokens import GeneratedToken
from tandem_core.base_model import BaseModel
from tandem_core.errors import ConfigError
from tandem_core.settings import default_of

Role = Literal["system", "user", "assistant", "developer", "tool"]


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    content: str
    parts: tuple[Segment, ...] = ()  # the content with its private pieces marked (Assistant)

    def segments(self) -> list[Segment]:
        return list(self.parts) if self.parts else [Segment(self.content)]


@dataclass(frozen=True)
class Question:
    """What to answer: a conversation (chat) or a raw prompt (completion), and how."""

    messages: Sequence[ChatTurn] = ()
    prompt: str | None = None
    max_tokens: int = default_of(DecodingSettings, "max_tokens")
    temperature: float = default_of(DecodingSettings, "temperature")
    seed: int | None = None
    stop: Sequence[str] = ()
    retrieve: bool = True
    prompt_parts: tuple[Segment, ...] = ()  # the raw prompt with its private pieces marked

    def prompt_segments(self) -> list[Segment]:
        if self.prompt_parts:
            return list(self.prompt_parts)
        return [Segment(self.prompt)] if self.prompt else []

    def last_user_segments(self) -> list[Segment]:
        users = [turn for turn in self.messages if turn.role == "user"]
        return users[-1].segments() if users else []

    @property
    def query(self) -> str:
        """The text retrieval searches for: the last user turn, or the raw prompt."""
        if self.prompt is not None:
            return self.prompt
        users = [turn.content for turn in self.messages if turn.role == "user"]
        return users[-1] if users else ""


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
    """The decoder as the assistant needs it: prompt segments in, tokens with provenance out.

    The stream's return value is the decoder's ``DecodeResult``: its ``finish_reason`` and
    egress summary are the answer's, so there is one place that decides why an answer ended.
    """

    def prompt_length(self, segments: Sequence[Segment]) -> int:
        """How many tokens the prompt takes."""
        ...

    def generate(self, segments: Sequence[Segment], *, request_id: str, max_tokens: int,
                 temperature: float, seed: int | None, stop: Sequence[str]
                 ) -> Generator[GeneratedToken, None, DecodeResult]:
        """Decode after the prompt until end of generation, a stop sequence, ``max_tokens``
        or the end of the context window; return the result."""
        ...


class EgressLedger(Protocol):
    """Reads what left the machine for one request (the audit log)."""

    def summary(self, request_id: str) -> EgressSummary:
        ...


class PromptBuilder(Protocol):
    def __call__(self, question: Question, passages: Sequence[str | Segment]) -> list[Segment]:
        ...


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Assistant:
    """Answers questions over the local documents with a collaborative decoder."""

    def __init__(self, *, decoder: TokenSource, documents: DocumentStore | None,
                 prompt_builder: PromptBuilder, ledger: EgressLedger | None = None,
                 retrieve_passages: int = 1, repeat_min_chars: int = 12) -> None:
        self.decoder = decoder
        self.documents = documents
        self.prompt_builder = prompt_builder
        self.ledger = ledger
        self.retrieve_passages = retrieve_passages
        self.repeat_min_chars = repeat_min_chars

    def retrieve(self, question: Question) -> list[Passage]:
        if not question.retrieve or self.documents is None or self.retrieve_passages == 0:
            return []
        return self.documents.search(question.query, self.retrieve_passages)

    def segments(self, question: Question, passages: Sequence[Passage]) -> list[Segment]:
        return self.prompt_builder(self.mark(question), [
            private(passage.text, f"passage:{passage.document_name}") for passage in passages])

    def mark(self, question: Question) -> Question:
        """The question with assistant turns and repeats of stored documents marked private."""
        turns = [replace(turn, parts=tuple(self._turn_parts(turn))) for turn in question.messages]
        prompt_parts = tuple(self._repeat_parts(question.prompt)) if question.prompt else ()
        return replace(question, messages=turns, prompt_parts=prompt_parts)

    def _turn_parts(self, turn: ChatTurn) -> list[Segment]:
        if turn.role == "assistant":
            return [private(turn.content, ASSISTANT_TURN)]
        return self._repeat_parts(turn.content)

    def _repeat_parts(self, text: str) -> list[Segment]:
        """``text`` split so each run repeating a stored document is a private segment."""
        if self.documents is None or not text:
            return [Segment(text)]
        parts: list[Segment] = []
        position = 0
        for repeat in self.documents.repeats(text, min_chars=self.repeat_min_chars):
            parts += [Segment(text[position:repeat.start]),
                      private(text[repeat.start:repeat.end], f"repeat:{repeat.document_name}")]
            position = repeat.end
        parts.append(Segment(text[position:]))
        return [part for part in parts if part.text]

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
            temperature=question.temperature, seed=question.seed, stop=tuple(question.stop),
        )
        # The decoder ends the answer (stop sequence included) and says why; this cutter, the
        # same implementation on the same tokens, only holds back text a stop may still cut.
        cutter = StopCutter(question.stop)
        result: DecodeResult | None = None
        try:
            while cancelled is None or not cancelled.is_set():
                try:
                    generated = next(stream)
                except StopIteration as done:
                    result = done.value
                    break
                for token in cutter.push(generated):
                    if on_token is not None:
                        on_token(token)
        finally:
            stream.close()  # a stream stopped early releases the decoder's state now
        for token in cutter.flush():
            if on_token is not None:
                on_token(token)
        if result is not None:
            return Answer(request_id, cutter.text, cutter.tokens, passages, result.finish_reason,
                          prompt_tokens, result.egress)
        # Cancelled: the decoder never finished, so the audit log holds the account of egress.
        egress = self.ledger.summary(request_id) if self.ledger is not None else EgressSummary()
        return Answer(request_id, cutter.text, cutter.tokens, passages, "cancelled",
                      prompt_tokens, egress)


def plain_prompt_builder(question: Question, passages: Sequence[str | Segment]) -> list[Segment]:
    """The toy format: passages, then the question (a raw prompt is used as it is).

    The toy format has one question per prompt, so earlier turns are not part of it.
    """
    if question.prompt is not None:
        return [*_document_segments(passages), *join_public(question.prompt_segments())]
    return plain_prompt_with_sources(passages, question.last_user_segments())


def _document_segments(passages: Sequence[str | Segment]) -> list[Segment]:
    segments: list[Segment] = []
    for passage in passages:
        segments += [Segment("Document: "), passage_segment(passage), Segment("\n")]
    return segments


_MARK = re.compile("\x1etandem-private-([0-9a-f]{16})-([0-9]+)\x1e")


class ChatTemplatePrompt:
    """Renders a GGUF chat template; every private piece becomes its own private segment.

    Passages go into the last user turn, and the private pieces of each turn (assistant turns,
    repeats of stored documents) stay where they are, as marker strings; the template is
    rendered once and the rendered text split at the markers, so the template's own control
    text stays public and each private piece is exactly one private segment. The markers carry
    a fresh random nonce, so text in a message cannot forge one.
    """

    def __init__(self, template: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = environment.from_string(template)
        self._bos_token = bos_token
        self._eos_token = eos_token

    def __call__(self, question: Question, passages: Sequence[str | Segment]) -> list[Segment]:
        if question.prompt is not None:
            return [*_document_segments(passages), *join_public(question.prompt_segments())]
        nonce = uuid.uuid4().hex[:16]
        hidden_parts: list[Segment] = []

        def marked(segments: Sequence[Segment]) -> str:
            pieces = []
            for segment in segments:
                if segment.private:
                    pieces.append(f"\x1etandem-private-{nonce}-{len(hidden_parts)}\x1e")
                    hidden_parts.append(segment)
                else:
                    pieces.append(segment.text)
            return "".join(pieces)

        messages = [{"role": turn.role, "content": marked(turn.segments())}
                    for turn in question.messages]
        passage_marks = []
        if passages:
            last_user = max(i for i, turn in enumerate(messages) if turn["role"] == "user")
            documents = ""
            for passage in passages:
                passage_marks.append(len(hidden_parts))
                documents += f"Document: {marked([passage_segment(passage)])}\n"
            messages[last_user]["content"] = f"{documents}\n{messages[last_user]['content']}"
        rendered = self._template.render(
            messages=messages, add_generation_prompt=True,
            bos_token=self._bos_token, eos_token=self._eos_token,
        )
        return _split_marks(rendered, nonce, hidden_parts, passage_marks)


def _split_marks(rendered: str, nonce: str, private: Sequence[Segment],
                 required: Sequence[int]) -> list[Segment]:
    """The rendered template as segments: markers become their private segments again."""
    segments: list[Segment] = []
    seen: set[int] = set()
    position = 0
    for match in _MARK.finditer(rendered):
        if match.group(1) != nonce:
            continue
        index = int(match.group(2))
        segments.append(Segment(rendered[position:match.start()]))
        segments.append(private[index])
        seen.add(index)
        position = match.end()
    segments.append(Segment(rendered[position:]))
    if any(index not in seen for index in required):
        raise ConfigError("the base model's chat template dropped a document passage")
    return [segment for segment in segments if segment.text]


# -- wiring the real parts ------------------------------------------------------------------------

class CoDecoderSource:
    """Adapts ``client.decoding.CoDecoder`` to ``TokenSource``; reads the audit log as ledger.

    Control tokens (EOS, ``<|im_end|>``) carry no text and are not part of the answer.
    """

    def __init__(self, decoder: Any, *, audit_path: Path | None = None,
                 pool: Any | None = None) -> None:
        self.decoder = decoder
        self.audit_path = audit_path
        self.pool = pool  # client.serving.DecoderPool: one decoder per concurrent answer

    def prompt_length(self, segments: Sequence[Segment]) -> int:
        return int(self.decoder.prompt_length(segments))

    def generate(self, segments: Sequence[Segment], *, request_id: str, max_tokens: int,
                 temperature: float, seed: int | None, stop: Sequence[str] = ()
                 ) -> Generator[GeneratedToken, None, DecodeResult]:
        lease = self.pool.checkout() if self.pool is not None else contextlib.nullcontext(self.decoder)
        with lease as decoder:
            return (yield from self._generate(decoder, segments, request_id=request_id,
                                              max_tokens=max_tokens, temperature=temperature,
                                              seed=seed, stop=tuple(stop)))

    def _generate(self, decoder: Any, segments: Sequence[Segment], *, request_id: str,
                  max_tokens: int, temperature: float, seed: int | None, stop: tuple[str, ...]
                  ) -> Generator[GeneratedToken, None, DecodeResult]:
        stream = decoder.stream(segments, request_id=request_id, max_tokens=max_tokens,
                                temperature=temperature, seed=seed, stop=stop)
        try:
            while True:
                try:
                    token = next(stream)
                except StopIteration as done:
                    result: DecodeResult = done.value
                    destination = getattr(self.decoder.expert, "destination", "")
                    return replace(result, egress=replace(
                        result.egress, destinations=(destination,) if result.egress.calls else ()))
                if token.text:
                    yield token
        finally:
            stream.close()  # an answer cut short releases the decoder (and its lock) at once

    def summary(self, request_id: str) -> EgressSummary:
        """What left the machine for an answer that did not finish: the audit log's account."""
        if self.audit_path is None:
            return EgressSummary()
        return summarize_egress(audit_records(self.audit_path, request_id))


def audit_records(audit_path: Path, request_id: str) -> list[dict[str, Any]]:
    """The audit log's egress and outcome records of one request, for the egress panel."""
    from client import audit

    if not audit_path.exists():
        return []
    return audit.show(audit_path, request_id)


def summarize_egress(records: Sequence[dict[str, Any]]) -> EgressSummary:
    egress = [record for record in records if record.get("kind") == "egress"]
    sent = [record for record in egress if record.get("sent")]
    outcomes = {record.get("egress_id"): record for record in records
                if record.get("kind") == "outcome"}
    # A call without an outcome (the answer was cut short mid-call) may have been delivered.
    delivered = [record for record in sent
                 if outcomes.get(record.get("id"), {}).get("delivered", True)]
    return EgressSummary(
        calls=len(sent),
        tokens_sent=sum(len(record.get("sent_tokens", [])) for record in sent),
        delivered=len(delivered),
        tokens_delivered=sum(len(record.get("sent_tokens", [])) for record in delivered),
        answered=sum(1 for record in sent
                     if outcomes.get(record.get("id"), {}).get("answered", False)),
        denials=sum(1 for record in egress if not record.get("decision", {}).get("allowed")),
        failures=sum(1 for record in records
                     if record.get("kind") == "outcome" and record.get("error")),
        destinations=tuple(sorted({str(record.get("destination", "")) for record in sent})),
    )


_RULE_WORDS = {"repeat": "repeats", "copy": "copies", "sensitive": "matches a protected pattern in",
               "derived": "is a value from", "pattern": "matched a deny pattern"}


def describe_egress(records: Sequence[dict[str, Any]]) -> list[str]:
    """What left the machine for one request, in plain words, from its audit records.

    The same sentences appear in ``tandem ask``, the demo and (in JavaScript) the web page: the
    values copied from private text that were sent, by source; the calls the policy refused
    because such values were in view; the user's own words that were redacted; and what stayed
    home. It never says "nothing private" when derived values went out.
    """
    egress = [record for record in records if record.get("kind") == "egress"]
    sent = [record for record in egress if record.get("sent")]
    lines: list[str] = []
    derived: dict[str, list[str]] = {}
    policy = ""
    for record in sent:
        privacy = record.get("privacy") or {}
        policy = privacy.get("rules", {}).get("derived", policy)
        for item in privacy.get("derived_sent", []):
            values = derived.setdefault(str(item.get("source", "")), [])
            if item.get("value") not in values:
                values.append(str(item.get("value")))
    for source, values in derived.items():
        noun = "value" if len(values) == 1 else "values"
        verb = "was" if len(values) == 1 else "were"
        lines.append(f"{len(values)} {noun} copied from {source} {verb} sent: "
                     f"{', '.join(values)} (policy: derived = {policy or 'send'})")
    refused = [record for record in egress
               if record.get("decision", {}).get("reason") == "derived"]
    if refused:
        sources = sorted({str(item.get("source", "")) for record in refused
                          for item in (record.get("privacy") or {}).get("derived_values", [])})
        values = sorted({str(item.get("value", "")) for record in refused
                         for item in (record.get("privacy") or {}).get("derived_values", [])})
        lines.append(f"the expert was not asked {len(refused)} time(s): values from "
                     f"{', '.join(sources) or 'private text'} ({', '.join(values)}) were in the "
                     f"text it would see (policy: derived = deny); those tokens are to double-check")
    redacted: dict[tuple[str, str, str], None] = {}
    kept: set[str] = set()
    for record in egress:
        privacy = record.get("privacy") or {}
        for item in privacy.get("redacted", []):
            redacted.setdefault((str(item.get("text", "")), str(item.get("rule", "")),
                                 str(item.get("source", ""))), None)
        kept.update(str(source) for source in privacy.get("private_sources", []))
    for text, rule, source in redacted:
        why = _RULE_WORDS.get(rule, rule) + (f" {source}" if source else "")
        lines.append(f"redacted before sending: \u201c{text}\u201d ({why.strip()})")
    if kept:
        lines.append(f"kept on this machine: {', '.join(sorted(kept))}")
    if sent and not derived and all(record.get("privacy") for record in sent):
        lines.append("no value or text copied from private documents was in what was sent")
    return lines


@dataclass
class Runtime:
    """The loaded parts behind the assistant; ``close`` releases them in reverse order."""

    assistant: Assistant
    documents: DocumentStore
    model_name: str
    audit_path: Path
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    expert: Any = None  # the HttpExpert, for the start-up reachability line
    max_parallel: int = 1  # answers decoded together

    def close(self) -> None:
        self.stack.close()


def build_runtime(settings: ClientSettings, policy_settings: PolicySettings, *,
                  base_path: Path, switch_path: Path | None, audit_key: SecretStr,
                  gateway_token: SecretStr | None = None) -> Runtime:
    """Load base, head, expert client, policy, audit log and document store once.

    The parts come from ``client.composition.open_parts``, like every other entry point's; this
    adds what only the daemon and ``tandem ask`` need: the batch engine with its decoder pool and
    the document store.
    """
    from client.composition import Egress, GatewayExpert, PartsSpec, open_parts
    from client.decoding import CoDecoder, DecodingOptions
    from client.serving import DecoderPool
    from tandem_core.batch_engine import BatchEngine
    from tandem_core.prompt_cache import prompt_cache

    with contextlib.ExitStack() as stack:
        parts = open_parts(stack, PartsSpec(
            base_path=base_path, base=settings.base, switch_path=switch_path,
            switch_provider=settings.switch.provider,
            expert=GatewayExpert(settings.expert, gateway_token),
            egress=Egress(policy_settings.audit_log, audit_key, policy_settings)))
        engine = BatchEngine(parts.base, scorer=parts.switch,
                             prompt_cache=prompt_cache(settings.base.prompt_cache_mib),
                             wake_every=settings.base.stream_burst)
        stack.callback(engine.close)
        options = DecodingOptions.from_settings(settings)
        policy, audit = parts.policy, parts.audit
        pool = DecoderPool(engine, switch=parts.switch, expert=parts.expert,
                           make=lambda view, head, proxy: CoDecoder(
                               base=view, switch=head, expert=proxy, policy=policy, audit=audit,
                               options=options, seq=view.seq))
        documents = stack.enter_context(contextlib.closing(DocumentStore(
            settings.daemon.data_dir / "documents.sqlite3",
            max_bytes=settings.daemon.max_upload_bytes,
            passage_chars=settings.daemon.passage_chars, on_delete=engine.forget_prompts)))
        source = CoDecoderSource(pool.decoder, audit_path=policy_settings.audit_log, pool=pool)
        assistant = Assistant(decoder=source, documents=documents,
                              prompt_builder=prompt_builder_for(parts.base,
                                                                settings.base.prompt_style),
                              ledger=source, retrieve_passages=settings.daemon.retrieve_passages,
                              repeat_min_chars=policy_settings.taint_min_chars)
        name = f"tandem-{settings.base.preset}"
        return Runtime(assistant, documents, name, policy_settings.audit_log, stack.pop_all(),
                       parts.expert, max_parallel=settings.base.max_parallel)


def prompt_builder_for(base: BaseModel, style: str) -> PromptBuilder:
    """plain: the toy format; chat: the GGUF chat template; auto: chat when the GGUF has one."""
    template = base.chat_template
    if style == "chat" and template is None:
        raise ConfigError("base.prompt_style is 'chat' but the base model has no chat template")
    if style == "plain" or template is None:
        return plain_prompt_builder
    bos = base.detokenize([base.bos_id], special=True).decode("utf-8", errors="replace")
    eos = base.detokenize([base.eos_id], special=True).decode("utf-8", errors="replace")
    return ChatTemplatePrompt(template, bos_token=bos, eos_token=eos)
