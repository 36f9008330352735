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
from typing import Protocol, runtime_checkable

# The sampling loop and the scoring are the core's, shared with the client's in-process expert;
# they are re-exported here because every backend module imports them from this one.
from tandem_core.continuation import ContinueOptions, generate, score_rows, token_logprob
from tandem_core.protocol import ModelInfo, ScoreResult, ScoreSequence, TokenLogprob

__all__ = ["Continuation", "ContinueOptions", "ContinuesAsync", "ExpertBackend", "generate",
           "score_rows", "token_logprob"]


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


@runtime_checkable
class ContinuesAsync(Protocol):
    """A backend whose continuations are queued and resolved by its own thread (the hf backends).

    The gateway awaits them on its event loop instead of parking a worker thread on each call:
    the hop to a worker thread and back cost every call a thread switch and the interpreter
    lock twice, on the path that decides how soon a session's next call reaches the batch.
    """

    async def continue_async(self, session_id: str, sequence: Sequence[int], *,
                             options: ContinueOptions) -> Continuation:
        """``continue_``, awaited on the caller's event loop."""
        ...
