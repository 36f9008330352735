"""The transformers backend on a tiny randomly initialised Llama (CUDA when present, else CPU).

Runs wherever torch and transformers are installed; the GPU run is recorded in the report.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from expert_gateway.app import create_app
from expert_gateway.backends.base import ContinueOptions
from expert_gateway.protocol import ScoreSequence, log_softmax

from .conftest import gateway_settings, serve

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from expert_gateway.backends.hf import FINGERPRINT_FILE, HfBackend, _Job  # noqa: E402

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


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir: Path) -> Iterator[HfBackend]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = HfBackend.open(tiny_model_dir, name="tiny", device=device, dtype="float32", max_batch=16,
                             max_context=256)
    yield backend
    backend.close()


def _reference_greedy(backend: HfBackend, prompt: list[int], count: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache, no batching."""
    tokens = list(prompt)
    for _ in range(count):
        with torch.inference_mode():
            logits = backend._model(input_ids=torch.tensor([tokens], device=backend._device)).logits
        tokens.append(int(logits[0, -1].argmax()))
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

    Runs the scheduler's own functions on the test thread while the scheduler thread is idle
    (blocked on its empty inbox), so the composition of each batch is deterministic.
    """
    active: list[_Job] = []
    for job in jobs:
        backend._admit(job, active)
    before_steps()
    while active:
        backend._step(active)
        for job in [job for job in active if backend._finished(job)]:
            active.remove(job)
            backend._finish(job)


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
        assert job.tokens == job.future.result().tokens == _reference_greedy(hf_backend, sequence, 4)


def test_session_evicted_mid_call_does_not_break_its_batch(hf_backend: HfBackend) -> None:
    prompts = [_prompt(60), _prompt(61)]
    for index, prompt in enumerate(prompts):
        hf_backend.continue_(f"evicted{index}", prompt, options=ContinueOptions(max_tokens=1))
    jobs = [_Job(f"evicted{index}", [*prompt, 3, 4], ContinueOptions(max_tokens=3))
            for index, prompt in enumerate(prompts)]
    _schedule(hf_backend, jobs, before_steps=lambda: hf_backend.forget("evicted0"))
    for job in jobs:
        assert job.future.result().tokens == _reference_greedy(hf_backend, job.sequence, 3)


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
