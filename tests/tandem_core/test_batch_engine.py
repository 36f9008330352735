"""The batching engine on the real toy base: one llama_decode per step over every live sequence.

Exactness: answers decoded together (with deferrals to a real expert model, slow and failing
expert calls) give the tokens each gives decoded alone, up to a genuine numerical tie, which is
checked as in test_decoding.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.decoding import CoDecoder, DecodingOptions
from client.errors import ExpertUnavailableError
from client.expert import ExpertReply, InProcessExpert
from client.serving import DecoderPool
from tandem_core.base_model import BaseModel, LlamaModel
from tandem_core.batch_engine import (
    BatchEngine,
    CancelledError,
    RunAhead,
    SequenceSwitch,
    _Latch,
)
from tandem_core.errors import ModelLoadError
from tests.client.test_decoding import NUMERICAL_NOISE, fragile_draw, toy_prompts

PARALLEL = 4


@pytest.fixture(scope="module")
def solo(toy_pair: Any) -> Iterator[tuple[LlamaModel, LlamaModel]]:
    """The toy base with one sequence (decoding alone) and the toy expert model."""
    # Flash attention, as serving runs it: rows then do not depend on the batch's split.
    base = LlamaModel(toy_pair.base_gguf, n_ctx=512, flash_attention=True)
    expert = LlamaModel(toy_pair.expert_gguf, n_ctx=512, flash_attention=True)
    yield base, expert
    base.close()
    expert.close()


@pytest.fixture(scope="module")
def shared(toy_pair: Any) -> Iterator[LlamaModel]:
    """The toy base with PARALLEL sequences of 512 tokens, one KV stream each."""
    base = LlamaModel(toy_pair.base_gguf, n_ctx=512 * PARALLEL, n_seq_max=PARALLEL,
                      n_ctx_seq=512, n_batch=256, flash_attention=True)
    yield base
    base.close()


@pytest.fixture(scope="module")
def head(solo: tuple[LlamaModel, LlamaModel], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from client.switch import BASE_FINGERPRINT_KEY, HIDDEN_SIZE_KEY, THRESHOLD_KEY, OnnxSwitch
    from tests.client.test_switch import write_linear_head

    base, _ = solo
    weights = np.random.default_rng(7).normal(size=base.hidden_size).astype(np.float32)
    weights *= 3.0 / np.sqrt(base.hidden_size)
    path = write_linear_head(tmp_path_factory.mktemp("head") / "switch.onnx", weights, 0.0,
                             metadata={HIDDEN_SIZE_KEY: str(base.hidden_size),
                                       BASE_FINGERPRINT_KEY: base.fingerprint,
                                       THRESHOLD_KEY: "0.5"})
    return OnnxSwitch.for_base(Path(path), base)


@dataclass
class ScriptedExpert:
    """The real toy expert model behind a lock, slow and failing on a per-answer schedule.

    Failures depend on the answer's own call count, so an answer meets the same failures
    whether it runs alone or among others.
    """

    llm: LlamaModel
    lock: threading.Lock
    delay_s: float = 0.0
    fail_every: int = 0
    destination: str = "in-process"
    model: str = "toy-expert"
    calls: int = 0

    def __post_init__(self) -> None:
        self.inner = InProcessExpert(self.llm)

    def continue_(self, *, session: str, held: int, tokens: Sequence[int], max_tokens: int,
                  temperature: float = 0.0, seed: int | None = None,
                  top_logprobs: int = 0, before_retry: object = None) -> ExpertReply:
        self.calls += 1
        time.sleep(self.delay_s)
        if self.fail_every and self.calls % self.fail_every == 0:
            raise ExpertUnavailableError("scripted failure")
        with self.lock:
            return self.inner.continue_(session=session, held=held, tokens=tokens,
                                        max_tokens=max_tokens, temperature=temperature,
                                        seed=seed, top_logprobs=top_logprobs)


def tie_at(index: int, reference: list[tuple[int, str]], *, base: LlamaModel,
           expert_model: LlamaModel, switch: Any, prompt: list[int], options: DecodingOptions,
           threshold: float) -> bool:
    """Whether logit or score noise can flip the token at ``index`` (base, expert or switch)."""
    prefix = prompt + [token for token, _ in reference[:index]]
    base.reset()
    output = base.decode(prefix)
    score = float(switch.score(output.hidden[-1:])[0])
    if abs(score - threshold) < NUMERICAL_NOISE:
        return True
    expert_model.reset()
    candidates = [output.logits[-1], expert_model.decode(prefix).logits[-1]]
    return any(fragile_draw(np.asarray(logits, dtype=np.float64), options=options,
                            position=len(prefix)) for logits in candidates)


def assert_same_up_to_a_tie(ours: list[tuple[int, str]], theirs: list[tuple[int, str]],
                            **context: Any) -> bool:
    """True when identical; False when they part at a genuine tie; fails otherwise."""
    for index, (mine, other) in enumerate(zip(ours, theirs, strict=False)):
        if mine[0] != other[0]:
            assert tie_at(index, theirs, **context), (
                f"diverged at token {index}: {mine} != {other} with no numerical tie")
            return False
    assert len(ours) == len(theirs)
    return True


def run_together(engine: BatchEngine, switch: Any, jobs: list[dict[str, Any]]
                 ) -> list[list[tuple[int, str]]]:
    """Decode every job at once, one thread each, on the engine's sequences."""
    results: list[list[tuple[int, str]]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def make(view: Any, scored: Any, parking: Any) -> CoDecoder:
        return CoDecoder(base=view, switch=scored, expert=parking, seq=view.seq)

    pool = DecoderPool(engine, switch=switch, expert=None, make=make)
    # Every answer holds its sequence before any decodes: a late-starting thread would otherwise
    # find the others finished, and nothing would share a step.
    started = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        job = jobs[index]
        try:
            with pool.checkout() as decoder:
                started.wait(timeout=60)
                decoder.expert = job["expert"]
                if job["expert"] is not None:
                    from client.serving import ParkingExpert
                    decoder.expert = ParkingExpert(job["expert"], decoder.base)
                decoder.options = job["options"]
                decoder.threshold = job["options"].threshold
                result = decoder.generate(job["prompt"])
                results[index] = [(token.token_id, token.provenance) for token in result.tokens]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return results


def run_alone(base: LlamaModel, switch: Any, job: dict[str, Any]) -> list[tuple[int, str]]:
    base.reset()
    decoder = CoDecoder(base=base, switch=switch, expert=job["solo_expert"],
                        options=job["options"])
    result = decoder.generate(job["prompt"])
    return [(token.token_id, token.provenance) for token in result.tokens]


answer_specs = st.lists(
    st.fixed_dictionaries({
        "prompt": st.integers(0, 7), "threshold": st.floats(0.2, 0.9),
        "lookahead": st.integers(1, 6), "temperature": st.sampled_from([0.0, 0.0, 0.8]),
        "seed": st.integers(0, 2**31), "delay": st.sampled_from([0.0, 0.0, 0.02]),
        "fail_every": st.sampled_from([0, 0, 2, 3]), "expert": st.booleans(),
    }), min_size=2, max_size=PARALLEL)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(specs=answer_specs)
def test_answers_decoded_together_equal_each_decoded_alone(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel, head: Any,
        specs: list[dict[str, Any]]) -> None:
    base, expert_model = solo
    lock = threading.Lock()
    prompts = toy_prompts(toy_pair)
    jobs = []
    for spec in specs:
        options = DecodingOptions(threshold=spec["threshold"], lookahead=spec["lookahead"],
                                  temperature=spec["temperature"], seed=spec["seed"],
                                  max_tokens=12)

        def expert(spec: dict[str, Any] = spec) -> ScriptedExpert | None:
            if not spec["expert"]:
                return None
            return ScriptedExpert(expert_model, lock, delay_s=spec["delay"],
                                  fail_every=spec["fail_every"])

        jobs.append({"prompt": base.tokenize(prompts[spec["prompt"]], add_bos=True),
                     "options": options, "expert": expert(), "solo_expert": expert()})
    # A long gather wait: the first step then holds every prompt even on a loaded machine.
    engine = BatchEngine(shared, scorer=head, gather_s=0.5)
    try:
        together = run_together(engine, head, jobs)
    finally:
        engine.close()
    for job, ours in zip(jobs, together, strict=True):
        alone = run_alone(base, head, job)
        assert_same_up_to_a_tie(ours, alone, base=base, expert_model=expert_model, switch=head,
                                prompt=job["prompt"], options=job["options"],
                                threshold=job["options"].threshold)
    if len(jobs) > 1:
        assert engine.stats.max_sequences > 1  # they really shared steps


def test_the_model_and_a_view_of_one_sequence_are_both_base_models(shared: LlamaModel) -> None:
    """The decoder takes either; a view answers for its own sequence and the shared tokenizer."""
    view = BatchEngine(shared).view(2)
    assert isinstance(shared, BaseModel) and isinstance(view, BaseModel)
    assert (view.n_ctx, view.vocab_size, view.fingerprint) == (512, shared.vocab_size,
                                                                shared.fingerprint)
    assert view.tokenize("1+2=", add_bos=True) == shared.tokenize("1+2=", add_bos=True)
    assert view.detokenize(view.tokenize("1+2=")) == b"1+2="


def test_a_step_is_one_decode_over_every_live_sequence(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    base, _ = solo
    prompts = [base.tokenize(text, add_bos=True) for text in toy_prompts(toy_pair)[:PARALLEL]]
    engine = BatchEngine(shared)
    outputs: dict[int, list[int]] = {}

    def greedy(seq: int) -> None:
        view = engine.view(seq)
        view.open()
        view.reset()
        logits = view.decode(prompts[seq], last_only=True).logits[-1]
        tokens = []
        for _ in range(10):
            tokens.append(int(np.argmax(logits)))
            logits = view.decode(tokens[-1:]).logits[-1]
        view.close()
        outputs[seq] = tokens

    threads = [threading.Thread(target=greedy, args=(seq,)) for seq in range(PARALLEL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    engine.close()
    assert engine.stats.max_sequences == PARALLEL
    # 4 prefills and 40 single-token decodes took far fewer than 44 steps.
    assert engine.stats.steps < 2 * (10 + 1) + 4
    for seq in range(PARALLEL):
        base.reset()
        logits = base.decode(prompts[seq], last_only=True).logits[-1]
        alone = []
        for _ in range(10):
            alone.append(int(np.argmax(logits)))
            logits = base.decode(alone[-1:]).logits[-1]
        assert outputs[seq] == alone


def _greedy_alone(base: LlamaModel, prompt: list[int], tokens: int) -> list[int]:
    base.reset()
    logits = base.decode(prompt, last_only=True).logits[-1]
    alone: list[int] = []
    for _ in range(tokens):
        alone.append(int(np.argmax(logits)))
        logits = base.decode(alone[-1:]).logits[-1]
    return alone


def test_the_engine_runs_ahead_of_a_slow_caller_instead_of_waiting_for_it(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    """A caller busy with its own work between tokens holds back no other sequence's steps."""
    base, _ = solo
    prompts = [base.tokenize(text, add_bos=True) for text in toy_prompts(toy_pair)[:2]]
    # A long gather: an engine that waited for every live caller would pace all by the slowest.
    engine = BatchEngine(shared, gather_s=0.5)
    taken: dict[int, list[int]] = {0: [], 1: []}
    fast_done_while_slow_had = []
    both_open = threading.Barrier(2)

    def greedy(seq: int, pause_s: float) -> None:
        view = engine.view(seq)
        view.open()
        view.reset()
        both_open.wait(10)
        prompt = prompts[seq]
        with view.running_ahead(RunAhead(feed_until=len(prompt) + 19)):
            logits = view.decode(prompt, last_only=True).logits[-1]
            for _ in range(20):
                taken[seq].append(int(np.argmax(logits)))
                time.sleep(pause_s)  # the caller's own work: egress checks, streaming, ...
                if len(taken[seq]) < 20:
                    logits = view.decode(taken[seq][-1:]).logits[-1]
                    assert view.position() == len(prompt) + len(taken[seq])
        if seq == 1:
            fast_done_while_slow_had.append(len(taken[0]))
        view.close()

    threads = [threading.Thread(target=greedy, args=(0, 0.05)),
               threading.Thread(target=greedy, args=(1, 0.0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    engine.close()
    assert fast_done_while_slow_had and fast_done_while_slow_had[0] < 10
    assert engine.stats.ahead_taken >= 30
    for seq in (0, 1):
        assert taken[seq] == _greedy_alone(base, prompts[seq], 20)
        # Nothing decoded ahead is left behind: the sequence holds what its caller decoded.
        assert shared.cached_tokens(seq) == prompts[seq] + taken[seq][:-1]


def test_tokens_fed_ahead_are_dropped_when_the_caller_goes_another_way(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    base, _ = solo
    # One prefill chunk, and no prefix taken from another sequence: a prompt's KV made in other
    # pieces than its prefill alone would not be the same bits.
    prompt = base.tokenize(toy_prompts(toy_pair)[2], add_bos=True)[:100]
    greedy = _greedy_alone(base, prompt, 6)
    engine = BatchEngine(shared, share_prefixes=False)
    view = engine.view(1)
    view.open()
    view.reset()
    with view.running_ahead(RunAhead(feed_until=len(prompt) + 50, depth=4)):
        view.decode(prompt, last_only=True)
        view.decode(greedy[:1])
        deadline = time.monotonic() + 10
        while shared.position(1) < len(prompt) + 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine feeds up to depth=4 tokens past what the caller took
        assert shared.position(1) == len(prompt) + 5
        assert view.position() == len(prompt) + 1
        assert view.cached_tokens() == prompt + greedy[:1]
        other = (greedy[1] + 1) % shared.vocab_size  # not the token the engine guessed
        ours = view.decode([other]).logits[-1]
        # What was fed ahead of `other` is gone; the engine may already run ahead of `other` too
        # (it queues that before the caller wakes), by at most depth tokens.
        held = shared.cached_tokens(1)
        assert held[: len(prompt) + 2] == [*prompt, greedy[0], other]
        assert len(held) <= len(prompt) + 2 + 4
        view.rollback(len(prompt))
        again = view.decode(greedy[:2]).logits[-1]
    view.close()
    engine.close()
    assert engine.stats.ahead_fed >= 5 and engine.stats.ahead_taken == 1  # only greedy[0]
    # The same calls made alone give the same bits (the tokens fed ahead left no trace).
    base.reset()
    base.decode(prompt, last_only=True)
    base.decode(greedy[:1])
    assert np.array_equal(ours, base.decode([other]).logits[-1])
    base.reset()
    base.decode(prompt, last_only=True)
    assert np.array_equal(again, base.decode(greedy[:2]).logits[-1])


def test_a_long_prefill_never_freezes_a_running_answer(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    base, _ = solo
    short = base.tokenize(toy_prompts(toy_pair)[0], add_bos=True)
    long_prompt = (base.tokenize(" ".join(toy_prompts(toy_pair)), add_bos=True) * 3)[:400]
    engine = BatchEngine(shared, prefill_chunk=32, gather_s=0.2, share_prefixes=False)
    decoded_during_prefill = []
    prefill_done = threading.Event()
    running = threading.Event()

    def decoder() -> None:
        view = engine.view(0)
        view.open()
        view.reset()
        logits = view.decode(short, last_only=True).logits[-1]
        running.set()
        for _ in range(40):
            logits = view.decode([int(np.argmax(logits))]).logits[-1]
            if not prefill_done.is_set():
                decoded_during_prefill.append(1)
        view.close()

    def prefiller() -> None:
        running.wait(30)
        view = engine.view(1)
        view.open()
        view.reset()
        view.decode(long_prompt, last_only=True)
        prefill_done.set()
        view.close()

    threads = [threading.Thread(target=decoder), threading.Thread(target=prefiller)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    engine.close()
    # The prompt takes len/32 steps in chunks of 32; the running answer got a token in (nearly)
    # each of them instead of waiting for the whole prefill.
    assert len(long_prompt) >= 150
    assert len(decoded_during_prefill) >= (len(long_prompt) - 64) // 32 - 1


def test_a_shared_prompt_prefix_is_taken_from_another_sequence(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    base, _ = solo
    prefix = base.tokenize(" ".join(toy_prompts(toy_pair)[:3]), add_bos=True)[:120]
    first = prefix + base.tokenize(" first", add_bos=False)
    second = prefix + base.tokenize(" second one", add_bos=False)
    engine = BatchEngine(shared)
    for seq in (0, 1):
        shared.reset(seq)
    engine.view(0).decode(first, last_only=True)
    output = engine.view(1).decode(second, last_only=True)
    engine.close()
    assert engine.stats.shared_prefix_tokens >= 100
    assert shared.cached_tokens(1) == second
    base.reset()
    alone = base.decode(second, last_only=True)
    # The prefix's KV was computed in the other sequence's batch, not in this prompt's: the
    # logits agree closely, not to the bit (toy base, flash attention: up to ~1.5e-2).
    assert np.abs(output.logits[-1] - alone.logits[-1]).max() < 5e-2
    assert int(np.argmax(output.logits[-1])) == int(np.argmax(alone.logits[-1]))


def test_a_cancelled_sequence_gets_no_more_steps(shared: LlamaModel) -> None:
    engine = BatchEngine(shared)
    cancelled = threading.Event()
    view = engine.view(2)
    view.open(cancelled=cancelled)
    view.reset()
    view.decode([1, 2, 3], last_only=True)
    cancelled.set()
    with pytest.raises(CancelledError):
        view.decode([4])
    view.close()
    assert engine.live == 0
    engine.close()


def test_the_switch_reads_the_engine_scores_of_its_latest_rows(
        shared: LlamaModel, head: Any) -> None:
    engine = BatchEngine(shared, scorer=head)
    view = engine.view(3)
    view.reset()
    switch = SequenceSwitch(view, head)
    output = view.decode([1, 5, 7, 9])
    engine.close()
    batched = switch.score(output.hidden[:-1])
    single = switch.score(output.hidden[-1][None, :])
    assert switch.direct_calls == 0
    direct = head.score(output.hidden)
    assert np.allclose(batched, direct[:-1], atol=1e-6)
    assert np.allclose(single, direct[-1:], atol=1e-6)
    assert np.allclose(switch.score(output.hidden[1:3]), direct[1:3], atol=1e-6)
    assert np.allclose(switch.score(output.hidden[2][None, :]), direct[2:3], atol=1e-6)
    assert switch.direct_calls == 0
    switch.score(output.hidden.copy())  # not a view of the engine's rows: scored directly
    assert switch.direct_calls == 1
    every_other = switch.score(output.hidden[::2])  # rows of it, but not as the engine has them
    assert switch.direct_calls == 2
    assert np.allclose(every_other, direct[::2], atol=1e-6)


def test_an_engine_output_carries_the_argmax_of_its_last_row(shared: LlamaModel) -> None:
    engine = BatchEngine(shared)
    view = engine.view(2)
    view.reset()
    try:
        prompt = view.decode([1, 5, 7, 9], last_only=True)
        step = view.decode([int(np.argmax(prompt.logits[-1]))])
    finally:
        engine.close()
    for output in (prompt, step):
        assert output.last_argmax == int(np.argmax(output.logits[-1]))


def test_a_kv_cache_that_does_not_fit_is_refused_at_start(
        toy_pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import tandem_core.base_model

    monkeypatch.setattr(tandem_core.base_model, "available_memory_bytes", lambda: 1024)
    with pytest.raises(ModelLoadError, match="lower max_parallel or n_ctx"):
        LlamaModel(toy_pair.base_gguf, n_ctx=4096, n_seq_max=8, n_ctx_seq=512)


def test_the_worker_runs_max_parallel_jobs_at_once_and_admits_in_turn() -> None:
    from client.model_worker import ModelWorker, current_cancel

    worker = ModelWorker(max_queue=16, max_per_client=8, max_parallel=2)
    gate = threading.Event()
    started: list[str] = []
    seen_cancel: list[object] = []
    lock = threading.Lock()

    def job(name: str) -> Any:
        def run() -> None:
            with lock:
                started.append(name)
                seen_cancel.append(current_cancel())
            gate.wait(10)
        return run

    skipped = threading.Event()
    skipped.set()
    worker.submit("a", job("a1"))
    worker.submit("a", job("a2"))
    worker.submit("a", job("a3"))
    worker.submit("b", job("b1"))
    worker.submit("c", job("never"), cancelled=skipped)
    worker.start()
    deadline = time.monotonic() + 5
    while len(started) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert sorted(started) == ["a1", "b1"] and worker.running == 2  # b's turn came before a2
    gate.set()
    worker.stop()
    assert sorted(started) == ["a1", "a2", "a3", "b1"]
    assert all(isinstance(event, threading.Event) for event in seen_cancel)


def test_a_prompt_is_cut_at_the_same_places_alone_and_among_others(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's rows change with how a prompt is split, so the split must not depend on
    what else is pending (here a 100-token prompt would leave the long one a 28-token piece)."""
    base, _ = solo
    words = base.tokenize(" ".join(toy_prompts(toy_pair)), add_bos=True) * 3
    long_prompt, short_prompt = words[:300], words[5:105]
    pieces: list[tuple[int, int]] = []
    decode_pieces = shared.decode_pieces

    def recording(batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        pieces.extend((seq, len(tokens)) for seq, tokens in batch)
        decode_pieces(batch)

    monkeypatch.setattr(shared, "decode_pieces", recording)

    def cuts(prompts: dict[int, list[int]]) -> tuple[list[int], np.ndarray]:
        engine = BatchEngine(shared, share_prefixes=False, gather_s=0.5)
        pieces.clear()
        outputs: dict[int, np.ndarray] = {}

        def prefill(seq: int) -> None:
            view = engine.view(seq)
            view.open()
            view.reset()
            outputs[seq] = view.decode(prompts[seq], last_only=True).logits[-1]
            view.close()

        threads = [threading.Thread(target=prefill, args=(seq,)) for seq in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        engine.close()
        return [length for seq, length in pieces if seq == 0], outputs[0]

    alone_cuts, alone_row = cuts({0: long_prompt})
    together_cuts, together_row = cuts({0: long_prompt, 1: short_prompt})
    assert alone_cuts == together_cuts == [128, 128, 44]
    assert np.array_equal(alone_row, together_row)


def test_an_unseeded_sampled_answer_also_runs_ahead(
        toy_pair: Any, shared: LlamaModel, head: Any) -> None:
    """Unseeded temperature sampling draws a seed per answer, so the engine can repeat its draws."""
    engine = BatchEngine(shared, scorer=head)
    pool = DecoderPool(engine, switch=head, expert=None, make=lambda view, scored, _: CoDecoder(
        base=view, switch=scored, expert=None, seq=view.seq,
        options=DecodingOptions(temperature=0.8, threshold=1.0, max_tokens=12)))
    prompt = shared.tokenize(toy_prompts(toy_pair)[1], add_bos=True)
    answers = []
    for _ in range(2):
        with pool.checkout() as decoder:
            answers.append(decoder.generate(prompt).token_ids)
    engine.close()
    # Every token the answers decoded (all but each answer's last) was fed ahead and taken.
    assert engine.stats.ahead_taken == sum(len(answer) - 1 for answer in answers) > 0


def test_the_engine_thread_gets_the_interpreter_lock_back_soon(shared: LlamaModel) -> None:
    """Starting the engine shortens the GIL switch interval (with CPython's default 5 ms, answer
    threads keep the lock while a step's rows are ready; see tandem_core.interpreter for the
    measurements), and never lengthens a shorter one."""
    import sys

    from tandem_core.interpreter import SWITCH_INTERVAL_S, favour_engine_threads

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        engine = BatchEngine(shared)
        view = engine.view(3)
        view.open()
        view.reset()
        view.decode([1, 2, 3], last_only=True)
        view.close()
        engine.close()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S, abs=2e-6)
        sys.setswitchinterval(0.0001)
        favour_engine_threads()
        assert sys.getswitchinterval() == pytest.approx(0.0001, abs=2e-6)  # kept (microseconds)
    finally:
        sys.setswitchinterval(before)


def test_the_pool_lends_the_lowest_free_sequence(shared: LlamaModel) -> None:
    """Busy sequences stay a run of consecutive ids, which llama.cpp decodes in one pass
    (``LlamaModel.decode_pieces``); lending the last one returned left gaps (0, 2 busy)."""
    engine = BatchEngine(shared)
    pool = DecoderPool(engine, switch=None, expert=None,
                       make=lambda view, scored, _: CoDecoder(base=view, switch=scored,
                                                              expert=None, seq=view.seq))
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        lent = [first.enter_context(pool.checkout()).seq,
                second.enter_context(pool.checkout()).seq]
        with pool.checkout() as third:
            lent.append(third.seq)
        second.close()
        assert lent == [0, 1, 2]
        with pool.checkout() as again, pool.checkout() as after:
            assert (again.seq, after.seq) == (1, 2)
    engine.close()


def test_rows_wanted_for_every_token_are_computed_even_where_another_sequence_holds_them(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    """Only a prompt that wants its last row alone may skip a prefix held elsewhere: a request
    for every row (an expert span, a gateway session's prompt) got fewer rows than tokens."""
    base, _ = solo
    tokens = base.tokenize(" ".join(toy_prompts(toy_pair)[:3]), add_bos=True)[:80]
    engine = BatchEngine(shared)
    for seq in (0, 1):
        shared.reset(seq)
    engine.view(0).decode(tokens, last_only=True)
    output = engine.view(1).decode(tokens)
    engine.close()
    assert output.logits.shape[0] == len(tokens)
    assert engine.stats.shared_prefix_tokens == 0


def test_a_closed_sequences_prompt_is_restored_from_the_prompt_cache_into_another(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    from tandem_core.prompt_cache import PromptCache

    base, _ = solo
    prompt = base.tokenize(" ".join(toy_prompts(toy_pair)[:2]), add_bos=True)[:60]
    cache = PromptCache(64 * 2**20)
    engine = BatchEngine(shared, share_prefixes=False, prompt_cache=cache)
    for seq in range(PARALLEL):
        shared.reset(seq)
    first = engine.view(0)
    first.open()
    before = first.decode(prompt, last_only=True)
    greedy = int(np.argmax(before.logits[-1]))
    first.decode([greedy])
    first.close()
    second = engine.view(2)
    second.open()
    again = second.decode(prompt, last_only=True)  # the engine saves sequence 0 first
    second.close()
    engine.close()
    assert len(cache) == 1 and cache.longest(prompt)[1] == len(prompt)
    assert engine.stats.restored_prefix_tokens == len(prompt) - 1  # the last one is decoded
    assert shared.cached_tokens(2) == prompt
    # The prefix's KV is the saved one, bit for bit; only the last prompt token's row is
    # computed in a batch of its own rather than in the prompt's.
    assert np.abs(again.logits[-1] - before.logits[-1]).max() < 5e-2
    assert int(np.argmax(again.logits[-1])) == greedy


def test_a_new_prompt_gets_a_step_of_its_own_before_the_running_answers_rows(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp computes decode rows and a prompt in separate passes anyway and returns every
    row at the end of the call; the prompt alone first gives its first token a step sooner."""
    base, _ = solo
    prompts = toy_prompts(toy_pair)
    running_prompt = base.tokenize(prompts[0], add_bos=True)[:30]
    new_prompt = base.tokenize(prompts[1], add_bos=True)[:20]
    steps: list[list[tuple[int, int]]] = []
    decode_pieces = shared.decode_pieces

    def recorded(pieces: Sequence[tuple[int, Sequence[int]]]) -> None:
        steps.append([(seq, len(tokens)) for seq, tokens in pieces])
        decode_pieces(pieces)

    monkeypatch.setattr(shared, "decode_pieces", recorded)
    engine = BatchEngine(shared, share_prefixes=False, gather_s=0.0)
    for seq in (0, 1):
        shared.reset(seq)
    answer, newcomer = engine.view(0), engine.view(1)
    answer.open()
    logits = answer.decode(running_prompt, last_only=True).logits[-1]
    done = threading.Event()

    def keep_decoding() -> None:
        nonlocal logits
        # Running ahead: the engine always holds this answer's next row when the prompt comes.
        with answer.running_ahead(RunAhead(feed_until=len(running_prompt) + 400)):
            while not done.is_set():
                logits = answer.decode([int(np.argmax(logits))]).logits[-1]

    thread = threading.Thread(target=keep_decoding)
    thread.start()
    time.sleep(0.05)
    newcomer.open()
    first = newcomer.decode(new_prompt, last_only=True)
    done.set()
    thread.join(30)
    answer.close()
    newcomer.close()
    engine.close()
    with_prompt = [step for step in steps if (1, len(new_prompt)) in step]
    assert with_prompt == [[(1, len(new_prompt))]]  # alone, although answer 0 was decoding
    after = steps[steps.index(with_prompt[0]) + 1]
    assert after == [(0, 1)]  # answer 0's row, left out once, goes next
    shared.reset(1)
    alone = shared.decode(new_prompt, seq=1, last_only=True)
    np.testing.assert_array_equal(first.logits[-1], alone.logits[-1])


def test_forgetting_prompts_empties_the_cache_and_idle_sequences_not_busy_ones(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    """A document deletion calls ``forget_prompts``: no KV of an earlier prompt stays to be
    restored or reused, except in sequences whose answers are still running."""
    from tandem_core.prompt_cache import PromptCache

    base, _ = solo
    prompt = base.tokenize(toy_prompts(toy_pair)[0], add_bos=True)[:30]
    cache = PromptCache(64 * 2**20)
    engine = BatchEngine(shared, share_prefixes=False, prompt_cache=cache)
    for seq in range(PARALLEL):
        shared.reset(seq)
    finished, running = engine.view(0), engine.view(1)
    finished.open()
    finished.decode(prompt, last_only=True)
    finished.close()
    running.open()
    running.decode(prompt[:20], last_only=True)  # the engine saves sequence 0 first
    assert len(cache) == 1
    engine.forget_prompts()
    assert len(cache) == 0 and cache.nbytes == 0
    assert shared.cached_tokens(0) == []
    assert shared.cached_tokens(1) == prompt[:20]
    running.decode(prompt[20:22])  # the running answer goes on
    running.close()
    engine.close()
    assert shared.cached_tokens(1) == prompt[:22]


def test_a_request_latch_blocks_its_waiters_until_set_and_then_never_again() -> None:
    latch = _Latch()
    passed: list[str] = []
    waiters = [threading.Thread(target=lambda name=name: (latch.wait(), passed.append(name)))
               for name in ("caller", "settler")]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.05)
    assert passed == [] and not latch.is_set()
    latch.set()
    latch.set()  # a second set changes nothing (and does not release an unheld lock)
    for waiter in waiters:
        waiter.join(timeout=5)
    assert sorted(passed) == ["caller", "settler"] and latch.is_set()
    latch.wait()  # open for good


def test_a_caller_running_ahead_is_woken_once_a_burst_and_at_once_at_the_end(
        toy_pair: Any, solo: tuple[LlamaModel, LlamaModel], shared: LlamaModel) -> None:
    base, _ = solo
    prompt = base.tokenize(toy_prompts(toy_pair)[3], add_bos=True)[:60]
    wanted = _greedy_alone(base, prompt, 24)
    engine = BatchEngine(shared, share_prefixes=False, wake_every=4)
    taken: list[int] = []

    def caller() -> None:
        view = engine.view(2)
        view.open()
        view.reset()
        with view.running_ahead(RunAhead(feed_until=len(prompt) + 23)):
            logits = view.decode(prompt, last_only=True).logits[-1]
            while len(taken) < 24:
                taken.append(int(np.argmax(logits)))
                if len(taken) < 24:
                    logits = view.decode(taken[-1:]).logits[-1]
        view.close()

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join(60)  # the last token stops the chain: a caller still held would hang here
    engine.close()
    assert not thread.is_alive()
    assert taken == wanted
    stats = engine.stats
    assert stats.ahead_taken == 23
    # A caller as fast as this one takes each token while it is decoded and waits for it: woken
    # once a token, it would count about 23 wake-ups.
    assert 1 <= stats.ahead_wakeups <= 23 // 4 + 2
