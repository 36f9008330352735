"""Forward to an OpenAI-compatible ``/v1/completions`` server that takes token-id prompts.

The upstream (llama.cpp's ``llama-server``, vLLM, SGLang) runs the expert, possibly over many
GPUs or nodes; the gateway adds auth, quotas, sessions and content-free logging in front. Every
call sends the session's whole sequence and relies on the upstream's prefix cache
(``cache_prompt``; vLLM's automatic prefix caching), whose hits are read back from
``usage.prompt_tokens_details.cached_tokens``.

Exactness: greedy spans are one upstream call at temperature 0. Sampled spans go token by token:
each step fetches the raw next-token distribution (``n_probs``, all of it unless ``sample_top_n``
caps it) and draws with ``sample_from_logits`` at the token's absolute position, as every
Tandem backend does. Scoring probes each position with a one-token completion: the top 20
first, the whole vocabulary only when the actual token is not among them.

Both log-prob shapes are read: llama.cpp's ``logprobs.content[{id, logprob, top_logprobs}]`` and
the legacy OpenAI shape with ``return_tokens_as_token_ids`` (``"token_id:123"`` keys, vLLM).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from expert_gateway.backends.base import Continuation, ContinueOptions
from expert_gateway.errors import BackendError
from expert_gateway.settings import OpenAICompatSettings
from tandem_core.errors import TandemError
from tandem_core.protocol import (
    ModelInfo,
    ScoreResult,
    ScoreSequence,
    TokenLogprob,
    sample_from_logits,
)

SCORE_PROBE_TOP = 20

# One upstream step: the chosen token, its log-prob, and the log-probs the upstream returned.
Step = tuple[int, float, dict[int, float]]


class OpenAICompatBackend:
    """ExpertBackend over an upstream completions server."""

    def __init__(self, client: httpx.Client, *, info: ModelInfo, remote_model: str = "",
                 concurrency: int = 8, sample_top_n: int = 0, eos_ids: frozenset[int] = frozenset()) -> None:
        self._client = client
        self.info = info
        self.max_concurrency = concurrency
        self._remote_model = remote_model
        self._sample_top_n = sample_top_n or info.vocab_size
        self._eos_ids = eos_ids

    @classmethod
    def from_settings(cls, settings: OpenAICompatSettings, *, name: str,
                      tokenizer_path: Path) -> OpenAICompatBackend:
        """Read the vocabulary from the expert's GGUF and connect to the upstream."""
        from tandem_core.base_model import LlamaModel

        try:
            with LlamaModel(tokenizer_path, n_ctx=64, n_batch=8, n_threads=1) as vocabulary:
                info = ModelInfo(name=name, vocab_size=vocabulary.vocab_size,
                                 tokenizer=vocabulary.fingerprint, max_context=settings.max_context)
                eos_ids = frozenset(token for token in range(vocabulary.vocab_size)
                                    if vocabulary.is_end_of_generation(token))
        except TandemError as exc:
            raise BackendError(f"cannot read the expert's vocabulary from {tokenizer_path}: {exc}") from exc
        headers = {}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env, "")
            if not key:
                raise BackendError(f"set {settings.api_key_env} to the upstream server's API key")
            headers["Authorization"] = f"Bearer {key}"
        client = httpx.Client(base_url=settings.url, headers=headers, timeout=settings.timeout_s,
                              limits=httpx.Limits(max_connections=settings.concurrency))
        return cls(client, info=info, remote_model=settings.remote_model,
                   concurrency=settings.concurrency, sample_top_n=settings.sample_top_n, eos_ids=eos_ids)

    def continue_(self, session_id: str, sequence: Sequence[int], *,
                  options: ContinueOptions) -> Continuation:
        if options.temperature <= 0.0:
            steps, cached = self._complete(sequence, max_tokens=options.max_tokens,
                                           top=max(1, options.top_logprobs))
        else:
            steps, cached = self._sample(sequence, options)
        tokens = [token for token, _, _ in steps]
        logprobs = None
        if options.want_logprobs:
            logprobs = [TokenLogprob(token=token, logprob=logprob,
                                     top=_best(alternatives, options.top_logprobs))
                        for token, logprob, alternatives in steps]
        return Continuation(tokens=tokens, logprobs=logprobs, reused_tokens=cached,
                            prefilled_tokens=len(sequence) - cached)

    def score(self, sequences: Sequence[ScoreSequence]) -> list[ScoreResult]:
        return [self._score_one(item.tokens, item.start) for item in sequences]

    def forget(self, session_id: str) -> None:
        # The upstream's prefix cache is keyed by content, not by session: nothing to drop.
        return None

    def close(self) -> None:
        self._client.close()

    def _sample(self, sequence: Sequence[int], options: ContinueOptions) -> tuple[list[Step], int]:
        steps: list[Step] = []
        cached_first = 0
        grown = list(sequence)
        for index in range(options.max_tokens):
            (step,), cached = self._complete(grown, max_tokens=1, top=self._sample_top_n)
            if index == 0:
                cached_first = cached
            logits = np.full(self.info.vocab_size, -np.inf)
            for token, logprob in step[2].items():
                logits[token] = logprob
            token = sample_from_logits(logits, temperature=options.temperature, seed=options.seed,
                                       position=len(sequence) + index)
            steps.append((token, float(logits[token]), step[2]))
            grown.append(token)
            if token in self._eos_ids:
                break
        return steps, cached_first

    def _score_one(self, tokens: Sequence[int], start: int) -> ScoreResult:
        logprobs: list[float] = []
        argmax: list[int] = []
        for position in range(start, len(tokens)):
            prefix, actual = tokens[:position], tokens[position]
            (step,), _ = self._complete(prefix, max_tokens=1, top=SCORE_PROBE_TOP)
            if actual not in step[2]:
                (step,), _ = self._complete(prefix, max_tokens=1, top=self.info.vocab_size)
            distribution = step[2]
            argmax.append(max(distribution, key=lambda token: distribution[token]))
            logprobs.append(distribution.get(actual, -math.inf))
        return ScoreResult(logprobs=logprobs, argmax=argmax)

    def _complete(self, prompt: Sequence[int], *, max_tokens: int, top: int) -> tuple[list[Step], int]:
        """One upstream completion at temperature 0 with ``top`` log-probs per generated token."""
        body: dict[str, Any] = {
            "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": min(top, 20), "n_probs": top, "cache_prompt": True,
            "return_tokens_as_token_ids": True,
        }
        if self._remote_model:
            body["model"] = self._remote_model
        try:
            response = self._client.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {self._client.base_url} failed: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise BackendError(f"upstream answered HTTP {response.status_code}")
        try:
            payload = response.json()
            steps = _parse_steps(payload["choices"][0]["logprobs"])
            details = (payload.get("usage") or {}).get("prompt_tokens_details") or {}
            cached = int(details.get("cached_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BackendError("upstream reply has no token log-probs (does it accept token-id "
                               "prompts and n_probs/logprobs?)") from exc
        if not steps:
            raise BackendError("upstream generated no token")
        return steps, min(cached, len(prompt))


def _parse_steps(logprobs: dict[str, Any]) -> list[Step]:
    if "content" in logprobs:  # llama.cpp server
        return [(int(entry["id"]), float(entry["logprob"]),
                 {int(alt["id"]): float(alt["logprob"]) for alt in entry.get("top_logprobs", [])})
                for entry in logprobs["content"]]
    steps = []  # legacy OpenAI shape with token-id strings (vLLM return_tokens_as_token_ids)
    for token, logprob, alternatives in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                            logprobs["top_logprobs"], strict=True):
        steps.append((_token_id(token), float(logprob),
                      {_token_id(key): float(value) for key, value in (alternatives or {}).items()}))
    return steps


def _token_id(text: str) -> int:
    prefix, _, number = text.partition(":")
    if prefix != "token_id" or not number.isdigit():
        raise ValueError("token not given as token_id:<n>")
    return int(number)


def _best(alternatives: dict[int, float], count: int) -> list[tuple[int, float]]:
    ordered = sorted(alternatives.items(), key=lambda item: (-item[1], item[0]))
    return ordered[:count]
