"""The ``ExpertBackend`` protocol every backend implements, and helpers they share.

A backend continues a session's full sequence (the gateway's session store decides what that
sequence is) and scores fixed sequences. It keeps whatever cache it likes under the session id,
prefills only past the longest common prefix with what it holds, and reports how many tokens it
reused so the gateway can count prefill saved by sessions. How a ``BaseModel`` continues and
scores is ``tandem_core.continuation``, shared with the client's in-process expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# The sampling loop and the scoring are the core's, shared with the client's in-process expert;
# they are re-exported here because every backend module imports them from this one.
from tandem_core.continuation import ContinueOptions, generate, score_rows, token_logprob
from tandem_core.protocol import ModelInfo, ScoreResult, ScoreSequence, TokenLogprob

__all__ = ["Continuation", "ContinueOptions", "ExpertBackend", "generate", "score_rows",
           "token_logprob"]


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
