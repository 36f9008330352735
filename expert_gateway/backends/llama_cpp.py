"""The embedded llama.cpp backend: one context, one KV sequence per resident session.

Sequence id 0 is a scratch stream for /v1/score; ids 1..slots hold sessions. A session without
a slot takes the least recently used free one, and prefills only past the longest common prefix
with what that slot (or any other sequence: the engine shares prefixes) already holds.
Concurrent calls of different sessions run together: each call keeps its own sampling loop in
its gateway worker thread, and their decodes meet in the batched steps of
``tandem_core.batch_engine.BatchEngine``, the same machinery that batches the daemon's answers.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from expert_gateway.backends.base import Continuation, ContinueOptions
from expert_gateway.errors import BackendError
from tandem_core.base_model import LlamaModel
from tandem_core.batch_engine import BatchEngine, RunAhead, SequenceView
from tandem_core.continuation import continue_sequence, score_sequence
from tandem_core.errors import TandemError
from tandem_core.protocol import ModelInfo, ScoreResult, ScoreSequence

SCORE_SEQ = 0


class LlamaCppBackend:
    """ExpertBackend over ``LlamaModel`` with per-session KV sequences, batched across calls."""

    def __init__(self, model: LlamaModel, *, name: str, slots: int) -> None:
        if model.n_seq_max < slots + 1:
            raise BackendError(f"the model context has {model.n_seq_max} sequences, need {slots + 1}")
        self._model = model
        self._slots = slots
        self._engine = BatchEngine(model)
        self._slot_of: OrderedDict[str, int] = OrderedDict()
        self._busy: set[int] = set()
        self._tables = threading.Condition()
        self._score = threading.Lock()
        # One call per slot at a time; score calls share the scratch sequence.
        self.max_concurrency = slots + 1
        self.info = ModelInfo(name=name, vocab_size=model.vocab_size, tokenizer=model.fingerprint,
                              max_context=model.seq_capacity)

    @classmethod
    def open(cls, path: Path, *, name: str, n_ctx: int, n_batch: int, n_threads: int,
             slots: int, flash_attention: bool = False) -> LlamaCppBackend:
        """Load the GGUF with a context of ``slots + 1`` sequences sharing ``n_ctx`` tokens.

        Flash attention is off by default, as in the client's in-process expert: the two must
        answer alike (``tandem_core.continuation``), and it moves log-probs by up to ~0.1.
        """
        try:
            model = LlamaModel(path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                               n_seq_max=slots + 1, n_ctx_seq=n_ctx // (slots + 1),
                               flash_attention=flash_attention)
        except TandemError as exc:
            raise BackendError(f"cannot load expert model: {exc}") from exc
        return cls(model, name=name, slots=slots)

    @property
    def engine(self) -> BatchEngine:
        return self._engine

    def continue_(self, session_id: str, sequence: Sequence[int], *,
                  options: ContinueOptions) -> Continuation:
        seq = self._claim(session_id)
        view = self._engine.view(seq)
        view.open()
        # The engine feeds the sampling loop's next token before the loop asks for it.
        ahead = RunAhead(feed_until=len(sequence) + options.max_tokens - 1,
                         temperature=options.temperature, seed=options.seed)
        try:
            with view.running_ahead(ahead):
                tokens, logprobs, reused = continue_sequence(view, sequence, options=options,
                                                             seq=seq)
        except TandemError as exc:
            self._drop(view)
            raise BackendError(f"llama.cpp failed: {exc}") from exc
        finally:
            view.close()
            self._release(seq)
        return Continuation(tokens=tokens, logprobs=logprobs, reused_tokens=reused,
                            prefilled_tokens=len(sequence) - reused)

    def score(self, sequences: Sequence[ScoreSequence]) -> list[ScoreResult]:
        view = self._engine.view(SCORE_SEQ)
        with self._score:
            view.open()
            try:
                return [score_sequence(view, item.tokens, item.start, chunk=self._model.n_batch,
                                       seq=SCORE_SEQ) for item in sequences]
            except TandemError as exc:
                self._drop(view)
                raise BackendError(f"llama.cpp failed: {exc}") from exc
            finally:
                view.close()

    def forget(self, session_id: str) -> None:
        # The KV stays: the next owner of the slot may share a prefix with it.
        with self._tables:
            self._slot_of.pop(session_id, None)

    def close(self) -> None:
        self._engine.close()
        self._model.close()

    def _claim(self, session_id: str) -> int:
        """The session's slot, or the least recently used free one; waits while none is free."""
        with self._tables:
            while True:
                seq = self._slot_of.get(session_id)
                if seq is not None and seq not in self._busy:
                    self._slot_of.move_to_end(session_id)
                    break
                if seq is None:
                    seq = self._free_slot()
                    if seq is not None:
                        self._slot_of[session_id] = seq
                        break
                self._tables.wait()
            self._busy.add(seq)
            return seq

    def _free_slot(self) -> int | None:
        taken = set(self._slot_of.values())
        unowned = [seq for seq in range(1, self._slots + 1) if seq not in taken]
        if unowned:
            return unowned[0]
        for owner, seq in self._slot_of.items():  # least recently used first
            if seq not in self._busy:
                del self._slot_of[owner]
                return seq
        return None

    def _release(self, seq: int) -> None:
        with self._tables:
            self._busy.discard(seq)
            self._tables.notify_all()

    def _drop(self, view: SequenceView) -> None:
        """After a failure the KV content is unknown: start that sequence afresh."""
        with contextlib.suppress(TandemError):
            view.reset()
