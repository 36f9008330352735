"""The embedded llama.cpp backend behind a real uvicorn: continue, score, reuse, concurrency."""

from __future__ import annotations

import concurrent.futures
import re
import threading
from typing import Any

import httpx
import numpy as np
import pytest

from expert_gateway.backends.base import ContinueOptions
from expert_gateway.backends.llama_cpp import LlamaCppBackend
from tandem_core.protocol import ModelInfo, ScoreSequence, log_softmax, sample_from_logits

from .conftest import Gateway

PROMPT = [1, 504, 3575, 282, 4649, 314]  # short; valid ids in both toy and SmolLM2 vocabularies


def _prompt(info: ModelInfo, salt: int = 0) -> list[int]:
    return [(token + 7 * salt) % info.vocab_size for token in PROMPT]


def _body(info: ModelInfo, **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"session": "s", "model": info.name, "held": 0, "tokens": _prompt(info),
                               "max_tokens": 4, "tokenizer": info.tokenizer}
    return {**body, **overrides}


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def _direct_logits(backend: LlamaCppBackend, tokens: list[int]) -> np.ndarray:
    """Logits of a plain forward pass on the scoring sequence, leaving it empty."""
    backend._model.reset(seq=0)
    logits = backend._model.decode(tokens, seq=0).logits
    backend._model.reset(seq=0)
    return logits


def test_models_lists_the_expert(real_gateway: Gateway, llama_backend: LlamaCppBackend) -> None:
    with real_gateway.client() as client:
        models = client.get("/v1/models").json()
    assert models == [llama_backend.info.model_dump()]


def test_continue_is_greedy_argmax_of_the_model(real_gateway: Gateway,
                                               llama_backend: LlamaCppBackend) -> None:
    info = llama_backend.info
    with real_gateway.client() as client:
        reply = client.post("/v1/continue", json=_body(info, session="greedy")).json()
        scored = client.post("/v1/score", json={
            "model": info.name, "tokenizer": info.tokenizer,
            "sequences": [{"tokens": _prompt(info) + reply["tokens"], "start": len(PROMPT)}],
        }).json()["results"][0]
    assert reply["held"] == len(PROMPT) + len(reply["tokens"])
    # Greedy tokens are the argmax at each position, and their log-probs agree with /v1/score.
    assert scored["argmax"][:len(reply["tokens"])] == reply["tokens"]
    np.testing.assert_allclose([entry["logprob"] for entry in reply["logprobs"]],
                               scored["logprobs"], atol=1e-3)


def test_session_reuse_prefills_only_new_tokens_and_matches_a_fresh_call(
        real_gateway: Gateway, llama_backend: LlamaCppBackend) -> None:
    info = llama_backend.info
    with real_gateway.client() as client:
        first = client.post("/v1/continue", json=_body(info, session="reuse")).json()
        before = client.get("/metrics").text
        accepted = first["tokens"][:2]
        new = [(_prompt(info)[0] + 11) % info.vocab_size]
        body = _body(info, session="reuse", held=len(PROMPT) + 2, tokens=new)
        reused = client.post("/v1/continue", json=body).json()
        after = client.get("/metrics").text
        fresh = client.post("/v1/continue", json=_body(
            info, session="reuse-fresh", tokens=_prompt(info) + accepted + new)).json()
    prefilled = (_metric(after, "tandem_gateway_prefill_tokens_total")
                 - _metric(before, "tandem_gateway_prefill_tokens_total"))
    saved = (_metric(after, "tandem_gateway_prefill_tokens_saved_total")
             - _metric(before, "tandem_gateway_prefill_tokens_saved_total"))
    assert prefilled == 1  # only the new token; the accepted expert tokens were already held
    assert saved == len(PROMPT) + 2
    assert reused["tokens"] == fresh["tokens"]
    np.testing.assert_allclose([entry["logprob"] for entry in reused["logprobs"]],
                               [entry["logprob"] for entry in fresh["logprobs"]], atol=1e-3)


def test_eight_concurrent_sessions_equal_sequential(real_gateway: Gateway,
                                                    llama_backend: LlamaCppBackend) -> None:
    info = llama_backend.info
    bodies = [_body(info, session=f"c{index}", tokens=_prompt(info, index + 1), max_tokens=2)
              for index in range(8)]
    with real_gateway.client() as client:
        sequential = [client.post("/v1/continue", json=body).json()["tokens"] for body in bodies]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(
                lambda body: client.post("/v1/continue", json=body).json()["tokens"], bodies))
    assert parallel == sequential


def test_seeded_sampling_spans_equal_token_by_token(llama_backend: LlamaCppBackend) -> None:
    prompt = _prompt(llama_backend.info, 5)
    options = ContinueOptions(max_tokens=5, temperature=1.3, seed=42)
    span = llama_backend.continue_("span", prompt, options=options).tokens
    one_by_one: list[int] = []
    for _ in range(len(span)):
        step = ContinueOptions(max_tokens=1, temperature=1.3, seed=42)
        one_by_one += llama_backend.continue_("steps", prompt + one_by_one, options=step).tokens
    assert one_by_one == span


def test_sampling_uses_the_positional_uniform(llama_backend: LlamaCppBackend) -> None:
    prompt = _prompt(llama_backend.info, 9)
    token = llama_backend.continue_("pos", prompt, options=ContinueOptions(
        max_tokens=1, temperature=0.8, seed=3)).tokens[0]
    logits = _direct_logits(llama_backend, prompt)[-1]
    assert token == sample_from_logits(logits, temperature=0.8, seed=3, position=len(prompt))


def test_score_matches_a_direct_forward_pass(llama_backend: LlamaCppBackend) -> None:
    tokens = _prompt(llama_backend.info, 2) + _prompt(llama_backend.info, 3)
    result = llama_backend.score([ScoreSequence(tokens=tokens, start=3)])[0]
    logits = _direct_logits(llama_backend, tokens[:-1])
    expected = log_softmax(logits.astype(np.float64))[np.arange(2, len(tokens) - 1), tokens[3:]]
    np.testing.assert_allclose(result.logprobs, expected, atol=1e-4)
    assert result.argmax == [int(value) for value in logits[2:].argmax(axis=-1)]


def test_health_and_metrics_over_the_real_server(real_gateway: Gateway) -> None:
    assert httpx.get(real_gateway.url + "/health").json()["status"] == "ok"
    text = httpx.get(real_gateway.url + "/metrics").text
    assert _metric(text, "tandem_gateway_active_sessions") >= 0


@pytest.mark.parametrize("session_count", [5])
def test_more_sessions_than_slots_still_reuse_their_history(real_gateway: Gateway,
                                                            llama_backend: LlamaCppBackend,
                                                            session_count: int) -> None:
    info = llama_backend.info
    with real_gateway.client() as client:
        replies = [client.post("/v1/continue", json=_body(info, session=f"slot{index}",
                                                          tokens=_prompt(info, 20 + index))).json()
                   for index in range(session_count)]
        # Slot 0's KV was taken by a later session; its token history is still held.
        again = client.post("/v1/continue", json=_body(info, session="slot0", held=replies[0]["held"],
                                                       tokens=[])).json()
        fresh = client.post("/v1/continue", json=_body(
            info, session="slot0-fresh", tokens=_prompt(info, 20) + replies[0]["tokens"])).json()
    assert again["tokens"] == fresh["tokens"]


@pytest.mark.parametrize("start", [1, 255, 256, 299])
def test_long_scores_are_chunked_and_exact(llama_backend: LlamaCppBackend, start: int) -> None:
    vocab = llama_backend.info.vocab_size
    tokens = [(index * 13) % (vocab - 3) + 3 for index in range(300)]  # longer than n_batch = 256
    result = llama_backend.score([ScoreSequence(tokens=tokens, start=start)])[0]
    logits = _direct_logits(llama_backend, tokens[:-1])
    expected = log_softmax(logits.astype(np.float64))[np.arange(start - 1, len(tokens) - 1), tokens[start:]]
    np.testing.assert_allclose(result.logprobs, expected, atol=1e-3)
    assert result.argmax == [int(value) for value in logits[start - 1:].argmax(axis=-1)]


def test_concurrent_sessions_share_batched_steps(llama_backend: LlamaCppBackend,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls of different sessions meet in one llama_decode per step, with the same answers."""
    info = llama_backend.info
    engine = llama_backend.engine
    options = ContinueOptions(max_tokens=6)
    prompts = [_prompt(info, 20 + index) for index in range(3)]
    alone = [llama_backend.continue_(f"alone{index}", prompt, options=options).tokens
             for index, prompt in enumerate(prompts)]
    before = engine.stats.max_sequences
    engine.stats.max_sequences = 0
    # The three calls hold their sequences before any decodes, and the engine gathers for up
    # to 0.5 s: the toy model's steps are so quick that a call starting late would otherwise
    # find the others finished, whatever the engine does.
    started = threading.Barrier(3)
    waited: set[int] = set()
    submit = engine.submit

    def submit_together(seq: int, tokens: Any, *, last_only: bool) -> Any:
        if threading.get_ident() not in waited:  # each call's first decode: its prefill
            waited.add(threading.get_ident())
            started.wait(timeout=30)
        return submit(seq, tokens, last_only=last_only)

    monkeypatch.setattr(engine, "submit", submit_together)
    monkeypatch.setattr(engine, "gather_s", 0.5)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(
            lambda item: llama_backend.continue_(f"together{item[0]}", item[1],
                                                 options=options).tokens, enumerate(prompts)))
    assert together == alone
    assert engine.stats.max_sequences >= 2
    assert engine.stats.ahead_taken > 0  # the engine fed the sampling loops' tokens itself
    engine.stats.max_sequences = max(before, 3)
