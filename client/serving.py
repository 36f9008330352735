"""Many answers at once: one CoDecoder per engine sequence, handed out to concurrent answers.

Each answer checks out a decoder whose base model is a ``SequenceView`` of the shared
``BatchEngine``, whose switch reads the scores the engine computed for the whole batch, and
whose expert parks the sequence while a call is in flight, so the other answers keep decoding.
The decoder itself (``client.decoding.CoDecoder``) is unchanged: policy -> fsynced audit record
-> send still happens inside it, for each answer, and the policy's caps are counted under its
own lock, so they hold exactly however many answers call at once.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from client.expert import ExpertReply, RetryGate
from client.model_worker import current_cancel
from tandem_core.batch_engine import BatchEngine, SequenceSwitch, SequenceView


class ParkingExpert:
    """An expert whose calls park the sequence in the engine while they wait for the reply.

    Several answers' calls are in flight at once: the wrapped ``HttpExpert``'s httpx client is
    thread-safe and keeps a pool of reused connections.
    """

    def __init__(self, expert: Any, view: SequenceView) -> None:
        self.expert = expert
        self.view = view

    def __getattr__(self, name: str) -> Any:
        return getattr(self.expert, name)  # destination, model, forget, ...

    def ready(self) -> bool:
        ready = getattr(self.expert, "ready", None)
        return True if ready is None else bool(ready())

    def continue_(self, *, session: str, held: int, tokens: Sequence[int], max_tokens: int,
                  temperature: float = 0.0, seed: int | None = None,
                  top_logprobs: int = 0, before_retry: RetryGate | None = None) -> ExpertReply:
        with self.view.parked():
            reply: ExpertReply = self.expert.continue_(
                session=session, held=held, tokens=tokens, max_tokens=max_tokens,
                temperature=temperature, seed=seed, top_logprobs=top_logprobs,
                before_retry=before_retry)
            return reply


DecoderFactory = Callable[[SequenceView, Any, Any], Any]


class DecoderPool:
    """One decoder per engine sequence; ``checkout`` lends one to an answer until it ends.

    ``make(base, switch, expert)`` builds a decoder (``CoDecoder`` with ``seq=base.seq``) over
    the view, scored switch and parking expert of one sequence.
    """

    def __init__(self, engine: BatchEngine, *, switch: Any, expert: Any,
                 make: DecoderFactory) -> None:
        self.engine = engine
        # The lowest free sequence first: busy sequences then stay a run of consecutive ids,
        # which llama.cpp decodes in one pass (``LlamaModel.decode_pieces``).
        self._free: queue.PriorityQueue[int] = queue.PriorityQueue()
        self.decoders = []
        for seq in range(engine.model.n_seq_max):
            view = engine.view(seq)
            scored = SequenceSwitch(view, switch)
            parking = ParkingExpert(expert, view) if expert is not None else None
            decoder = make(view, scored, parking)
            self.decoders.append(decoder)
            self._free.put(seq)
        self.decoder = self.decoders[0]  # for prompt_length and the expert's destination
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.decoders)

    @property
    def in_use(self) -> int:
        return self.size - self._free.qsize()

    @contextlib.contextmanager
    def checkout(self, *, cancelled: threading.Event | None = None) -> Iterator[Any]:
        """A free decoder for one answer; its sequence is live in the engine until the end."""
        seq = self._free.get()
        decoder = self.decoders[seq]
        view: SequenceView = decoder.base
        view.open(cancelled=cancelled if cancelled is not None else current_cancel())
        try:
            yield decoder
        finally:
            view.close()
            self._free.put(seq)
