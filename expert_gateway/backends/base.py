"""The ``ExpertBackend`` protocol every backend implements, and helpers they share.

A backend continues a session's full sequence (the gateway's session store decides what that
sequence is) and scores fixed sequences. It keeps whatever cache it likes under the session id,
prefills only past the longest common prefix with what it holds, and reports how many tokens it
reused so the gateway can count prefill saved by sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tandem_core.protocol import (
    ModelInfo,
    ScoreResult,
    ScoreSequence,
    TokenLogprob,
    log_softmax,
    sample_from_logits,
)


@dataclass(frozen=True)
class ContinueOptions:
    """How to extend a sequence: span length and sampling."""

    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    top_logprobs: int = 0
    want_logprobs: bool = False


@dataclass(frozen=True)
class Continuation:
    """Generated tokens, their log-probs when asked, and the cache reuse of this call."""

    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    reused_tokens: int
    prefilled_tokens: int


class ExpertBackend(Protocol):
    """What the gateway needs from an expert model."""

    info: ModelInfo
    max_concurrency: int

    def continue_(self, session_id: str, sequence: Sequence[int], *,
                  options: ContinueOptions) -> Continuation:
        """Up to ``options.max_tokens`` expert tokens after ``sequence``."""
        ...

    def score(self, sequences: Sequence[ScoreSequence]) -> list[ScoreResult]:
        """Log-prob and argmax of each token of each sequence from its ``start``."""
        ...

    def forget(self, session_id: str) -> None:
        """The session was evicted: its cache may be reused. Cheap and thread-safe."""
        ...

    def close(self) -> None:
        """Release models, threads and connections."""
        ...


def token_logprob(logits: np.ndarray, token: int, *, top: int) -> TokenLogprob:
    """The raw-distribution log-prob of ``token`` and the ``top`` best alternatives."""
    logprobs = log_softmax(np.asarray(logits, dtype=np.float64))
    best: list[tuple[int, float]] = []
    if top > 0:
        order = np.argsort(-logprobs, kind="stable")[:top]
        best = [(int(index), float(logprobs[index])) for index in order]
    return TokenLogprob(token=token, logprob=float(logprobs[token]), top=best)


def generate(first_logits: np.ndarray, step: Callable[[int], np.ndarray], *, position: int,
             options: ContinueOptions, is_end: Callable[[int], bool]
             ) -> tuple[list[int], list[TokenLogprob] | None]:
    """Sample up to ``max_tokens`` tokens; ``step(token)`` feeds one and returns the next logits.

    ``position`` is the absolute index of the first new token in the session's sequence, so a
    seeded draw is the same whether the span is asked in one call or token by token. The last
    token is not fed (its KV is made by the next call, which may not want it).
    """
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    logits = first_logits
    for index in range(options.max_tokens):
        token = sample_from_logits(logits, temperature=options.temperature, seed=options.seed,
                                   position=position + index)
        tokens.append(token)
        if options.want_logprobs:
            logprobs.append(token_logprob(logits, token, top=options.top_logprobs))
        if is_end(token) or index == options.max_tokens - 1:
            break
        logits = step(token)
    return tokens, (logprobs if options.want_logprobs else None)


def score_rows(logits: np.ndarray, targets: Sequence[int]) -> ScoreResult:
    """Score ``targets[i]`` against ``logits[i]`` (the distribution just before it)."""
    logprobs = log_softmax(np.asarray(logits, dtype=np.float64))
    rows = np.arange(len(targets))
    return ScoreResult(
        logprobs=[float(value) for value in logprobs[rows, list(targets)]],
        argmax=[int(value) for value in np.argmax(logprobs, axis=-1)],
    )
