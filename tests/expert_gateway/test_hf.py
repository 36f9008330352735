"""The transformers backend on a tiny randomly initialised Llama (CUDA when present, else CPU).

Runs wherever torch and transformers are installed: on the CPU every step runs eagerly through
the same step function that CUDA captures as graphs; the tests marked ``cuda`` compare graph
replays with eager steps and run only where a GPU is present.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from expert_gateway.app import create_app
from expert_gateway.backends.base import ContinueOptions, token_logprob
from expert_gateway.errors import BackendError
from expert_gateway.settings import GatewaySettings
from tandem_core.protocol import ScoreSequence, log_softmax, sample_from_logits

from .conftest import gateway_settings, serve

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from expert_gateway.backends.hf import FINGERPRINT_FILE, HfBackend, _Job  # noqa: E402
from expert_gateway.backends.hf_process import ProcessBackend  # noqa: E402
from expert_gateway.backends.static_kv import RowFeed, StaticKVEngine  # noqa: E402

FINGERPRINT = "0123456789abcdef" * 4
VOCAB = 96


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, eos_token_id=VOCAB - 1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits so greedy choices are far from ties
        model.lm_head.weight.mul_(8.0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    (folder / FINGERPRINT_FILE).write_text(FINGERPRINT)
    return folder


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir: Path) -> Iterator[HfBackend]:
    backend = HfBackend.open(tiny_model_dir, name="tiny", device=DEVICE, dtype="float32", max_batch=16,
                             max_context=256, slots=64)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def small_backend(tiny_model_dir: Path) -> Iterator[HfBackend]:
    """Three slots, two rows, prefill alone above 4 new tokens in chunks of 16."""
    backend = HfBackend.open(tiny_model_dir, name="tiny", device=DEVICE, dtype="float32", max_batch=2,
                             max_context=128, slots=3, batch_prefill_tokens=4, prefill_chunk=16)
    yield backend
    backend.close()


def _reference_logits(backend: HfBackend, tokens: list[int]) -> np.ndarray:
    """The next-token logits of an uncached forward pass of transformers' own model."""
    with torch.inference_mode():
        logits = backend._model(input_ids=torch.tensor([tokens], device=backend._device)).logits
    return np.asarray(logits[0, -1].float().cpu().numpy())


def _reference_greedy(backend: HfBackend, prompt: list[int], count: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache, no batching."""
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(_reference_logits(backend, tokens).argmax()))
        if tokens[-1] == VOCAB - 1:
            break
    return tokens[len(prompt):]


def _prompt(index: int) -> list[int]:
    rng = np.random.default_rng(index)
    return [int(token) for token in rng.integers(0, VOCAB - 1, size=5 + index % 7)]


def test_greedy_span_equals_uncached_forward_passes(hf_backend: HfBackend) -> None:
    prompt = _prompt(1)
    reply = hf_backend.continue_("g", prompt, options=ContinueOptions(max_tokens=6))
    assert reply.tokens == _reference_greedy(hf_backend, prompt, 6)


def test_session_reuse_prefills_only_new_tokens(hf_backend: HfBackend) -> None:
    prompt = _prompt(2)
    first = hf_backend.continue_("r", prompt, options=ContinueOptions(max_tokens=4))
    extended = [*prompt, *first.tokens[:3], 7]
    again = hf_backend.continue_("r", extended, options=ContinueOptions(max_tokens=3))
    fresh = hf_backend.continue_("r-fresh", extended, options=ContinueOptions(max_tokens=3))
    assert again.reused_tokens == len(prompt) + 3 and again.prefilled_tokens == 1
    assert again.tokens == fresh.tokens == _reference_greedy(hf_backend, extended, 3)


def test_seeded_sampling_span_equals_token_by_token(hf_backend: HfBackend) -> None:
    prompt = _prompt(3)
    options = ContinueOptions(max_tokens=5, temperature=1.0, seed=9)
    span = hf_backend.continue_("s", prompt, options=options).tokens
    steps: list[int] = []
    for _ in span:
        steps += hf_backend.continue_("s2", prompt + steps, options=ContinueOptions(
            max_tokens=1, temperature=1.0, seed=9)).tokens
    assert steps == span


def _schedule(backend: HfBackend, jobs: list[_Job], *,
              before_steps: Callable[[], None] = lambda: None) -> None:
    """Admit ``jobs`` together, then step them to the end, as the scheduler loop does.

    Runs the scheduler's own functions as one piece of work on the scheduler thread, with no
    other call in flight, so the composition of each batch is deterministic.
    """

    def run() -> None:
        for job in jobs:
            backend._admit(job)
        before_steps()
        while backend._rows or backend._launched:
            backend._retire_complete()
            backend._step()

    backend._call(run)


def test_ragged_new_tokens_of_many_sessions_share_one_step(hf_backend: HfBackend) -> None:
    """Sessions bringing 1..6 new tokens over caches of different lengths run as one batch."""
    prompts = [_prompt(20 + index) for index in range(6)]
    for index, prompt in enumerate(prompts):
        hf_backend.continue_(f"ragged{index}", prompt, options=ContinueOptions(max_tokens=1))
    extended = [prompt + _prompt(40 + index)[:1 + index] for index, prompt in enumerate(prompts)]
    jobs = [_Job(f"ragged{index}", sequence, ContinueOptions(max_tokens=4))
            for index, sequence in enumerate(extended)]
    first_step = len(hf_backend.steps)
    _schedule(hf_backend, jobs)
    assert (hf_backend.steps[first_step], hf_backend.widths[first_step]) == (6, 6)
    for job, sequence, prompt in zip(jobs, extended, prompts, strict=True):
        assert job.reused == len(prompt)
        assert job.tokens == job.future.result()[0] == _reference_greedy(hf_backend, sequence, 4)


def test_session_evicted_mid_call_does_not_break_its_batch(hf_backend: HfBackend) -> None:
    prompts = [_prompt(60), _prompt(61)]
    for index, prompt in enumerate(prompts):
        hf_backend.continue_(f"evicted{index}", prompt, options=ContinueOptions(max_tokens=1))
    jobs = [_Job(f"evicted{index}", [*prompt, 3, 4], ContinueOptions(max_tokens=3))
            for index, prompt in enumerate(prompts)]
    _schedule(hf_backend, jobs, before_steps=lambda: hf_backend.forget("evicted0"))
    for job in jobs:
        assert job.future.result()[0] == _reference_greedy(hf_backend, job.sequence, 3)


def test_score_matches_a_forward_pass(hf_backend: HfBackend) -> None:
    tokens = _prompt(4) + _prompt(5)
    result = hf_backend.score([ScoreSequence(tokens=tokens, start=2)])[0]
    with torch.inference_mode():
        logits = hf_backend._model(input_ids=torch.tensor([tokens], device=hf_backend._device)).logits
    expected = log_softmax(logits[0, 1:-1].double().cpu().numpy())
    np.testing.assert_allclose(result.logprobs, expected[np.arange(len(tokens) - 2), tokens[2:]], atol=1e-4)


def test_concurrent_http_sessions_are_batched_and_equal_sequential(
        tmp_path_factory: pytest.TempPathFactory, hf_backend: HfBackend) -> None:
    settings = gateway_settings(tmp_path_factory.mktemp("hf") / "keys.json", auth={"enabled": False})
    bodies = [{"session": f"h{index}", "model": "tiny", "held": 0, "tokens": _prompt(10 + index),
               "max_tokens": 8, "tokenizer": FINGERPRINT} for index in range(8)]
    app = create_app(settings, backend=hf_backend)
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        sequential = [client.post("/v1/continue", json=body).json()["tokens"] for body in bodies]
        hf_backend.steps.clear()
        restarted = [{**body, "session": f"p{index}"} for index, body in enumerate(bodies)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(lambda body: client.post("/v1/continue", json=body).json()["tokens"],
                                     restarted))
    assert parallel == sequential
    assert max(hf_backend.steps) > 1  # decode steps of different sessions ran in one batch


def test_the_gateway_awaits_hf_calls_on_its_event_loop(
        tmp_path_factory: pytest.TempPathFactory, hf_backend: HfBackend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls reach the backend through ``continue_async`` (no worker thread waits per call):
    with the blocking ``continue_`` broken, the gateway still answers, and exactly."""
    from expert_gateway.backends.base import ContinuesAsync

    def blocking(*args: object, **kwargs: object) -> None:
        raise AssertionError("the gateway parked a worker thread on the call")

    assert isinstance(hf_backend, ContinuesAsync)
    monkeypatch.setattr(hf_backend, "continue_", blocking)
    settings = gateway_settings(tmp_path_factory.mktemp("hf") / "keys.json", auth={"enabled": False})
    body = {"session": "aw", "model": "tiny", "held": 0, "tokens": _prompt(31), "max_tokens": 5,
            "tokenizer": FINGERPRINT}
    app = create_app(settings, backend=hf_backend)
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        reply = client.post("/v1/continue", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["tokens"] == _reference_greedy(hf_backend, _prompt(31), 5)


def test_a_cancelled_awaited_call_leaves_the_scheduler_serving(hf_backend: HfBackend) -> None:
    """A caller cancelled while it awaits must not cancel the future the scheduler thread
    resolves (setting a cancelled future's result would raise on that thread and stop it)."""
    import asyncio

    async def cancel_one_then_call() -> list[int]:
        waiting = asyncio.ensure_future(hf_backend.continue_async(
            "cancelled", _prompt(40), options=ContinueOptions(max_tokens=30)))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        reply = await hf_backend.continue_async("after", _prompt(41), options=ContinueOptions(max_tokens=3))
        return reply.tokens

    assert asyncio.run(cancel_one_then_call()) == _reference_greedy(hf_backend, _prompt(41), 3)
    assert hf_backend._thread.is_alive()
    again = hf_backend.continue_("cancelled", _prompt(40), options=ContinueOptions(max_tokens=3))
    assert again.tokens == _reference_greedy(hf_backend, _prompt(40), 3)


def test_sessions_beyond_the_slots_reuse_the_least_recent_slot_and_stay_exact(
        small_backend: HfBackend) -> None:
    """Five sessions over three slots: evicted ones prefill again, every answer stays exact."""
    sequences = {f"lru{index}": _prompt(70 + index) for index in range(5)}
    evictions = small_backend.table.evictions
    for _ in range(2):
        for session, sequence in sequences.items():
            reply = small_backend.continue_(session, sequence, options=ContinueOptions(max_tokens=2))
            assert reply.tokens == _reference_greedy(small_backend, sequence, 2)
            sequence += [*reply.tokens, 5]
    assert small_backend.table.evictions - evictions >= 5
    assert len(small_backend.table.held()) == 3


def test_long_new_runs_prefill_alone_in_chunks(small_backend: HfBackend) -> None:
    prompt = [int(token) for token in np.random.default_rng(7).integers(0, VOCAB - 1, size=50)]
    steps = len(small_backend.steps)
    reply = small_backend.continue_("long", prompt, options=ContinueOptions(max_tokens=3))
    assert reply.tokens == _reference_greedy(small_backend, prompt, 3)
    assert reply.prefilled_tokens == 50 and len(small_backend.steps) - steps == 2  # only 2 decode steps
    extended = [*prompt, *reply.tokens, *_prompt(8)]  # more than 4 new tokens: alone again
    again = small_backend.continue_("long", extended, options=ContinueOptions(max_tokens=2))
    assert again.reused_tokens == 52 and again.tokens == _reference_greedy(small_backend, extended, 2)


def test_logprobs_and_alternatives_match_the_reference_distribution(hf_backend: HfBackend) -> None:
    prompt = _prompt(5)
    reply = hf_backend.continue_("lp", prompt, options=ContinueOptions(
        max_tokens=3, top_logprobs=4, want_logprobs=True))
    assert reply.logprobs is not None
    sequence = list(prompt)
    for token, got in zip(reply.tokens, reply.logprobs, strict=True):
        expected = token_logprob(_reference_logits(hf_backend, sequence), token, top=4)
        assert got.token == token and got.logprob == pytest.approx(expected.logprob, abs=1e-4)
        assert [index for index, _ in got.top] == [index for index, _ in expected.top]
        np.testing.assert_allclose([value for _, value in got.top], [value for _, value in expected.top],
                                   atol=1e-4)
        sequence.append(token)


def test_seeded_sampling_uses_the_clients_positional_uniforms(hf_backend: HfBackend) -> None:
    """The device's inverse-CDF draw equals the client's own sample_from_logits."""
    prompt = _prompt(6)
    reply = hf_backend.continue_("seeded", prompt, options=ContinueOptions(
        max_tokens=6, temperature=0.7, seed=12345))
    sequence = list(prompt)
    for token in reply.tokens:
        expected = sample_from_logits(_reference_logits(hf_backend, sequence), temperature=0.7,
                                      seed=12345, position=len(sequence))
        assert token == expected
        sequence.append(token)


def test_forget_frees_the_slot(hf_backend: HfBackend) -> None:
    hf_backend.continue_("gone", _prompt(8), options=ContinueOptions(max_tokens=1))
    assert "gone" in hf_backend.table.held()
    hf_backend.forget("gone")
    assert "gone" not in hf_backend.table.held()
    again = hf_backend.continue_("gone", _prompt(8), options=ContinueOptions(max_tokens=1))
    assert again.reused_tokens == 0


def test_sequences_over_the_slot_capacity_fail_alone(small_backend: HfBackend) -> None:
    with pytest.raises(BackendError, match="max_context = 128"):
        small_backend.continue_("big", list(range(90)) * 2, options=ContinueOptions(max_tokens=1))
    reply = small_backend.continue_("fine", _prompt(9), options=ContinueOptions(max_tokens=1))
    assert reply.tokens == _reference_greedy(small_backend, _prompt(9), 1)


def test_slots_that_do_not_fit_fail_at_start_up(tiny_model_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with pytest.raises(BackendError, match=r"1000000000 sessions x 4096 tokens.*lower sessions.max_sessions"):
        StaticKVEngine(model, slots=10**9, capacity=4096, max_batch=8)


def test_models_outside_the_llama_family_are_refused_with_the_alternative() -> None:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    with pytest.raises(BackendError, match="openai_compat"):
        StaticKVEngine(transformers.GPT2LMHeadModel(config), slots=2, capacity=64, max_batch=2)


def test_backend_built_from_settings_sizes_slots_from_max_sessions(tiny_model_dir: Path) -> None:
    from expert_gateway.backends import build_backend

    settings = GatewaySettings.model_validate({
        "sessions": {"max_sessions": 5},
        "model": {"backend": "hf", "preset": "path", "path": str(tiny_model_dir), "name": "tiny"},
        "hf": {"device": DEVICE, "dtype": "float32", "max_context": 64, "max_batch": 4,
               "attention_kernels": ["MATH", "EFFICIENT_ATTENTION"], "engine_process": False,
               "compile_blocks": False}})
    backend = build_backend(settings)
    try:
        assert isinstance(backend, HfBackend) and backend.table.slots == 5
        assert backend.engine.cache.shape[1:3] == (6, 64)  # five slots and the scratch one
        assert backend.engine.attention_candidates == ("MATH", "EFFICIENT_ATTENTION")
        reply = backend.continue_("x", _prompt(11), options=ContinueOptions(max_tokens=2))
        assert reply.tokens == _reference_greedy(backend, _prompt(11), 2)
    finally:
        backend.close()


@cuda
def test_graph_replays_equal_eager_steps(tiny_model_dir: Path) -> None:
    """The same prefills and ragged decode steps on two engines: graphs on and off."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).to("cuda").eval()
    engines = [StaticKVEngine(model, slots=8, capacity=128, max_batch=8, cuda_graphs=graphs)
               for graphs in (True, False)]
    rng = np.random.default_rng(3)
    lengths = [5, 17, 9, 30, 2]
    outputs: list[list[np.ndarray]] = [[], []]
    for engine, seen in zip(engines, outputs, strict=True):
        for row, length in enumerate(lengths):  # eager one-row prefills on both
            engine.step([RowFeed(0, [int(t) for t in np.random.default_rng(row).integers(0, 90, length)])],
                        start=row)
        cached = list(lengths)
        for width in (1, 3, 1, 8, 2, 1):
            feeds = [RowFeed(cached[row], [int(t) for t in rng.integers(0, 90, width)],
                             temperature=0.9 if row % 2 else 0.0, uniform=0.3)
                     for row in range(len(lengths))]
            seen.append(engine.step(feeds))
            cached = [value + width for value in cached]
        rng = np.random.default_rng(3)
    assert engines[0].graphs > 0 and engines[1].graphs == 0
    for graphed, eager in zip(*outputs, strict=True):
        assert graphed[:, 0].tolist() == eager[:, 0].tolist()
        np.testing.assert_allclose(graphed, eager, atol=1e-4)


# -- the engine in its own process (hf.engine_process) ---------------------------------------


@pytest.fixture(scope="module")
def process_backend(tiny_model_dir: Path) -> Iterator[ProcessBackend]:
    backend = ProcessBackend.open(tiny_model_dir, name="tiny", device=DEVICE, dtype="float32",
                                  max_batch=16, max_context=128, slots=12)
    yield backend
    backend.close()


def test_engine_process_answers_exactly_with_logprobs_and_sessions(
        process_backend: ProcessBackend, hf_backend: HfBackend) -> None:
    """Same answers as the in-process backend (same weights); the session's KV stays in its slot."""
    assert process_backend.info == hf_backend.info.model_copy(update={"max_context": 128})
    prompt = _prompt(90)
    options = ContinueOptions(max_tokens=4, top_logprobs=3, want_logprobs=True)
    reply = process_backend.continue_("pg", prompt, options=options)
    local = hf_backend.continue_("pg-local", prompt, options=options)
    assert reply.tokens == local.tokens == _reference_greedy(hf_backend, prompt, 4)
    assert reply.logprobs is not None and local.logprobs is not None
    assert [entry.model_dump() for entry in reply.logprobs] == [
        entry.model_dump() for entry in local.logprobs]
    extended = [*prompt, *reply.tokens, 7]
    again = process_backend.continue_("pg", extended, options=ContinueOptions(max_tokens=2))
    assert (again.reused_tokens, again.prefilled_tokens) == (len(extended) - 2, 2)  # last token unfed
    assert again.tokens == _reference_greedy(hf_backend, extended, 2)
    assert process_backend.stats()["held"]["pg"] == len(extended) + 1


def test_engine_process_batches_concurrent_calls(process_backend: ProcessBackend,
                                                 hf_backend: HfBackend) -> None:
    process_backend.stats(clear=True)
    prompts = [_prompt(100 + index) for index in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda index: process_backend.continue_(
            f"pc{index}", prompts[index], options=ContinueOptions(max_tokens=6)), range(8)))
    for reply, prompt in zip(replies, prompts, strict=True):
        assert reply.tokens == _reference_greedy(hf_backend, prompt, 6)
    assert max(process_backend.stats()["steps"]) > 1


def test_engine_process_calls_are_awaited_and_survive_a_cancelled_caller(
        process_backend: ProcessBackend, hf_backend: HfBackend) -> None:
    import asyncio

    async def calls() -> list[list[int]]:
        waiting = asyncio.ensure_future(process_backend.continue_async(
            "pa-cancelled", _prompt(110), options=ContinueOptions(max_tokens=20)))
        await asyncio.sleep(0)
        waiting.cancel()
        replies = await asyncio.gather(*(process_backend.continue_async(
            f"pa{index}", _prompt(111 + index), options=ContinueOptions(max_tokens=4)) for index in range(3)))
        return [reply.tokens for reply in replies]

    expected = [_reference_greedy(hf_backend, _prompt(111 + index), 4) for index in range(3)]
    assert asyncio.run(calls()) == expected
    after = process_backend.continue_("pa-next", _prompt(115), options=ContinueOptions(max_tokens=2))
    assert after.tokens == _reference_greedy(hf_backend, _prompt(115), 2)


def test_engine_process_scores_forgets_and_reports_errors(process_backend: ProcessBackend,
                                                          hf_backend: HfBackend) -> None:
    tokens = _prompt(4) + _prompt(5)
    remote = process_backend.score([ScoreSequence(tokens=tokens, start=2)])
    assert remote == hf_backend.score([ScoreSequence(tokens=tokens, start=2)])
    process_backend.continue_("pf", _prompt(8), options=ContinueOptions(max_tokens=1))
    process_backend.forget("pf")
    assert "pf" not in process_backend.stats()["held"]  # forget travels in order with calls
    with pytest.raises(BackendError, match="max_context = 128"):
        process_backend.continue_("pbig", list(range(90)) * 2, options=ContinueOptions(max_tokens=1))
    reply = process_backend.continue_("pok", _prompt(9), options=ContinueOptions(max_tokens=1))
    assert reply.tokens == _reference_greedy(hf_backend, _prompt(9), 1)


@pytest.mark.slow
def test_engine_process_start_up_errors_reach_the_gateway(tiny_model_dir: Path) -> None:
    with pytest.raises(BackendError, match=r"sessions x 128 tokens.*lower sessions.max_sessions"):
        ProcessBackend.open(tiny_model_dir, name="tiny", device=DEVICE, dtype="float32", max_batch=4,
                            max_context=128, slots=10**12)


@pytest.mark.slow
def test_gateway_built_from_settings_runs_the_engine_in_a_child_process(
        tiny_model_dir: Path, hf_backend: HfBackend) -> None:
    """The default. HTTP calls go through the proxy; if the engine dies, calls fail, none hangs."""
    import os
    import signal

    from expert_gateway.backends import build_backend

    settings = GatewaySettings.model_validate({
        "sessions": {"max_sessions": 3}, "auth": {"enabled": False, "keys_file": tiny_model_dir / "k.json"},
        "model": {"backend": "hf", "preset": "path", "path": str(tiny_model_dir), "name": "tiny"},
        "hf": {"device": DEVICE, "dtype": "float32", "max_context": 64, "max_batch": 4,
               "compile_blocks": False}})  # compiling is covered by test_compiled_blocks_equal_eager_blocks
    backend = build_backend(settings)
    try:
        assert isinstance(backend, ProcessBackend) and backend.pid not in (None, os.getpid())
        app = create_app(settings, backend=backend)
        body = {"session": "s", "model": "tiny", "held": 0, "tokens": _prompt(12), "max_tokens": 3,
                "tokenizer": FINGERPRINT}
        with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
            reply = client.post("/v1/continue", json=body)
            assert reply.json()["tokens"] == _reference_greedy(hf_backend, _prompt(12), 3)
            assert backend.pid is not None
            os.kill(backend.pid, signal.SIGKILL)
            for session in ("s", "t"):  # in flight when it died, or sent after
                failed = client.post("/v1/continue", json={**body, "session": session})
                assert failed.status_code == 503 and "engine process" in failed.text
        with pytest.raises(BackendError, match="exited"):
            backend.continue_("d", _prompt(2), options=ContinueOptions(max_tokens=1))
    finally:
        backend.close()


@cuda
@pytest.mark.parametrize("kernel", ["EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION"])
def test_attention_kernels_match_a_float64_reference_over_slot_masks(kernel: str) -> None:
    """The step's attention call (grouped queries, strided slot views, per-row causal mask) in
    bf16 with each kernel the engine may pick, against float64 arithmetic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, kv_heads, groups, dim, length, capacity = 5, 2, 4, 64, 2048, 2048
    for width in (1, 3):
        cache = torch.randn((batch + 1, capacity, 2, kv_heads, dim), generator=generator, device="cuda",
                            dtype=torch.bfloat16)
        query = torch.randn((batch, kv_heads, width * groups, dim), generator=generator, device="cuda",
                            dtype=torch.bfloat16)
        ends = torch.tensor([1, 17, 700, 1500, 2048 - width + 1], device="cuda")[:, None]
        positions = ends - 1 + torch.arange(width, device="cuda")[None]  # [B, W]
        allowed = torch.arange(length, device="cuda")[None, None] <= positions[:, :, None]
        allowed = allowed[:, None, :, None].expand(batch, 1, width, groups, length).reshape(
            batch, 1, width * groups, length)
        bias = torch.zeros(allowed.shape, dtype=torch.bfloat16, device="cuda").masked_fill_(
            ~allowed, float("-inf"))
        rows = cache[:batch, :length]
        keys, values = rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2)
        try:
            with torch.inference_mode(), sdpa_kernel([getattr(SDPBackend, kernel)]):
                got = torch.nn.functional.scaled_dot_product_attention(
                    query, keys, values, attn_mask=bias, scale=dim**-0.5)
        except RuntimeError as exc:  # the engine skips a kernel that refuses a shape
            pytest.skip(f"{kernel} refuses this step: {exc}")
        scores = (query.double() @ keys.double().transpose(-1, -2)) * dim**-0.5
        expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ values.double()
        error = (got.double() - expected).abs().max().item()
        assert error < 2e-2, f"{kernel} width {width}: max error {error}"


def test_split_key_chunks_merge_to_one_attention_call() -> None:
    """The split-key path's bias and merge (CPU: each chunk attended by plain arithmetic, as the
    GPU kernel does); a chunk whose keys are all masked must weigh nothing, not give NaN."""
    from expert_gateway.backends.static_kv import merge_chunks, split_bias, split_count

    assert [split_count(1, length) for length in (128, 512, 2048, 4096, 3000)] == [0, 4, 16, 16, 0]
    assert split_count(2, 2048) == 0
    generator = torch.Generator().manual_seed(0)
    kv_heads, groups, dim, length, width = 2, 3, 16, 512, 2
    splits = split_count(1, length)
    keys, values = (torch.randn((kv_heads, length, dim), generator=generator, dtype=torch.float64)
                    for _ in range(2))
    query = torch.randn((kv_heads, width * groups, dim), generator=generator, dtype=torch.float64)
    for end in (length, 100, 3):  # every chunk, the first only, the first's first keys
        positions = torch.arange(end - width, end)
        allowed = (torch.arange(length)[None] <= positions[:, None])[:, None].expand(
            width, groups, length).reshape(1, 1, width * groups, length)
        bias = split_bias(torch, allowed, splits, torch.float64)  # [S, 1, R, T / S]
        scores = (query[None] @ keys.view(kv_heads, splits, -1, dim).transpose(0, 1).transpose(-1, -2)
                  ) * dim**-0.5 + bias
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.softmax(scores, dim=-1) @ values.view(kv_heads, splits, -1, dim).transpose(0, 1)
        merged = merge_chunks(out, lse)[0]
        full = (query @ keys.transpose(-1, -2)) * dim**-0.5
        expected = torch.softmax(full.masked_fill(~allowed[0], float("-inf")), dim=-1) @ values
        assert torch.isfinite(merged).all()
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)  # merged in float32


@cuda
def test_split_key_attention_matches_one_call_on_the_gpu() -> None:
    from expert_gateway.backends.static_kv import check_split_attention

    for width, length in ((1, 2048), (4, 512), (8, 4096)):
        assert check_split_attention(torch, device=torch.device("cuda"), dtype=torch.bfloat16, kv_heads=8,
                                     groups=4, dim=64, width=width, length=length, scale=0.125) is None


def test_compile_blocks_runs_the_steps_through_torch_compile(tiny_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile_blocks`` hands the layer blocks to torch.compile and the steps then run the
    compiled ones (CPU: torch.compile replaced by a recording wrapper). It once only set the
    flag: the blocks ran eagerly while ``hf.compile_blocks = true`` claimed otherwise."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    engine = StaticKVEngine(model, slots=4, capacity=64, max_batch=2)
    compiled: list[str] = []
    called: list[str] = []

    def fake_compile(function: Callable[..., object], **options: object) -> Callable[..., object]:
        compiled.append(function.__name__)

        def wrapper(*args: object, **kwargs: object) -> object:
            called.append(function.__name__)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    engine.compile_blocks()
    assert engine.compiled and sorted(compiled) == ["attention_inputs", "merge_chunks", "mlp_block"]
    called.clear()
    engine.step([RowFeed(0, _prompt(3))], start=1)
    assert called.count("attention_inputs") == called.count("mlp_block") == 2  # one per layer
    engine.compile_blocks(False)
    called.clear()
    engine.step([RowFeed(0, _prompt(4))], start=2)
    assert not engine.compiled and called == []


@cuda
@pytest.mark.slow
def test_compiled_blocks_equal_eager_blocks(tiny_model_dir: Path) -> None:
    """torch.compile'd layer blocks, replayed in graphs, give the eager steps' outputs."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).to("cuda").eval()
    engines = [StaticKVEngine(model, slots=8, capacity=128, max_batch=8, compile_blocks=compiled)
               for compiled in (True, False)]
    assert engines[0].compiled and not engines[1].compiled
    rng = np.random.default_rng(5)
    outputs: list[list[np.ndarray]] = [[], []]
    for engine, seen in zip(engines, outputs, strict=True):
        for row, length in enumerate([5, 17, 9, 30, 2, 11, 60]):  # eager prefills, then graphs
            seen.append(engine.step([RowFeed(0, [int(t) for t in rng.integers(0, 90, length)])],
                                    start=row))
        cached = [5, 17, 9, 30, 2, 11, 60]
        for rows, width in ((7, 1), (3, 4), (1, 1), (7, 2), (1, 8)):
            seen.append(engine.step([RowFeed(cached[row], [int(t) for t in rng.integers(0, 90, width)])
                                     for row in range(rows)]))
            cached = [value + width if row < rows else value for row, value in enumerate(cached)]
        rng = np.random.default_rng(5)
    for compiled, eager in zip(*outputs, strict=True):
        assert compiled[:, 0].tolist() == eager[:, 0].tolist()
        np.testing.assert_allclose(compiled, eager, atol=1e-3)


# -- the pipelined loop: steps launched before the previous one is read ------------------------


def test_launched_steps_feed_their_sampled_tokens_on_the_device(tiny_model_dir: Path) -> None:
    """Two launches before any read (the second takes the first's tokens on the device) equal
    two steps whose tokens went through the host; on CUDA the launches replay graphs."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).to(DEVICE).eval()
    engines = [StaticKVEngine(model, slots=6, capacity=128, max_batch=4, cuda_graphs=True)
               for _ in range(2)]
    prompts = [_prompt(70 + row) for row in range(3)]
    for engine in engines:
        for row, prompt in enumerate(prompts):
            engine.step([RowFeed(0, prompt)], start=row)
    chained, stepped = engines
    first = chained.launch([RowFeed(len(prompt), [5]) for prompt in prompts])
    second = chained.launch([RowFeed(len(prompt) + 1, [0], source=row) for row, prompt in enumerate(prompts)])
    expected_first = stepped.step([RowFeed(len(prompt), [5]) for prompt in prompts])
    expected_second = stepped.step([RowFeed(len(prompt) + 1, [int(expected_first[row, 0])])
                                    for row, prompt in enumerate(prompts)])
    np.testing.assert_allclose(second.result(), expected_second, atol=1e-4)
    np.testing.assert_allclose(first.result(), expected_first, atol=1e-4)
    for row, prompt in enumerate(prompts):
        sequence = [*prompt, 5, int(expected_first[row, 0])]
        assert int(expected_second[row, 0]) == _reference_greedy_model(model, sequence)


def _reference_greedy_model(model: object, tokens: list[int]) -> int:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens], device=DEVICE)).logits  # type: ignore[operator]
    return int(logits[0, -1].argmax())


def test_end_of_sequence_mid_span_ends_the_call_and_keeps_the_session_exact(tiny_model_dir: Path) -> None:
    """A call that samples an end-of-sequence token was already fed to the next step: its
    output there is dropped, its answer stops at that token, and the token's KV (written by
    that step) is reused by the session's next call."""
    backend = HfBackend.open(tiny_model_dir, name="tiny", device=DEVICE, dtype="float32", max_batch=4,
                             max_context=128, slots=4)
    try:
        prompts = [_prompt(80), _prompt(81)]
        references = [_reference_greedy(backend, prompt, 6) for prompt in prompts]
        stop = next(token for index, token in enumerate(references[0])
                    if index >= 2 and token not in references[0][:index])
        backend._eos_ids = frozenset({stop})
        jobs = [_Job(f"eos{index}", prompt, ContinueOptions(max_tokens=6))
                for index, prompt in enumerate(prompts)]
        _schedule(backend, jobs)
        for job, reference in zip(jobs, references, strict=True):
            end = reference.index(stop) + 1 if stop in reference else len(reference)
            assert job.future.result()[0] == reference[:end]
        answer = jobs[0].future.result()[0]
        extended = [*prompts[0], *answer, 7]
        again = backend.continue_("eos0", extended, options=ContinueOptions(max_tokens=3))
        assert again.reused_tokens == len(extended) - 1 and again.prefilled_tokens == 1
        backend._eos_ids = frozenset()
        assert again.tokens == _reference_greedy(backend, extended, 3)[:len(again.tokens)]
    finally:
        backend.close()


def test_slot_swap_moves_each_sides_own_length(tiny_model_dir: Path) -> None:
    """``swap`` with different lengths per side exchanges exactly what each slot holds."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    engine = StaticKVEngine(model, slots=3, capacity=16, max_batch=2)
    with torch.inference_mode():
        engine.cache.copy_(torch.randn(engine.cache.shape))
        before = engine.cache.clone()
        engine.swap(0, 2, 3, 11)  # slot 0 holds 3 positions, slot 2 holds 11
        assert torch.equal(engine.cache[:, 2, :3], before[:, 0, :3])
        assert torch.equal(engine.cache[:, 0, :11], before[:, 2, :11])
        engine.swap(1, 0, 0, 11)  # slot 1 is empty: only slot 0's 11 positions move
        assert torch.equal(engine.cache[:, 1, :11], before[:, 2, :11])
        assert torch.equal(engine.cache[:, 3], before[:, 3])  # scratch untouched


# -- the Triton split-key kernel (decode_attention) ----------------------------------------------


def test_decode_attention_splits_fill_the_chip_once() -> None:
    from expert_gateway.backends.decode_attention import splits_for

    # batch 1, 8 KV heads on 132 multiprocessors: 33 chunks wanted, at most one per 64 keys
    assert [splits_for(1, 8, length, 132) for length in (64, 128, 2048, 4096)] == [1, 2, 32, 33]
    assert splits_for(32, 8, 2048, 132) == 1 and splits_for(16, 8, 2048, 132) == 3


def test_decode_attention_reference_is_the_steps_masked_attention() -> None:
    """The float64 reference the kernel is checked against is the engine's own mask: query row
    r of a KV head is token r // G and sees its slot's keys up to that token's position."""
    from expert_gateway.backends.decode_attention import reference

    generator = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, dim, width, length = 3, 2, 3, 16, 2, 40
    rows = torch.randn((batch, length, 2, kv_heads, dim), generator=generator, dtype=torch.float64)
    grouped = torch.randn((batch, kv_heads, width * groups, dim), generator=generator, dtype=torch.float64)
    positions = torch.tensor([[0, 1], [20, 21], [38, 39]])
    got = reference(torch, grouped, rows, positions, scale=0.25)
    for b in range(batch):
        for r in range(width * groups):
            seen = int(positions[b, r // groups]) + 1
            for h in range(kv_heads):
                keys, values = rows[b, :seen, 0, h], rows[b, :seen, 1, h]
                expected = torch.softmax(keys @ grouped[b, h, r] * 0.25, dim=0) @ values
                torch.testing.assert_close(got[b, h, r], expected)


def _triton_interpreted() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return not torch.cuda.is_available()


INTERPRETED_CHECK = """
import sys

import torch
import triton
import triton.language as tl
from expert_gateway.backends.decode_attention import decode_attention, reference


@triton.jit
def probe(bound_ptr, out_ptr):
    total = 0
    for _ in range(0, tl.load(bound_ptr)):  # a loop bound read from memory, as the kernel's
        total += 1
    tl.store(out_ptr, total)


out = torch.zeros(1, dtype=torch.int32)
try:
    probe[(1,)](torch.tensor([3], dtype=torch.int32), out)
except Exception as exc:  # e.g. Triton 3.6's interpreter under numpy 2: int() of a 1-element array
    print(f"unsupported: {type(exc).__name__}: {exc}")
    sys.exit(0)
assert int(out) == 3
generator = torch.Generator().manual_seed(0)
for batch, kv_heads, groups, dim, width, length, splits in (
        (1, 2, 4, 64, 2, 256, 4), (3, 2, 4, 64, 1, 128, 1), (2, 1, 3, 32, 5, 200, 3),
        (1, 2, 4, 48, 2, 130, 2)):
    cache = torch.randn((batch + 1, length + 7, 2, kv_heads, dim), generator=generator)
    grouped = torch.randn((batch, kv_heads, width * groups, dim), generator=generator)
    ends = torch.tensor([(length, length // 3 + width, width)[index % 3] for index in range(batch)])
    positions = ends[:, None] - width + torch.arange(width)[None]
    rows = cache[1:, :length]  # a strided view, as the engine's slots
    got = decode_attention(torch, grouped, rows, positions, scale=dim**-0.5, splits=splits)
    expected = reference(torch, grouped, rows, positions, scale=dim**-0.5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(not _triton_interpreted(), reason="needs triton without a GPU (its interpreter)")
def test_decode_attention_kernel_in_tritons_interpreter() -> None:
    """The kernel's arithmetic on the CPU, through Triton's interpreter (a process of its own:
    triton reads TRITON_INTERPRET once), in float32, as the interpreter's bf16 dot is not bf16
    arithmetic: chunks entirely masked, a head size that is not a power of two, one chunk and
    many, rows that see all keys, a third of them or a few."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "TRITON_INTERPRET": "1",
                   "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK], env=environment, cwd=root,
                          capture_output=True, text=True, timeout=300)
    if done.stdout.startswith("unsupported"):
        pytest.skip(f"this triton's interpreter cannot run data-dependent loops: {done.stdout[:300]}")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@cuda
@pytest.mark.parametrize(("batch", "width", "length"), [(1, 1, 128), (1, 2, 2048), (1, 8, 4096),
                                                       (5, 3, 512), (32, 1, 2048), (64, 6, 256)])
def test_decode_attention_kernel_matches_float64_on_the_gpu(batch: int, width: int, length: int) -> None:
    from expert_gateway.backends.decode_attention import check, splits_for

    processors = torch.cuda.get_device_properties(0).multi_processor_count
    for splits in {1, splits_for(batch, 8, length, processors)}:
        assert check(torch, device=torch.device("cuda"), dtype=torch.bfloat16, batch=batch, kv_heads=8,
                     groups=4, dim=64, width=width, length=length, scale=0.125, splits=splits) is None


def test_captures_are_timed_over_rows_at_the_end_of_their_key_bucket(tiny_model_dir: Path) -> None:
    """Kernels are compared over padding rows that reach the bucket's last key: a kernel that
    reads a row's keys only up to its position (TRITON_DECODE) must not be timed over one key
    while the others read the whole bucket. Padding still writes only into the scratch slot."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    engine = StaticKVEngine(model, slots=4, capacity=256, max_batch=4)
    feed = engine._padding_feed(4, 3, 128)
    assert feed.positions.tolist() == [[125, 126, 127]] * 4
    scratch = engine.scratch * engine.capacity
    assert ((feed.dest >= scratch) & (feed.dest < scratch + engine.capacity)).all()


@cuda
def test_triton_decode_graphs_equal_eager_steps(tiny_model_dir: Path) -> None:
    """Steps captured with the Triton kernel alone (bf16) give the eager SDPA steps' tokens and
    outputs, over ragged rows and widths; the kernel was picked for every captured shape."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.bfloat16).to("cuda").eval()
    engines = [StaticKVEngine(model, slots=8, capacity=256, max_batch=8, cuda_graphs=graphs)
               for graphs in (True, False)]
    engines[0].attention_candidates = ("TRITON_DECODE",)
    lengths = [5, 17, 9, 130, 2]
    outputs: list[list[np.ndarray]] = [[], []]
    for engine, seen in zip(engines, outputs, strict=True):
        rng = np.random.default_rng(4)
        for row, length in enumerate(lengths):
            engine.step([RowFeed(0, [int(t) for t in rng.integers(0, 90, length)])], start=row)
        cached = list(lengths)
        for rows, width in ((5, 1), (5, 3), (1, 2), (4, 8), (5, 6), (2, 1)):
            seen.append(engine.step([RowFeed(cached[row], [int(t) for t in rng.integers(0, 90, width)])
                                     for row in range(rows)]))
            cached = [value + width if row < rows else value for row, value in enumerate(cached)]
    assert engines[0].graphs > 0 and set(engines[0].kernel_choice.values()) == {"TRITON_DECODE"}
    for graphed, eager in zip(*outputs, strict=True):
        assert graphed[:, 0].tolist() == eager[:, 0].tolist()
        np.testing.assert_allclose(graphed[:, 1], eager[:, 1], atol=5e-2)
