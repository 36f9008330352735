"""Wire models of the expert gateway: the single definition shared by client/ and the gateway.

See docs/DESIGN.md, "The wire protocol". Every request is bounded so a malformed or hostile body is a 422,
never a crash or an unbounded allocation. Sampling is part of the contract: a token sampled at
absolute position ``p`` of the sequence the expert sees uses the uniform number
``positional_uniform(seed, p)``, so client and gateway can reproduce each other's draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MAX_SEQUENCE_TOKENS = 32_768
MAX_CONTINUE_TOKENS = 64
MAX_TOP_LOGPROBS = 20
MAX_SCORE_SEQUENCES = 64

TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Fingerprint = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of id -> bytes")]
SessionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
ModelName = Annotated[str, Field(min_length=1, max_length=128)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContinueRequest(_Wire):
    """Extend a session's sequence by ``tokens`` and return up to ``max_tokens`` expert tokens."""

    session: SessionId
    model: ModelName
    held: int = Field(ge=0, le=MAX_SEQUENCE_TOKENS, description="tokens the gateway is believed to hold")
    tokens: list[TokenId] = Field(max_length=MAX_SEQUENCE_TOKENS, description="new tokens after `held`")
    max_tokens: int = Field(default=1, ge=1, le=MAX_CONTINUE_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0 means greedy")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    tokenizer: Fingerprint


class TokenLogprob(_Wire):
    token: TokenId
    logprob: float
    top: list[tuple[TokenId, float]] = Field(default_factory=list, description="(token, logprob), best first")


class ContinueReply(_Wire):
    tokens: list[TokenId]
    logprobs: list[TokenLogprob] | None = None
    held: int = Field(ge=0, description="tokens the gateway holds for the session after this call")
    model: ModelName


class ScoreSequence(_Wire):
    tokens: list[TokenId] = Field(min_length=1, max_length=MAX_SEQUENCE_TOKENS)
    start: int = Field(ge=1, description="score tokens[start:], each given the tokens before it")


class ScoreRequest(_Wire):
    model: ModelName
    sequences: list[ScoreSequence] = Field(min_length=1, max_length=MAX_SCORE_SEQUENCES)
    tokenizer: Fingerprint


class ScoreResult(_Wire):
    logprobs: list[float] = Field(description="log P(tokens[i] | tokens[:i]) for i >= start")
    argmax: list[TokenId] = Field(description="argmax P(. | tokens[:i]) for i >= start")


class ScoreReply(_Wire):
    results: list[ScoreResult]


class ModelInfo(_Wire):
    name: ModelName
    vocab_size: int = Field(ge=1)
    tokenizer: Fingerprint
    max_context: int = Field(ge=1)


class ErrorBody(_Wire):
    type: str
    message: str


class ErrorReply(_Wire):
    error: ErrorBody


# Error `type` per HTTP status; client/expert.py maps these back to the client's error tree.
ERROR_TYPES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "session_lost",
    413: "too_large",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def positional_uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) used to sample the token at absolute ``position``."""
    return float(np.random.Generator(np.random.PCG64([seed, position])).random())


def sample_from_logits(logits: Sequence[float] | np.ndarray, *, temperature: float,
                       seed: int | None, position: int) -> int:
    """Greedy when temperature is 0, else inverse-CDF sampling with the positional uniform."""
    if temperature <= 0.0:
        # argmax of float32 logits as they are: widening to float64 is exact, so the token is
        # the same, without a copy of the row per token.
        return int(np.argmax(np.asarray(logits)))
    values = np.asarray(logits, dtype=np.float64)
    scaled = values / temperature
    probabilities = np.exp(scaled - scaled.max())
    cumulative = np.cumsum(probabilities / probabilities.sum())
    draw = positional_uniform(seed, position) if seed is not None else float(np.random.random())
    index = int(np.searchsorted(cumulative, draw, side="right"))
    return min(index, len(values) - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
