"""How an expert model continues and scores a sequence: the one implementation both sides run.

The gateway's llama.cpp backend and the client's ``InProcessExpert`` (tests, ``tandem eval``,
``tandem collect`` without a gateway) must answer alike token for token, or a test against the
in-process expert would prove nothing about the gateway. So the sampling loop, the log-prob
report, the cache-reusing prefill and the scoring of fixed sequences live here, written against
``BaseModel``; each side keeps only its own session bookkeeping and error mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tandem_core.base_model import BaseModel
from tandem_core.protocol import ScoreResult, TokenLogprob, log_softmax, sample_from_logits
from tandem_core.tokens import common_prefix_length


@dataclass(frozen=True)
class ContinueOptions:
    """How to extend a sequence: span length and sampling."""

    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    top_logprobs: int = 0
    want_logprobs: bool = False


def token_logprob(logits: np.ndarray, token: int, *, top: int) -> TokenLogprob:
    """The raw-distribution log-prob of ``token`` and the ``top`` best alternatives.

    The same float64 arithmetic as ``log_softmax``, bit for bit, but the whole row of log-probs
    is only made when alternatives are asked for: the gateway reports every token's log-prob,
    and on a CPU host its session threads share the cores with llama.cpp.
    """
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max()
    log_total = np.log(np.exp(shifted).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        logprobs = shifted - log_total
        order = np.argsort(-logprobs, kind="stable")[:top]
        best = [(int(index), float(logprobs[index])) for index in order]
    return TokenLogprob(token=token, logprob=float(shifted[token] - log_total), top=best)


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


def prefill(model: BaseModel, sequence: Sequence[int], *, seq: int = 0) -> tuple[int, np.ndarray]:
    """Make ``seq`` hold ``sequence``, decoding only past the prefix it already holds.

    Returns the tokens reused and the logits of the next token. At least one token is decoded,
    because only a decode gives the distribution after the last one.
    """
    reused = min(common_prefix_length(model.cached_tokens(seq), sequence), len(sequence) - 1)
    model.rollback(reused, seq=seq)
    output = model.decode(list(sequence[reused:]), seq=seq, last_only=True)
    return reused, np.asarray(output.logits[-1])


def continue_sequence(model: BaseModel, sequence: Sequence[int], *, options: ContinueOptions,
                      seq: int = 0) -> tuple[list[int], list[TokenLogprob] | None, int]:
    """``generate`` after ``prefill``: the new tokens, their log-probs and the tokens reused."""
    reused, logits = prefill(model, sequence, seq=seq)
    tokens, logprobs = generate(
        logits, lambda token: model.decode([token], seq=seq).logits[-1], position=len(sequence),
        options=options, is_end=model.is_end_of_generation)
    return tokens, logprobs, reused


def score_rows(logits: np.ndarray, targets: Sequence[int]) -> ScoreResult:
    """Score ``targets[i]`` against ``logits[i]`` (the distribution just before it)."""
    logprobs = log_softmax(np.asarray(logits, dtype=np.float64))
    rows = np.arange(len(targets))
    return ScoreResult(
        logprobs=[float(value) for value in logprobs[rows, list(targets)]],
        argmax=[int(value) for value in np.argmax(logprobs, axis=-1)],
    )


def score_sequence(model: BaseModel, tokens: Sequence[int], start: int, *, chunk: int,
                   seq: int = 0) -> ScoreResult:
    """Log-prob and argmax of every token of ``tokens`` from ``start`` on (``/v1/score``).

    Reuses the prefix ``seq`` already holds and decodes ``chunk`` tokens at a time, so a long
    sequence never holds [length, vocab] logits at once.
    """
    if start >= len(tokens):
        return ScoreResult(logprobs=[], argmax=[])
    # Rows needed: the logits after tokens[start-1] .. tokens[-2].
    reused = min(common_prefix_length(model.cached_tokens(seq), tokens), start - 1)
    model.rollback(reused, seq=seq)
    logprobs: list[float] = []
    argmax: list[int] = []
    for chunk_start in range(reused, len(tokens) - 1, chunk):
        part = list(tokens[chunk_start:min(chunk_start + chunk, len(tokens) - 1)])
        rows = model.decode(part, seq=seq).logits
        first = max(start - 1 - chunk_start, 0)
        if first < len(part):
            targets = tokens[chunk_start + first + 1:chunk_start + len(part) + 1]
            scored = score_rows(rows[first:], targets)
            logprobs += scored.logprobs
            argmax += scored.argmax
    return ScoreResult(logprobs=logprobs, argmax=argmax)
