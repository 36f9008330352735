"""The embedded llama.cpp backend: one context, one KV sequence per resident session.

Sequence id 0 is a scratch stream for /v1/score; ids 1..slots hold sessions. A session without
a slot takes the least recently used one, and prefills only past the longest common prefix with
what that slot already holds (so even a session that lost its slot, or a new session that shares
a prompt with the previous owner, reuses work). Calls are serialised: one llama.cpp context is
not thread-safe, and the gateway gives this backend a concurrency of one.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from client.base_model import LlamaModel
from client.egress import common_prefix_length
from client.errors import TandemError
from expert_gateway.backends.base import (
    Continuation,
    ContinueOptions,
    generate,
    score_rows,
)
from expert_gateway.errors import BackendError
from expert_gateway.protocol import ModelInfo, ScoreResult, ScoreSequence

SCORE_SEQ = 0


class LlamaCppBackend:
    """ExpertBackend over ``client.base_model.LlamaModel`` with per-session KV sequences."""

    max_concurrency = 1

    def __init__(self, model: LlamaModel, *, name: str, slots: int) -> None:
        if model.n_seq_max < slots + 1:
            raise BackendError(f"the model context has {model.n_seq_max} sequences, need {slots + 1}")
        self._model = model
        self._slots = slots
        # What each KV sequence holds, token for token (index 0 is the scoring scratch).
        self._cached: list[list[int]] = [[] for _ in range(slots + 1)]
        self._slot_of: OrderedDict[str, int] = OrderedDict()
        self._tables = threading.Lock()
        self._call = threading.Lock()
        self.info = ModelInfo(name=name, vocab_size=model.vocab_size, tokenizer=model.fingerprint,
                              max_context=model.n_ctx // (slots + 1))

    @classmethod
    def open(cls, path: Path, *, name: str, n_ctx: int, n_batch: int, n_threads: int,
             slots: int) -> LlamaCppBackend:
        """Load the GGUF with a context of ``slots + 1`` sequences."""
        try:
            model = LlamaModel(path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                               n_seq_max=slots + 1)
        except TandemError as exc:
            raise BackendError(f"cannot load expert model: {exc}") from exc
        return cls(model, name=name, slots=slots)

    def continue_(self, session_id: str, sequence: Sequence[int], *,
                  options: ContinueOptions) -> Continuation:
        with self._call:
            seq = self._slot_for(session_id)
            try:
                reused, logits = self._prefill(seq, sequence)
                tokens, logprobs = generate(
                    logits, lambda token: self._feed(seq, token), position=len(sequence),
                    options=options, is_end=self._model.is_end_of_generation,
                )
            except TandemError as exc:
                self._drop(seq)
                raise BackendError(f"llama.cpp failed: {exc}") from exc
        return Continuation(tokens=tokens, logprobs=logprobs, reused_tokens=reused,
                            prefilled_tokens=len(sequence) - reused)

    def score(self, sequences: Sequence[ScoreSequence]) -> list[ScoreResult]:
        with self._call:
            try:
                return [self._score_one(item.tokens, item.start) for item in sequences]
            except TandemError as exc:
                self._drop(SCORE_SEQ)
                raise BackendError(f"llama.cpp failed: {exc}") from exc

    def forget(self, session_id: str) -> None:
        # The KV stays: the next owner of the slot may share a prefix with it.
        with self._tables:
            self._slot_of.pop(session_id, None)

    def close(self) -> None:
        with self._call:
            self._model.close()

    def _slot_for(self, session_id: str) -> int:
        with self._tables:
            if session_id in self._slot_of:
                self._slot_of.move_to_end(session_id)
                return self._slot_of[session_id]
            taken = set(self._slot_of.values())
            free = [seq for seq in range(1, self._slots + 1) if seq not in taken]
            if free:
                seq = free[0]
            else:
                _, seq = self._slot_of.popitem(last=False)
            self._slot_of[session_id] = seq
            return seq

    def _prefill(self, seq: int, sequence: Sequence[int]) -> tuple[int, np.ndarray]:
        """Make ``seq`` hold ``sequence``; return tokens reused and the last position's logits."""
        # Keep at least one token to decode: its logits are the distribution of the next token.
        reused = min(common_prefix_length(self._cached[seq], sequence), len(sequence) - 1)
        self._model.rollback(reused, seq=seq)
        self._cached[seq] = list(sequence[:reused])
        output = self._model.decode(list(sequence[reused:]), seq=seq, last_only=True)
        self._cached[seq] = list(sequence)
        return reused, output.logits[-1]

    def _feed(self, seq: int, token: int) -> np.ndarray:
        output = self._model.decode([token], seq=seq)
        self._cached[seq].append(token)
        return output.logits[-1]

    def _score_one(self, tokens: Sequence[int], start: int) -> ScoreResult:
        if start >= len(tokens):
            return ScoreResult(logprobs=[], argmax=[])
        # Rows needed: the logits after tokens[start-1] .. tokens[-2].
        reused = min(common_prefix_length(self._cached[SCORE_SEQ], tokens), start - 1)
        self._model.rollback(reused, seq=SCORE_SEQ)
        self._cached[SCORE_SEQ] = list(tokens[:reused])
        logprobs: list[float] = []
        argmax: list[int] = []
        # Chunk by chunk, so a long sequence never holds [length, vocab] logits at once.
        for chunk_start in range(reused, len(tokens) - 1, self._model.n_batch):
            chunk = list(tokens[chunk_start:min(chunk_start + self._model.n_batch, len(tokens) - 1)])
            rows = self._model.decode(chunk, seq=SCORE_SEQ).logits
            self._cached[SCORE_SEQ].extend(chunk)
            first = max(start - 1 - chunk_start, 0)
            if first < len(chunk):
                targets = tokens[chunk_start + first + 1:chunk_start + len(chunk) + 1]
                scored = score_rows(rows[first:], targets)
                logprobs += scored.logprobs
                argmax += scored.argmax
        return ScoreResult(logprobs=logprobs, argmax=argmax)

    def _drop(self, seq: int) -> None:
        """After a failure the KV content is unknown: start that sequence afresh."""
        with contextlib.suppress(TandemError):
            self._model.reset(seq=seq)
        self._cached[seq] = []
