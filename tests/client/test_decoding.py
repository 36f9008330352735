"""CoDecoder: exactness of expert spans, provenance, egress through policy and audit.

Two kinds of models: ``TinyLM`` (numpy, for the decoder's logic, many examples in milliseconds)
and the real toy GGUF pair under llama.cpp with a random ONNX head (fewer examples).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.decoding import CoDecoder, DecodingOptions, compose_distribution
from client.egress import (
    EgressDecision,
    EgressOutcome,
    EgressRecord,
    EgressRequest,
    SendEverything,
)
from client.errors import ExpertUnavailableError
from client.expert import InProcessExpert
from client.prompting import Segment
from tandem_core.base_model import BaseModel, DecodeOutput
from tandem_core.errors import ContextOverflowError, ModelError
from tandem_core.protocol import TokenLogprob, log_softmax, sample_from_logits

EOS = 0


class TinyLM:
    """A deterministic numpy language model with the LlamaModel surface the decoder uses.

    Each position's hidden state is recomputed from its whole prefix, so batched and one-by-one
    decodes agree exactly (as llama.cpp's CPU backend does for these sizes).
    """

    def __init__(self, seed: int, *, vocab_size: int = 12, hidden_size: int = 8,
                 n_ctx: int = 64) -> None:
        rng = np.random.default_rng(seed)
        self.vocab_size, self.hidden_size, self.n_ctx = vocab_size, hidden_size, n_ctx
        self.embeddings = rng.normal(size=(vocab_size, hidden_size))
        self.output = rng.normal(size=(hidden_size, vocab_size)) * 2.0
        self.bias = np.zeros(vocab_size)
        self.bias[EOS] = -3.0  # keep answers going for a while
        self.bias[1] = -30.0  # BOS is never generated
        self.bos_id, self.eos_id = 1, EOS
        self.cache: list[int] = []
        self.decoded = 0  # tokens fed through decode, to count work

    def position(self, seq: int = 0) -> int:
        return len(self.cache)

    def cached_tokens(self, seq: int = 0) -> list[int]:
        return list(self.cache)

    def rollback(self, to_position: int, *, seq: int = 0) -> None:
        assert 0 <= to_position <= len(self.cache)
        del self.cache[to_position:]

    def reset(self, seq: int = 0) -> None:
        self.cache.clear()

    def decode(self, tokens: Sequence[int], *, seq: int = 0, last_only: bool = False) -> DecodeOutput:
        if len(self.cache) + len(tokens) > self.n_ctx:
            raise ContextOverflowError("tiny context full")
        rows = []
        for token in tokens:
            self.cache.append(int(token))
            rows.append(self._hidden(self.cache))
        self.decoded += len(tokens)
        hidden = np.array(rows[-1:] if last_only else rows, dtype=np.float32)
        return DecodeOutput((hidden @ self.output + self.bias).astype(np.float32), hidden)

    def _hidden(self, prefix: Sequence[int]) -> np.ndarray:
        decay = 0.6 ** np.arange(len(prefix))[::-1]
        return np.tanh((self.embeddings[list(prefix)] * decay[:, None]).sum(axis=0))

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [2 + ord(char) % (self.vocab_size - 2)
                                                       for char in text]

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        return b"" if token_id in (EOS, self.bos_id) else bytes([ord("a") + token_id])

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        return b"".join(self.token_bytes(token) for token in tokens)

    def is_end_of_generation(self, token_id: int) -> bool:
        return token_id == EOS

    @property
    def fingerprint(self) -> str:
        return f"tiny-lm-{self.vocab_size}"

    @property
    def chat_template(self) -> str | None:
        return None

    def close(self) -> None:
        self.cache.clear()


@dataclass
class ProjectionSwitch:
    """A deterministic switch: sigmoid of a fixed projection of the hidden state."""

    weights: np.ndarray
    calls: int = 0

    def score(self, hidden: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (1.0 / (1.0 + np.exp(-(hidden @ self.weights)))).astype(np.float32)


def reference_decode(base: Any, expert_model: Any, switch: Any, prompt: list[int], *,
                     options: DecodingOptions, threshold: float) -> list[tuple[int, str]]:
    """Co-LLM one token at a time, recomputing both models from scratch at every step."""
    sequence, produced = list(prompt), []
    while True:
        base.reset()
        output = base.decode(sequence)
        score = float(switch.score(output.hidden[-1:])[0])
        limit = options.warmup_threshold if len(produced) < options.warmup_tokens else threshold
        position = len(sequence)
        if score > limit:
            expert_model.reset()
            expert_logits = np.asarray(expert_model.decode(sequence).logits[-1], dtype=np.float64)
            token = sample_from_logits(expert_logits, temperature=options.temperature,
                                       seed=options.seed, position=position)
            if options.compose:
                logprobs = log_softmax(expert_logits)
                best = np.argsort(-logprobs, kind="stable")[:options.top_logprobs]
                top = TokenLogprob(token=token, logprob=float(logprobs[token]),
                                   top=[(int(i), float(logprobs[i])) for i in best])
                mixture = compose_distribution(output.logits[-1], score, token, top)
                token = sample_from_logits(np.log(np.maximum(mixture, 1e-300)),
                                           temperature=options.temperature, seed=options.seed,
                                           position=position)
            provenance = "expert"
        else:
            token = sample_from_logits(output.logits[-1], temperature=options.temperature,
                                       seed=options.seed, position=position)
            provenance = "base"
        sequence.append(token)
        produced.append((token, provenance))
        if base.is_end_of_generation(token) or len(produced) == options.max_tokens:
            return produced


def tiny_decoder(options: DecodingOptions, *, switch_seed: int = 3, expert: Any = None,
                 **kwargs: Any) -> tuple[CoDecoder, TinyLM, Any]:
    base = TinyLM(seed=1)
    switch = ProjectionSwitch(np.random.default_rng(switch_seed).normal(size=8) * 2.0)
    expert = expert if expert is not None else InProcessExpert(TinyLM(seed=2))
    return CoDecoder(base=base, switch=switch, expert=expert, options=options, **kwargs), base, expert


decoding_cases = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(2, 11), min_size=1, max_size=6),
    "threshold": st.floats(0.0, 1.0),
    "lookahead": st.integers(1, 8),
    "temperature": st.sampled_from([0.0, 0.8]),
    "seed": st.integers(0, 2**32),
    "max_tokens": st.integers(1, 14),
    "warmup_tokens": st.integers(0, 3),
    "compose": st.booleans(),
    "switch_seed": st.integers(0, 50),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=decoding_cases)
def test_spans_equal_one_token_calls_and_the_from_scratch_reference(case: dict[str, Any]) -> None:
    options = DecodingOptions(threshold=case["threshold"], lookahead=case["lookahead"],
                              temperature=case["temperature"], seed=case["seed"],
                              max_tokens=case["max_tokens"], warmup_tokens=case["warmup_tokens"],
                              warmup_threshold=0.9, compose=case["compose"], top_logprobs=4)
    spans, _, _ = tiny_decoder(options, switch_seed=case["switch_seed"])
    single, _, _ = tiny_decoder(replace_options(options, lookahead=1),
                                switch_seed=case["switch_seed"])
    with_spans = spans.generate(case["prompt"])
    one_by_one = single.generate(case["prompt"])
    reference = reference_decode(TinyLM(seed=1), TinyLM(seed=2), spans.switch, case["prompt"],
                                 options=options, threshold=case["threshold"])
    as_pairs = [(token.token_id, token.provenance) for token in with_spans.tokens]
    assert as_pairs == [(token.token_id, token.provenance) for token in one_by_one.tokens]
    assert as_pairs == reference
    assert with_spans.egress.calls <= one_by_one.egress.calls


def replace_options(options: DecodingOptions, **changes: Any) -> DecodingOptions:
    from dataclasses import replace

    return replace(options, **changes)


def test_spans_need_fewer_calls_than_single_tokens() -> None:
    options = DecodingOptions(threshold=0.0, max_tokens=12)  # always defer
    spans, _, _ = tiny_decoder(replace_options(options, lookahead=8))
    single, _, _ = tiny_decoder(replace_options(options, lookahead=1))
    first, second = spans.generate([3, 4]), single.generate([3, 4])
    assert first.token_ids == second.token_ids
    assert first.provenance_counts["expert"] == len(first.tokens)
    assert first.egress.calls < second.egress.calls
    assert first.egress.deferred_positions == second.egress.deferred_positions == 12
    assert first.egress.calls == 2


def test_provenance_and_scores_follow_the_threshold() -> None:
    never, _, _ = tiny_decoder(DecodingOptions(threshold=1.0, max_tokens=6))
    result = never.generate([3, 4])
    assert {token.provenance for token in result.tokens} == {"base"}
    assert result.egress.calls == 0
    assert all(0.0 <= token.deferral_probability <= 1.0 for token in result.tokens)


def test_warm_up_threshold_governs_the_first_tokens() -> None:
    options = DecodingOptions(threshold=1.0, warmup_tokens=2, warmup_threshold=0.0, max_tokens=5)
    decoder, _, _ = tiny_decoder(options)
    provenance = [token.provenance for token in decoder.generate([3, 4]).tokens]
    assert provenance[:2] == ["expert", "expert"] and set(provenance[2:]) == {"base"}


def test_max_tokens_and_finish_reason() -> None:
    decoder, _, _ = tiny_decoder(DecodingOptions(threshold=1.0, max_tokens=3))
    result = decoder.generate([3, 4])
    assert len(result.tokens) == 3 and result.finish_reason == "length"
    assert decoder.generate([3, 4], max_tokens=2).finish_reason == "length"


def test_stop_sequences_end_the_answer_and_cut_the_text() -> None:
    decoder, _, _ = tiny_decoder(DecodingOptions(threshold=1.0, max_tokens=12))
    full = decoder.generate([3, 4])
    stop = full.text[2:4]
    stopped = decoder.generate([3, 4], stop=(stop,))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(stop)]
    assert stopped.token_ids == full.token_ids[:len(stopped.tokens)]


def test_end_of_generation_stops() -> None:
    class EndsSoon(TinyLM):
        def decode(self, tokens: Sequence[int], *, seq: int = 0,
                   last_only: bool = False) -> DecodeOutput:
            output = super().decode(tokens, seq=seq, last_only=last_only)
            if len(self.cache) >= 4:
                output.logits[:, EOS] = 100.0
            return output

    decoder = CoDecoder(base=EndsSoon(seed=1), switch=ProjectionSwitch(np.zeros(8)), expert=None,
                        options=DecodingOptions(threshold=1.0, max_tokens=20))
    result = decoder.generate([3, 4])
    assert result.finish_reason == "stop" and result.tokens[-1].token_id == EOS
    assert len(result.tokens) == 3


def test_stream_yields_the_tokens_of_generate_and_returns_the_result() -> None:
    decoder, _, _ = tiny_decoder(DecodingOptions(threshold=0.5, max_tokens=8))
    seen = []
    result = decoder.generate([3, 4], on_token=seen.append)
    assert seen == result.tokens
    stream = decoder.stream([3, 4])
    streamed = list(stream)
    assert [token.token_id for token in streamed] == result.token_ids
    # Closing a stream early releases the decoder for the next answer.
    early = decoder.stream([3, 4])
    next(early)
    early.close()
    assert decoder.generate([3, 4]).token_ids == result.token_ids


def test_prompt_kv_reuse_gives_the_same_answer() -> None:
    decoder, base, _ = tiny_decoder(DecodingOptions(threshold=0.5, max_tokens=8))
    first = decoder.generate([3, 4, 5, 6])
    decoded = base.decoded
    again = decoder.generate([3, 4, 5, 6])
    assert again.token_ids == first.token_ids
    assert base.decoded - decoded < decoded  # the shared prompt was not decoded again


def test_a_prompt_that_fills_the_context_is_an_error() -> None:
    decoder, _, _ = tiny_decoder(DecodingOptions())
    with pytest.raises(ContextOverflowError):
        decoder.generate([3] * 64)
    with pytest.raises(ModelError):
        decoder.generate([])


def test_answers_stop_at_the_end_of_the_context() -> None:
    decoder, _, _ = tiny_decoder(DecodingOptions(threshold=0.3, max_tokens=100, lookahead=8))
    result = decoder.generate([3] * 60)
    assert len(result.tokens) == 4 and result.finish_reason == "length"


# -- egress ------------------------------------------------------------------------------------

@dataclass
class Journal:
    """Records, in order, what policy, audit and expert saw."""

    events: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class RecordingAudit:
    journal: Journal

    def record_egress(self, record: EgressRecord) -> str:
        self.journal.events.append(("egress", record))
        return f"e{len(self.journal.events)}"

    def record_outcome(self, egress_id: str, outcome: EgressOutcome) -> None:
        self.journal.events.append(("outcome", (egress_id, outcome)))


@dataclass
class RecordingExpert:
    inner: InProcessExpert
    journal: Journal
    fail_from_call: int | None = None
    destination: str = "http://gateway.test"
    model: str = "tiny-expert"

    def continue_(self, **kwargs: Any) -> Any:
        self.journal.events.append(("send", kwargs))
        calls = sum(1 for kind, _ in self.journal.events if kind == "send")
        if self.fail_from_call is not None and calls >= self.fail_from_call:
            raise ExpertUnavailableError("gateway down")
        return self.inner.continue_(**kwargs)


@dataclass
class DenyEvery:
    """Allows calls except every ``period``-th one."""

    period: int
    asked: list[EgressRequest] = field(default_factory=list)

    def decide(self, request: EgressRequest) -> EgressDecision:
        self.asked.append(request)
        if len(self.asked) % self.period == 0:
            return EgressDecision(False, "cap:per_request_calls")
        return SendEverything().decide(request)


def egress_decoder(options: DecodingOptions, **kwargs: Any) -> tuple[CoDecoder, Journal, Any]:
    journal = Journal()
    expert = RecordingExpert(InProcessExpert(TinyLM(seed=2)), journal,
                             fail_from_call=kwargs.pop("fail_from_call", None))
    decoder, _, _ = tiny_decoder(options, expert=expert, audit=RecordingAudit(journal), **kwargs)
    return decoder, journal, expert


def test_every_send_is_audited_before_it_leaves_and_only_new_tokens_go() -> None:
    decoder, journal, _ = egress_decoder(DecodingOptions(threshold=0.0, max_tokens=10, lookahead=3))
    prompt = [3, 4, 5]
    result = decoder.generate(prompt, request_id="req-1")
    kinds = [kind for kind, _ in journal.events]
    assert kinds == ["egress", "send", "outcome"] * (kinds.count("send"))
    sends = [payload for kind, payload in journal.events if kind == "send"]
    records = [payload for kind, payload in journal.events if kind == "egress"]
    assert sends[0]["held"] == 0 and sends[0]["tokens"] == prompt
    for send, record in zip(sends, records, strict=True):
        assert list(record.sent_tokens) == send["tokens"] and record.held == send["held"]
        assert record.request_id == "req-1" and record.destination == "http://gateway.test"
    local = prompt + result.token_ids
    for send in sends[1:]:
        # What the gateway holds is a prefix of the local sequence; nothing is sent twice.
        assert local[:send["held"]] + send["tokens"] == local[:send["held"] + len(send["tokens"])]
    assert result.egress.tokens_sent == sum(len(send["tokens"]) for send in sends)
    assert result.egress.tokens_sent <= len(local)
    outcomes = [payload[1] for kind, payload in journal.events if kind == "outcome"]
    assert sum(outcome.accepted_tokens for outcome in outcomes) == result.provenance_counts["expert"]


def test_whole_prefix_mode_resends_everything() -> None:
    decoder, journal, _ = egress_decoder(DecodingOptions(threshold=0.0, max_tokens=6, lookahead=2,
                                                         incremental=False))
    result = decoder.generate([3, 4, 5])
    sends = [payload for kind, payload in journal.events if kind == "send"]
    assert all(send["held"] == 0 for send in sends)
    assert result.egress.tokens_sent > 3 * len(sends) - 1


def test_denied_calls_are_audited_and_marked() -> None:
    policy = DenyEvery(period=2)
    decoder, journal, _ = egress_decoder(DecodingOptions(threshold=0.0, max_tokens=6, lookahead=1),
                                         policy=policy)
    result = decoder.generate([Segment("ab"), Segment("cd", private=True)])
    assert [token.provenance for token in result.tokens] == ["expert", "denied"] * 3
    assert result.egress.denials == 3
    denials = [record for kind, record in journal.events
               if kind == "egress" and not record.decision.allowed]
    assert len(denials) == 3 and all(list(record.sent_tokens) == [] for record in denials)
    # The private mask reaches the policy: BOS, "ab" public, "cd" private, answer public.
    first = policy.asked[0]
    assert list(first.private_mask) == [False, False, False, True, True]


def test_expert_failure_mid_answer_falls_back_and_completes() -> None:
    options = DecodingOptions(threshold=0.0, max_tokens=8, lookahead=2)
    decoder, journal, _ = egress_decoder(options, fail_from_call=3)
    result = decoder.generate([3, 4])
    provenance = [token.provenance for token in result.tokens]
    assert provenance[:4] == ["expert"] * 4
    assert set(provenance[4:]) == {"fallback"} and len(provenance) == 8
    assert result.finish_reason == "length" and result.egress.failures == 4
    errors = [payload[1].error for kind, payload in journal.events if kind == "outcome"]
    assert any(error and "gateway down" in error for error in errors)


def test_an_open_circuit_skips_the_expert_without_egress() -> None:
    class Closed:
        destination, model = "http://gateway.test", "m"

        def ready(self) -> bool:
            return False

        def continue_(self, **kwargs: Any) -> Any:
            raise AssertionError("must not be called")

    journal = Journal()
    decoder, _, _ = tiny_decoder(DecodingOptions(threshold=0.0, max_tokens=3), expert=Closed(),
                                 audit=RecordingAudit(journal))
    result = decoder.generate([3, 4])
    assert result.provenance_counts["fallback"] == 3 and journal.events == []


def test_a_lost_session_resends_the_whole_prefix_once() -> None:
    options = DecodingOptions(threshold=0.0, max_tokens=4, lookahead=2)
    decoder, journal, expert = egress_decoder(options)

    original = expert.inner.continue_

    def forgetting(**kwargs: Any) -> Any:
        expert.inner.forget(kwargs["session"])  # the gateway restarts before every call
        return original(**kwargs)

    expert.inner.continue_ = forgetting  # type: ignore[method-assign]
    result = decoder.generate([3, 4])
    sends = [payload for kind, payload in journal.events if kind == "send"]
    assert result.provenance_counts["expert"] == 4 and result.egress.failures == 0
    assert sends[0]["held"] == 0
    local = [3, 4, *result.token_ids]
    later = sends[1:]
    assert len(later) % 2 == 0
    for lost, resent in zip(later[::2], later[1::2], strict=True):
        assert lost["held"] > 0 and resent["held"] == 0
        assert resent["tokens"] == local[:len(resent["tokens"])]
    baseline, _, _ = tiny_decoder(options)
    assert result.token_ids == baseline.generate([3, 4]).token_ids


def test_segments_become_tokens_with_a_private_mask() -> None:
    decoder, _, _ = tiny_decoder(DecodingOptions())
    tokens, mask = decoder.encode([Segment("Doc: "), Segment("xy", private=True), Segment("?")])
    assert tokens[0] == 1 and len(tokens) == 1 + 5 + 2 + 1
    assert mask == [False] * 6 + [True, True] + [False]
    assert decoder.prompt_length([3, 4, 5]) == 3


def test_compose_mixes_base_and_expert_distributions() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    top = TokenLogprob(token=2, logprob=np.log(0.6), top=[(2, np.log(0.6)), (1, np.log(0.3))])
    mixture = compose_distribution(logits, 0.5, 2, top)
    np.testing.assert_allclose(mixture, [0.35, 0.1 + 0.5 / 3, 0.05 + 0.5 * 2 / 3])
    np.testing.assert_allclose(compose_distribution(logits, 1.0, 1, None), [0, 1, 0])


def test_the_numpy_fake_is_a_base_model_and_a_partial_one_is_not() -> None:
    """The seam the decoder, the in-process expert and collection are typed against."""
    assert isinstance(TinyLM(0), BaseModel)

    class NoRollback(TinyLM):
        rollback = None  # type: ignore[assignment]

    assert not isinstance(NoRollback(0), BaseModel)
    assert not isinstance(object(), BaseModel)


# -- the real toy pair under llama.cpp ----------------------------------------------------------

@pytest.fixture(scope="module")
def toy_models(toy_pair: Any) -> Iterator[tuple[Any, Any]]:
    from tandem_core.base_model import LlamaModel

    base = LlamaModel(toy_pair.base_gguf, n_ctx=512)
    expert = LlamaModel(toy_pair.expert_gguf, n_ctx=512)
    yield base, expert
    base.close()
    expert.close()


@pytest.fixture(scope="module")
def toy_switch(toy_models: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from client.switch import BASE_FINGERPRINT_KEY, HIDDEN_SIZE_KEY, THRESHOLD_KEY, OnnxSwitch
    from tests.client.test_switch import write_linear_head

    base, _ = toy_models
    weights = np.random.default_rng(7).normal(size=base.hidden_size).astype(np.float32)
    weights *= 3.0 / np.sqrt(base.hidden_size)

    path = write_linear_head(tmp_path_factory.mktemp("head") / "switch.onnx", weights, 0.0,
                             metadata={HIDDEN_SIZE_KEY: str(base.hidden_size),
                                       BASE_FINGERPRINT_KEY: base.fingerprint,
                                       THRESHOLD_KEY: "0.5"})
    return OnnxSwitch.for_base(Path(path), base)


def toy_prompts(toy_pair: Any) -> list[str]:
    import json

    with open(toy_pair.test_jsonl) as lines:
        return [json.loads(line)["prompt"] for _, line in zip(range(8), lines, strict=False)]


# llama.cpp's CPU kernels round differently for different batch sizes (logits move by ~1e-3),
# so a token whose top two candidates are closer than that may come out either way. On the toy
# pair the three paths must agree token for token up to such a numerical tie, if any.
NUMERICAL_NOISE = 2e-3


def fragile_draw(logits: np.ndarray, *, options: DecodingOptions, position: int) -> bool:
    """Whether logit noise of NUMERICAL_NOISE can change the token drawn at ``position``."""
    def draw(values: np.ndarray) -> int:
        return sample_from_logits(values, temperature=options.temperature, seed=options.seed,
                                  position=position)

    chosen = draw(logits)
    rng = np.random.default_rng(0)
    return any(draw(logits + rng.uniform(-NUMERICAL_NOISE, NUMERICAL_NOISE, logits.shape))
               != chosen for _ in range(64))


def numerical_tie_at(index: int, reference: list[tuple[int, str]], *, base: Any, expert_model: Any,
                     switch: Any, prompt: list[int], options: DecodingOptions,
                     threshold: float) -> bool:
    prefix = prompt + [token for token, _ in reference[:index]]
    base.reset()
    output = base.decode(prefix)
    score = float(switch.score(output.hidden[-1:])[0])
    limit = options.warmup_threshold if index < options.warmup_tokens else threshold
    if abs(score - limit) < NUMERICAL_NOISE:
        return True
    logits = output.logits[-1]
    if score > limit:
        expert_model.reset()
        logits = expert_model.decode(prefix).logits[-1]
    return fragile_draw(np.asarray(logits, dtype=np.float64), options=options,
                        position=len(prefix))


def assert_same_up_to_a_tie(ours: list[tuple[int, str]], theirs: list[tuple[int, str]],
                            **context: Any) -> None:
    for index, (mine, other) in enumerate(zip(ours, theirs, strict=False)):
        if mine != other:
            assert numerical_tie_at(index, theirs, **context), (
                f"diverged at token {index}: {mine} != {other} with no numerical tie")
            return
    assert len(ours) == len(theirs)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prompt_index=st.integers(0, 7), threshold=st.floats(0.2, 0.8), lookahead=st.integers(1, 8),
       temperature=st.sampled_from([0.0, 0.7]), seed=st.integers(0, 2**32))
def test_toy_pair_spans_equal_single_calls_and_the_reference(
        toy_pair: Any, toy_models: tuple[Any, Any], toy_switch: Any, prompt_index: int,
        threshold: float, lookahead: int, temperature: float, seed: int) -> None:
    base, expert_model = toy_models
    prompt = base.tokenize(toy_prompts(toy_pair)[prompt_index], add_bos=True)
    options = DecodingOptions(threshold=threshold, lookahead=lookahead, temperature=temperature,
                              seed=seed, max_tokens=10)
    results = []
    for span in (lookahead, 1):
        decoder = CoDecoder(base=base, switch=toy_switch, expert=InProcessExpert(expert_model),
                            options=replace_options(options, lookahead=span))
        results.append([(token.token_id, token.provenance)
                         for token in decoder.generate(prompt).tokens])
    reference = reference_decode(base, expert_model, toy_switch, prompt, options=options,
                                 threshold=threshold)
    context = {"base": base, "expert_model": expert_model, "switch": toy_switch,
               "prompt": prompt, "options": options, "threshold": threshold}
    assert_same_up_to_a_tie(results[0], results[1], **context)
    assert_same_up_to_a_tie(results[0], reference, **context)


def test_the_tie_check_refuses_a_real_difference(
        toy_pair: Any, toy_models: tuple[Any, Any], toy_switch: Any) -> None:
    base, expert_model = toy_models
    prompt = base.tokenize(toy_prompts(toy_pair)[0], add_bos=True)
    options = DecodingOptions(threshold=0.5, max_tokens=6)
    reference = reference_decode(base, expert_model, toy_switch, prompt, options=options,
                                 threshold=0.5)
    wrong = [((token + 1) % base.vocab_size, provenance) for token, provenance in reference]
    with pytest.raises(AssertionError, match="no numerical tie"):
        assert_same_up_to_a_tie(wrong, reference, base=base, expert_model=expert_model,
                                switch=toy_switch, prompt=prompt, options=options, threshold=0.5)


def test_toy_pair_extremes_are_the_base_alone_and_the_expert_alone(
        toy_pair: Any, toy_models: tuple[Any, Any], toy_switch: Any) -> None:
    base, expert_model = toy_models
    prompt = base.tokenize(toy_prompts(toy_pair)[0], add_bos=True)

    def decode(threshold: float) -> list[int]:
        decoder = CoDecoder(base=base, switch=toy_switch, expert=InProcessExpert(expert_model),
                            options=DecodingOptions(threshold=threshold, max_tokens=16))
        return decoder.generate(prompt).token_ids

    base_alone = []
    base.reset()
    logits = base.decode(prompt, last_only=True).logits[-1]
    while len(base_alone) < 16:
        base_alone.append(int(np.argmax(logits)))
        if base.is_end_of_generation(base_alone[-1]):
            break
        logits = base.decode(base_alone[-1:]).logits[-1]
    assert decode(1.0) == base_alone
    expert_alone = InProcessExpert(expert_model).continue_(session="alone", held=0, tokens=prompt,
                                                           max_tokens=16).tokens
    assert decode(0.0) == expert_alone


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_the_real_gateway_gives_the_answers_of_the_in_process_expert(
        toy_pair: Any, toy_models: tuple[Any, Any], toy_switch: Any,
        tmp_path: Path, temperature: float) -> None:
    """CoDecoder -> HttpExpert -> uvicorn -> gateway -> llama.cpp samples like InProcessExpert."""
    from client.expert import HttpExpert
    from expert_gateway.app import create_app
    from expert_gateway.backends.llama_cpp import LlamaCppBackend
    from expert_gateway.settings import GatewaySettings
    from tests.expert_gateway.conftest import serve

    base, expert_model = toy_models
    prompt = base.tokenize(toy_prompts(toy_pair)[1], add_bos=True)
    options = DecodingOptions(threshold=0.5, lookahead=4, temperature=temperature, seed=3,
                              max_tokens=12)
    local = CoDecoder(base=base, switch=toy_switch, expert=InProcessExpert(expert_model),
                      options=options).generate(prompt)
    backend = LlamaCppBackend.open(toy_pair.expert_gguf, name="toy-expert", n_ctx=1024,
                                   n_batch=256, n_threads=1, slots=2)
    settings = GatewaySettings(auth={"enabled": False, "keys_file": tmp_path / "keys.json"})
    with serve(create_app(settings, backend=backend)) as url:
        expert = HttpExpert(url, model="toy-expert", tokenizer=base.fingerprint, timeout_s=30.0)
        remote = CoDecoder(base=base, switch=toy_switch, expert=expert,
                           options=options).generate(prompt)
        expert.close()
    pairs = [[(token.token_id, token.provenance) for token in result.tokens]
             for result in (remote, local)]
    assert_same_up_to_a_tie(pairs[0], pairs[1], base=base, expert_model=expert_model,
                            switch=toy_switch, prompt=prompt, options=options, threshold=0.5)
    assert remote.egress.calls == local.egress.calls > 0
    assert remote.egress.failures == 0
