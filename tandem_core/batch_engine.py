"""Continuous batching over one llama.cpp context: many sequences, one ``llama_decode`` a step.

Each user of the engine (an answer of the daemon, a session call of the gateway) keeps its own
logic in its own thread and sees the model through a ``SequenceView``: a per-sequence handle with
``LlamaModel``'s decode/rollback surface. ``decode`` hands the tokens to the engine and waits.
The engine thread gathers the pending submissions of every live sequence (it does not wait for
parked ones, i.e. those blocked in a remote call), runs ONE ``llama_decode`` over them, scores
every returned hidden state with the switch head in ONE call, and hands each caller its rows.

Why threads around a batching engine rather than one event loop that drives every answer as a
state machine: the decoding algorithm (speculative expert spans, rollbacks, egress policy and
audit) stays written once, as straight-line code, and the same engine serves the gateway's
sessions. ctypes releases the GIL during ``llama_decode``, so the answer threads do their Python
work (sampling, egress, HTTP) while the model computes.

Scheduling, per step: every pending request contributes rows, shortest first, so the single
decode rows of running answers always go in; long prefills go in chunks of ``prefill_chunk``
tokens, at most one chunk's worth a step, and finish over several steps. A new prompt therefore
never freezes the running answers, and a new request's prefill starts at the next step. A
prompt is always cut at the same places (from its start, every ``prefill_chunk`` tokens),
whatever else is pending: llama.cpp's rows change with how a prompt is split.

Batch order: llama.cpp gets a step's pieces in sequence-id order (``LlamaModel.decode_pieces``),
and the daemon's pool lends the lowest free sequence: with one KV stream per sequence, llama.cpp
computes a batch in one pass per run of consecutive sequence ids, so a step in arrival order took
several passes.

Prompt prefixes: before a sequence prefills, the engine looks for another sequence that holds a
longer common prefix and takes its KV cells (``LlamaModel.copy_prefix``: ``llama_memory_seq_cp``).

Running ahead: a caller that states its rule for taking the base model's token (``RunAhead``:
sample greedily or with a seed, unless the switch score defers) lets the engine feed that token
into the next step itself, without waiting for the caller's Python work (sampling, egress checks,
streaming). The caller's next ``decode`` of exactly that token finds its rows already computed or
in flight; any other call (a deferral's span, a rollback, the end of the answer) first drops what
was decoded ahead and rolls its KV back. The rows are those the caller would have got: in this
context a row's logits do not depend on the batch it was decoded in. So the engine never waits
on an answer thread between steps, and answers that are ready join the next step. A caller
waiting for such a token is woken once every ``wake_every`` tokens while its chain goes on, and
at once when it stops (a deferral, the answer's end, a cancel): on 2 cores every wake-up takes
CPU from the decoding threads.

This module imports only the llama.cpp wrapper, the prompt cache, the sampling rule, the token
helpers, the error tree and the interpreter setting, so it can move with them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tandem_core.base_model import DecodeOutput, LlamaModel
from tandem_core.errors import ModelError, TandemError
from tandem_core.interpreter import favour_engine_threads
from tandem_core.prompt_cache import PromptCache
from tandem_core.protocol import sample_from_logits
from tandem_core.tokens import common_prefix_length

logger = logging.getLogger(__name__)

DEFAULT_GATHER_S = 0.004
DEFAULT_PREFILL_CHUNK = 128
SHORT_REQUEST = 64  # requests up to this many tokens (decode rows, expert spans) go in whole
# Shorter shared prefixes cost more than they save: with one KV stream per sequence a share
# copies the whole stream (n_ctx_seq cells of every layer), about a 32-token prefill's worth.
MIN_SHARED_PREFIX = 32
# Restoring a saved state costs well under a millisecond against about 4 ms a prompt token
# (``tandem_core.prompt_cache``), so even a short gain is worth it.
MIN_RESTORED_PREFIX = 4
# Tokens decoded ahead of a caller that has not taken them yet. Enough to cover an answer thread
# that lost the GIL for a few steps; each is wasted (one row of one step) when the answer stops
# on a stop sequence or is cancelled.
DEFAULT_RUN_AHEAD = 8
# A caller waiting for a token the engine fed ahead is woken once every this many tokens while
# its chain goes on (at once when it stops: a deferral, the end, a cancel). Each wake-up costs
# the caller about 0.1 ms of CPU that the two decoding threads lose on a 2-core machine, and the
# tokens after the first of a burst are handled on warm caches. Streamed tokens then come in
# bursts of this many (about 40 ms apart for SmolLM2 on 2 cores).
DEFAULT_WAKE_EVERY = 4


@runtime_checkable
class RunsAhead(Protocol):
    """A base model that can decode a caller's next tokens ahead of it (``SequenceView``)."""

    def running_ahead(self, policy: RunAhead) -> contextlib.AbstractContextManager[None]: ...


class Scorer(Protocol):
    def score(self, hidden: np.ndarray) -> np.ndarray:
        """Scores [n] for hidden states [n, d]."""
        ...


class CancelledError(TandemError):
    """The sequence's request was cancelled while it waited for the engine."""


@dataclass(frozen=True)
class RunAhead:
    """A caller's rule for taking the base model's next token, so the engine can feed it first.

    The token at ``position`` is ``sample_from_logits`` of the row before it (greedy, or seeded
    with the positional uniform), taken unless the switch score of that row is above the
    threshold then in force. Nothing is fed at or after ``feed_until`` (the caller's last token
    is never decoded) nor after an end-of-generation token. An unseeded temperature draw cannot
    be repeated, so it is never run ahead.
    """

    feed_until: int
    temperature: float = 0.0
    seed: int | None = None
    threshold: float | None = None  # None: every token is taken (a plain sampling loop)
    warmup_until: int = 0  # positions below this compare the score with warmup_threshold
    warmup_threshold: float = 1.0
    depth: int = DEFAULT_RUN_AHEAD

    def next_token(self, logits: np.ndarray, score: float | None, position: int, *,
                   greedy: int | None = None) -> int | None:
        """The token the caller will take at ``position``, or None when it may not.

        ``greedy`` is ``logits``' argmax when the caller already has it: the engine takes the
        argmax of a whole step's rows in one numpy call, because each call lets go of the
        interpreter lock and taking it back from 16 busy session threads cost the gateway's
        engine about 0.3 ms a row.
        """
        if position >= self.feed_until or (self.temperature > 0 and self.seed is None):
            return None
        if self.threshold is not None:
            limit = self.warmup_threshold if position < self.warmup_until else self.threshold
            if score is None or score > limit:
                return None
        if self.temperature <= 0 and greedy is not None:
            return greedy
        return sample_from_logits(logits, temperature=self.temperature, seed=self.seed,
                                  position=position)


class _Latch:
    """Set once by the engine (its condition held), then open for good to whoever waits.

    A held lock, released to signal. ``threading.Event`` is a ``Condition`` in Python code. On
    the engine thread right after a decode (SmolLM2-135M on 2 cores, where a step's Python runs
    on cold caches), making a request and setting its signal took 47 and 61 us with an Event,
    28 and 47 us with this latch (line profile of one answer); a one-answer step spends about
    0.7 ms outside ``llama_decode`` in all.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self) -> None:
        with self._lock:  # open once set: each waiter passes the lock on
            pass


@dataclass
class _Request:
    seq: int
    tokens: list[int]
    last_only: bool
    done: _Latch = field(default_factory=_Latch)
    fed: int = 0
    rows: list[int] = field(default_factory=list)  # batch rows to read in the current step
    logits: list[np.ndarray] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    output: DecodeOutput | None = None
    output_scores: np.ndarray | None = None
    error: BaseException | None = None
    epoch: int = 0  # the lane's epoch when made: a request of an older epoch is not continued
    position: int = -1  # where its first token goes (known for tokens fed ahead)
    end: int = -1  # the sequence's length after its last token, once decoded
    in_step: bool = False  # gathered into the step now running: not to be dropped meanwhile
    skipped: bool = False  # left out of the last step for want of room
    greedy: int | None = None  # argmax of its last row, once decoded
    taken: bool = False  # fed ahead, then taken by its caller, who now waits for it

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.fed


@dataclass
class _Lane:
    """One sequence's run-ahead state: its caller's rule and the requests fed ahead of it."""

    policy: RunAhead | None = None
    running: bool = False  # a request finished under ``policy``: its caller is past its prefill
    epoch: int = 0
    ahead: deque[_Request] = field(default_factory=deque)  # oldest first, not yet taken
    stalled: _Request | None = None  # finished, continued once ``ahead`` has room


@dataclass
class EngineStats:
    """Counters for metrics and benches: steps run, rows decoded, most sequences in one step."""

    steps: int = 0
    rows: int = 0
    scored_rows: int = 0
    max_sequences: int = 0
    shared_prefix_tokens: int = 0
    restored_prefix_tokens: int = 0  # prompt tokens not prefilled thanks to the prompt cache
    ahead_fed: int = 0  # tokens the engine fed ahead of their callers
    ahead_taken: int = 0  # of those, tokens their callers then took
    ahead_wakeups: int = 0  # callers woken by a token fed ahead that they waited for


class BatchEngine:
    """Runs the decode steps of every sequence of one ``LlamaModel`` on one thread."""

    def __init__(self, model: LlamaModel, *, scorer: Scorer | None = None,
                 gather_s: float = DEFAULT_GATHER_S,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, share_prefixes: bool = True,
                 prompt_cache: PromptCache | None = None,
                 wake_every: int = DEFAULT_WAKE_EVERY) -> None:
        self.model = model
        self.wake_every = max(1, wake_every)
        self.prompt_cache = prompt_cache
        self.scorer = scorer
        self.gather_s = gather_s
        self.prefill_chunk = max(1, min(prefill_chunk, model.n_batch))
        self.share_prefixes = share_prefixes and model.n_seq_max > 1
        self.stats = EngineStats()
        self._changed = threading.Condition()
        self._pending: dict[int, _Request] = {}
        self._live: set[int] = set()
        self._parked: set[int] = set()
        self._cancelled: dict[int, threading.Event] = {}
        self._unsaved: set[int] = set()  # closed sequences whose state the prompt cache lacks
        # seq -> a finished token fed ahead whose waiting caller is not woken yet, and the step
        # count when it was held (``wake_every``)
        self._held: dict[int, tuple[_Request, int]] = {}
        self._lanes = [_Lane() for _ in range(model.n_seq_max)]
        self._closed = False
        self._thread: threading.Thread | None = None
        self._views = [SequenceView(self, seq) for seq in range(model.n_seq_max)]

    # -- the callers' side ---------------------------------------------------------------------

    def view(self, seq: int) -> SequenceView:
        if not 0 <= seq < len(self._views):
            raise ModelError(f"sequence id {seq} is outside 0..{len(self._views) - 1}")
        return self._views[seq]

    @property
    def live(self) -> int:
        """Sequences inside a request now (parked ones included)."""
        with self._changed:
            return len(self._live)

    def open(self, seq: int, *, cancelled: threading.Event | None = None) -> None:
        """Mark ``seq`` live: the engine waits (briefly) for its submissions when gathering."""
        with self._changed:
            unsaved = seq in self._unsaved
            self._unsaved.discard(seq)
            self._live.add(seq)
            if cancelled is not None:
                self._cancelled[seq] = cancelled
        if unsaved:  # the engine thread has not saved it yet: before its new owner cuts it
            self._save(seq)

    def close_sequence(self, seq: int) -> None:
        """The caller is done with ``seq``: drop what was decoded ahead, stop waiting for it."""
        self.run_ahead(seq, None)
        with self._changed:
            self._live.discard(seq)
            self._parked.discard(seq)
            self._cancelled.pop(seq, None)
            if self.prompt_cache is not None:
                self._unsaved.add(seq)  # saved by the engine thread between steps
            self._changed.notify_all()

    def forget_prompts(self) -> None:
        """Drop what the engine keeps of earlier prompts: the prompt cache, and the KV of every
        sequence no caller holds (a document was deleted, and its passages must not stay
        reusable). Sequences in use keep theirs until their answers end."""
        with self._changed:
            idle = [seq for seq in range(self.model.n_seq_max) if seq not in self._live]
            self._unsaved.clear()
            if self.prompt_cache is not None:
                self.prompt_cache.clear()
            for seq in idle:
                self.model.reset(seq)

    @contextlib.contextmanager
    def parked(self, seq: int) -> Iterator[None]:
        """While inside, the engine does not wait for ``seq`` (it is blocked elsewhere)."""
        with self._changed:
            self._parked.add(seq)
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._parked.discard(seq)

    def run_ahead(self, seq: int, policy: RunAhead | None) -> None:
        """Let the engine feed ``seq``'s next tokens by ``policy``; None stops it and drops them."""
        if policy is None:
            self._settle(seq)
        with self._changed:
            self._lanes[seq].policy = policy
            self._lanes[seq].running = False

    def position(self, seq: int) -> int:
        """How many tokens ``seq`` holds for its caller (tokens fed ahead not counted)."""
        with self._changed:
            ahead = self._lanes[seq].ahead
            return ahead[0].position if ahead else self.model.position(seq)

    def rollback(self, seq: int, to_position: int) -> None:
        self._settle(seq)
        self.model.rollback(to_position, seq=seq)

    def submit(self, seq: int, tokens: Sequence[int], *, last_only: bool
               ) -> tuple[DecodeOutput, np.ndarray | None]:
        """Decode ``tokens`` after what ``seq`` holds, in the next steps; blocks until done."""
        request = _Request(seq, [int(token) for token in tokens], last_only)
        if not request.tokens:
            raise ModelError("decode needs at least one token")
        taken = self._take_ahead(seq, request.tokens)
        if taken is not None:
            request = taken
        else:
            self._settle(seq)
            with self._changed:
                if self._closed:
                    raise ModelError("the batching engine is closed")
                if seq in self._pending:
                    raise ModelError(f"sequence {seq} already has a decode in flight")
                self._check_cancel(seq)
                self._start()
                request.epoch = self._lanes[seq].epoch
                self._pending[seq] = request
                self._changed.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.output is not None
        return request.output, request.output_scores

    def _take_ahead(self, seq: int, tokens: list[int]) -> _Request | None:
        """The request fed ahead with exactly ``tokens``, now the caller's; None if there is none."""
        with self._changed:
            lane = self._lanes[seq]
            if not lane.ahead or lane.ahead[0].tokens != tokens:
                return None
            self._check_cancel(seq)
            request = lane.ahead.popleft()
            request.taken = True
            self.stats.ahead_taken += 1
            stalled = lane.stalled
            if stalled is not None and lane.policy is not None \
                    and len(lane.ahead) < lane.policy.depth:
                lane.stalled = None
                self._continue(stalled)
            return request

    def _settle(self, seq: int) -> None:
        """Drop the requests fed ahead of ``seq``'s caller and roll their KV back."""
        with self._changed:
            lane = self._lanes[seq]
            lane.epoch += 1  # a step finishing now does not continue the old chain
            lane.stalled = None
            dropped = list(lane.ahead)
            lane.ahead.clear()
            while any(request.in_step for request in dropped):
                self._changed.wait()
            for request in dropped:
                if not request.done.is_set():
                    self._finish(request, error=CancelledError(f"sequence {seq}: not taken"))
        if dropped and self.model.position(seq) > dropped[0].position:
            self.model.rollback(dropped[0].position, seq=seq)

    def _continue(self, request: _Request) -> None:
        """Feed the token ``request``'s caller will take next, if its rule says (lock held)."""
        seq = request.seq
        lane = self._lanes[seq]
        policy = lane.policy
        output = request.output
        if policy is None or request.epoch != lane.epoch or output is None or self._closed:
            return
        lane.running = True
        if (self._pending.get(seq, request) is not request
                or (len(request.tokens) > 1 and not request.last_only)):
            return  # a multi-row request is a deferral's span: its caller decides from its rows
        if len(lane.ahead) >= policy.depth:
            lane.stalled = request
            return
        scores = request.output_scores
        score = None if scores is None else float(np.float32(scores[-1]))
        token = policy.next_token(output.logits[-1], score, request.end,
                                  greedy=request.greedy)
        if token is None or self.model.is_end_of_generation(token):
            return
        follow = _Request(seq, [token], True, epoch=lane.epoch, position=request.end)
        self._pending[seq] = follow
        lane.ahead.append(follow)
        self.stats.ahead_fed += 1
        self._changed.notify_all()

    def close(self, *, timeout: float = 30.0) -> None:
        """Stop the engine thread after the current step; pending callers get an error."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            # The engine thread takes the interpreter lock back after each llama_decode: the
            # answer threads and the HTTP loop must not keep it for milliseconds meanwhile.
            favour_engine_threads()
            self._thread = threading.Thread(target=self._serve, name="tandem-batch-engine",
                                            daemon=True)
            self._thread.start()

    def _check_cancel(self, seq: int) -> None:
        event = self._cancelled.get(seq)
        if event is not None and event.is_set():
            raise CancelledError(f"sequence {seq}: request cancelled")

    def _serve(self) -> None:
        while True:
            requests = self._gather()
            if requests is None:
                return
            try:
                self._step(requests)
            except Exception as exc:  # a failed step fails its requests, never the engine
                logger.exception("batched decode step failed")
                with self._changed:
                    for request in requests:
                        self._finish(request, error=exc)
                    self._wake_held(everyone=True)
            finally:
                with self._changed:
                    for request in requests:
                        request.in_step = False
                    self._wake_held()  # also after a step that decoded nothing
                    self._changed.notify_all()

    def _gather(self) -> list[_Request] | None:
        """The requests of this step: wait for work, then briefly for every live sequence."""
        with self._changed:
            while not self._pending and not self._closed and not self._unsaved:
                self._changed.wait()
            if self._closed:
                self._wake_held(everyone=True)
                for request in list(self._pending.values()):
                    self._finish(request, error=ModelError("the batching engine is closed"))
                return None
            if not self._pending:
                return []  # woken to save a closed sequence
            deadline = time.monotonic() + self.gather_s
            while True:
                # A caller running ahead is busy with the rows fed to it, or off to its expert
                # or its end (the engine did not feed it): not about to submit.
                waiting = {seq for seq in self._live - self._parked - set(self._pending)
                           if not self._lanes[seq].running}
                left = deadline - time.monotonic()
                if not waiting or left <= 0 or self._closed:
                    break
                self._changed.wait(left)
            for seq, request in list(self._pending.items()):
                event = self._cancelled.get(seq)
                if event is not None and event.is_set():
                    self._finish(request, error=CancelledError(f"sequence {seq}: cancelled"))
            requests = list(self._pending.values())
            for request in requests:
                request.in_step = True
            return requests

    def _step(self, requests: list[_Request]) -> None:
        self._save_closed()  # first: a new prompt of this step may want what they held
        model = self.model
        requests = self._prompts_first(self._admitted(requests))
        pieces: list[tuple[int, list[int]]] = []
        budget = model.n_batch
        prefill_budget = self.prefill_chunk
        row = 0
        included: list[_Request] = []
        # Short requests first (every running answer's decode row goes in), except that a
        # request left out of the last step goes first now, so it cannot starve.
        for request in sorted(requests, key=lambda item: (not item.skipped, item.remaining)):
            # A request's pieces never depend on what else is pending: it goes whole, or in
            # chunks of prefill_chunk from its start, or waits for the next step. llama.cpp's
            # rows change with how a prompt is split, so an answer must be split the same way
            # whether it runs alone or among others.
            take = min(request.remaining, self.prefill_chunk)
            long = take > SHORT_REQUEST
            if take > budget or (long and take > prefill_budget):
                request.skipped = True
                continue
            request.skipped = False
            if long:
                prefill_budget -= take
            chunk = request.tokens[request.fed:request.fed + take]
            final = request.fed + take == len(request.tokens)
            if request.last_only:
                request.rows = [row + take - 1] if final else []
            else:
                request.rows = list(range(row, row + take))
            pieces.append((request.seq, chunk))
            included.append(request)
            request.fed += take
            budget -= take
            row += take
        if not pieces:
            return
        try:
            model.decode_pieces(pieces)
        except Exception as exc:
            with self._changed:
                for request in included:
                    self._finish(request, error=exc)
            return
        for request in included:
            request.end = model.position(request.seq)
        self.stats.steps += 1
        self.stats.rows += row
        self.stats.max_sequences = max(self.stats.max_sequences, len(pieces))
        wanted = [index for request in included for index in request.rows]
        output = model.read_rows(wanted)
        scores = None
        if self.scorer is not None and wanted:
            scores = np.asarray(self.scorer.score(output.hidden), dtype=np.float64)
            self.stats.scored_rows += len(wanted)
        greedy = np.argmax(output.logits, axis=1) if wanted else None  # one call for the step
        at = 0
        for request in included:
            count = len(request.rows)
            if count:
                assert greedy is not None
                request.greedy = int(greedy[at + count - 1])
                request.logits.append(output.logits[at:at + count])
                request.hidden.append(output.hidden[at:at + count])
                if scores is not None:
                    request.scores.append(scores[at:at + count])
            at += count
            request.rows = []
        with self._changed:
            for request in included:
                if request.remaining == 0:
                    request.output = DecodeOutput(_joined(request.logits),
                                                  _joined(request.hidden), request.greedy)
                    if request.scores:
                        request.output_scores = _joined(request.scores)
                    self._continue(request)  # first: its caller wakes to the token fed
                    if not self._hold(request):
                        self._finish(request)

    def _admitted(self, requests: list[_Request]) -> list[_Request]:
        """New requests checked (one that cannot fit fails alone, not the step) and shortened
        by a prefix held elsewhere; the rest as they are."""
        admitted = []
        for request in requests:
            if request.fed == 0 and not request.skipped:
                try:
                    self.model.check_decode(request.tokens, request.seq)
                except TandemError as exc:
                    with self._changed:
                        self._finish(request, error=exc)
                    continue
                if request.last_only and (
                        (self.share_prefixes and len(request.tokens) > MIN_SHARED_PREFIX)
                        or (self.prompt_cache is not None
                            and len(request.tokens) > MIN_RESTORED_PREFIX)):
                    self._share_prefix(request)
            admitted.append(request)
        return admitted

    def _prompts_first(self, requests: list[_Request]) -> list[_Request]:
        """New prompts that finish in this step, alone, when other requests wait with them.

        With one KV stream per sequence llama.cpp computes a step of decode rows and a prompt in
        one pass for the rows and one for the rest of the prompt, and hands back every row at
        the end. In a step of its own the prompt's pass comes first, so a new answer's first
        token comes a decode step sooner and the running answers' rows no later. The requests
        left out go first in the next step, which therefore never leaves them out again.
        """
        prompts = [request for request in requests
                   if request.last_only and request.fed == 0
                   and 1 < len(request.tokens) <= self.prefill_chunk]
        if not prompts or len(prompts) == len(requests) \
                or any(request.skipped for request in requests):
            return requests
        chosen = {id(prompt) for prompt in prompts}
        for request in requests:
            if id(request) not in chosen:
                request.skipped = True
        return prompts

    def _hold(self, request: _Request) -> bool:
        """Leave the caller of a finished run-ahead token asleep while its chain goes on
        (engine condition held); ``_wake_held`` wakes it."""
        follow = self._pending.get(request.seq)
        if (self.wake_every == 1 or not request.taken or request.seq in self._held
                or follow is None or follow is request):
            return False
        self._held[request.seq] = (request, self.stats.steps)
        return True

    def _wake_held(self, *, everyone: bool = False) -> None:
        """Wake callers held for ``wake_every`` steps, or whose chain stopped (condition held)."""
        for seq, (held, since) in list(self._held.items()):
            if (everyone or seq not in self._pending
                    or self.stats.steps - since >= self.wake_every - 1):
                del self._held[seq]
                self._finish(held)

    def _finish(self, request: _Request, *, error: BaseException | None = None) -> None:
        """Hand a request back (engine condition held)."""
        if self._pending.get(request.seq) is request:
            del self._pending[request.seq]
        if error is not None:
            request.error = error
        if request.taken:
            self.stats.ahead_wakeups += 1
        request.done.set()

    def _share_prefix(self, request: _Request) -> None:
        """Skip the part of a prompt whose KV another sequence or the prompt cache holds.

        Only for requests that want the last row alone: the rows of skipped tokens are not
        computed. Another sequence's prefix is copied with ``copy_prefix`` (a whole stream, so
        only when it saves ``MIN_SHARED_PREFIX`` tokens); a saved state is restored whole and cut
        back.
        """
        model = self.model
        seq = request.seq
        with model._lock:  # other sequences' owners may roll back meanwhile
            held = model.cached_tokens(seq)
            wanted = held + request.tokens
            best, best_length = None, len(held)
            if self.share_prefixes:
                for other in range(model.n_seq_max):
                    if other == seq:
                        continue
                    length = common_prefix_length(model.cached_tokens(other), wanted)
                    if length > best_length:
                        best, best_length = other, length
            best_length = min(best_length, len(wanted) - 1)  # decode one token for outputs
            if best_length - len(held) < MIN_SHARED_PREFIX:
                best, best_length = None, len(held)
            if self.prompt_cache is not None:
                saved, length = self.prompt_cache.longest(wanted)
                length = min(length, len(wanted) - 1)
                if saved is not None and length >= best_length \
                        and length - len(held) >= MIN_RESTORED_PREFIX:
                    try:
                        model.restore_sequence(seq, saved)
                        model.rollback(length, seq=seq)
                    except ModelError:
                        logger.warning("could not restore a saved prompt into sequence %d", seq)
                        model.reset(seq)
                        request.tokens = wanted  # the sequence is empty now: prefill it all
                        return
                    request.tokens = request.tokens[length - len(held):]
                    self.stats.restored_prefix_tokens += length - len(held)
                    return
            if best is None:
                return
            try:
                model.copy_prefix(best, seq, best_length)
            except ModelError:
                logger.warning("could not share a prefix of sequence %d with %d", best, seq)
                return
        request.tokens = request.tokens[best_length - len(held):]
        self.stats.shared_prefix_tokens += best_length - len(held)

    def _save_closed(self) -> None:
        """Save the sequences closed since the last step into the prompt cache."""
        with self._changed:
            closed = sorted(self._unsaved)
            self._unsaved.clear()
        for seq in closed:
            self._save(seq)

    def _save(self, seq: int) -> None:
        assert self.prompt_cache is not None
        try:
            saved = self.model.save_sequence(seq)
        except ModelError:
            logger.warning("could not save sequence %d into the prompt cache", seq)
            return
        if saved is not None:
            self.prompt_cache.store(saved)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The rows of one request: the step's own array when they came in one step (no copy)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class SequenceView:
    """One sequence of the engine's model with the ``LlamaModel`` surface a decoder uses.

    ``decode`` goes through the engine's batched steps; everything else (tokenizer, rollback)
    goes to the model. The scores of the latest decode are kept for ``SequenceSwitch``.
    """

    def __init__(self, engine: BatchEngine, seq: int) -> None:
        self.engine = engine
        self.seq = seq
        self._model = engine.model
        self.last_output: DecodeOutput | None = None
        self.last_scores: np.ndarray | None = None

    def __getattr__(self, name: str) -> Any:
        # the rest of the model's surface (n_threads, bos_id, close_sequence's callers, ...)
        return getattr(self._model, name)

    # The BaseModel members are spelled out so that mypy sees a SequenceView as a BaseModel.

    @property
    def n_ctx(self) -> int:
        """The context one sequence may use."""
        return self._model.seq_capacity

    @property
    def vocab_size(self) -> int:
        return self._model.vocab_size

    @property
    def hidden_size(self) -> int:
        return self._model.hidden_size

    @property
    def bos_id(self) -> int:
        return self._model.bos_id

    @property
    def eos_id(self) -> int:
        return self._model.eos_id

    @property
    def fingerprint(self) -> str:
        return self._model.fingerprint

    @property
    def chat_template(self) -> str | None:
        return self._model.chat_template

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        return self._model.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        return self._model.token_bytes(token_id, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        return self._model.detokenize(tokens, special=special)

    def is_end_of_generation(self, token_id: int) -> bool:
        return self._model.is_end_of_generation(token_id)

    def _own(self, seq: int) -> None:
        if seq != self.seq:
            raise ModelError(f"this view decodes sequence {self.seq}, not {seq}")

    def position(self, seq: int | None = None) -> int:
        self._own(self.seq if seq is None else seq)
        return self.engine.position(self.seq)

    def cached_tokens(self, seq: int | None = None) -> list[int]:
        self._own(self.seq if seq is None else seq)
        held = self.engine.position(self.seq)  # first: tokens fed ahead only come after it
        return self._model.cached_tokens(self.seq)[:held]

    def decode(self, tokens: Sequence[int], *, seq: int | None = None,
               last_only: bool = False) -> DecodeOutput:
        self._own(self.seq if seq is None else seq)
        output, scores = self.engine.submit(self.seq, tokens, last_only=last_only)
        self.last_output, self.last_scores = output, scores
        return output

    def rollback(self, to_position: int, *, seq: int | None = None) -> None:
        self._own(self.seq if seq is None else seq)
        self.engine.rollback(self.seq, to_position)

    def reset(self, seq: int | None = None) -> None:
        self.rollback(0, seq=seq)

    def open(self, *, cancelled: threading.Event | None = None) -> None:
        self.engine.open(self.seq, cancelled=cancelled)

    def close(self) -> None:
        self.engine.close_sequence(self.seq)

    def parked(self) -> contextlib.AbstractContextManager[None]:
        return self.engine.parked(self.seq)

    @contextlib.contextmanager
    def running_ahead(self, policy: RunAhead) -> Iterator[None]:
        """While inside, the engine feeds this sequence's next tokens by ``policy``."""
        self.engine.run_ahead(self.seq, policy)
        try:
            yield
        finally:
            self.engine.run_ahead(self.seq, None)


class SequenceSwitch:
    """A switch scorer for one view: rows of its latest decode come scored by the engine.

    The engine scored every hidden state of the step in one call; a decoder asking for rows of
    that output (``output.hidden[i]``, ``output.hidden[:-1]``) gets those scores. Any other
    array is scored directly, so the answer never depends on which path ran.
    """

    def __init__(self, view: SequenceView, scorer: Scorer) -> None:
        self.view = view
        self.scorer = scorer
        self.direct_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scorer, name)  # threshold, metadata, ...

    def score(self, hidden: np.ndarray) -> np.ndarray:
        found = self._lookup(hidden)
        if found is not None:
            return found
        self.direct_calls += 1
        return np.asarray(self.scorer.score(hidden))

    def _lookup(self, hidden: np.ndarray) -> np.ndarray | None:
        output, scores = self.view.last_output, self.view.last_scores
        if output is None or scores is None or hidden.ndim != 2 or hidden.shape[0] == 0:
            return None
        source = output.hidden
        if (hidden.dtype != source.dtype or hidden.shape[1] != source.shape[1]
                or hidden.strides[1] != source.strides[1]
                or (hidden.shape[0] > 1 and hidden.strides[0] != source.strides[0])):
            return None
        # Rows of ``source`` are the arrays that start inside its buffer on a row boundary.
        # (``ndarray.ctypes`` and ``np.shares_memory`` made this lookup most of an answer
        # thread's time per token; the address comes cheaper from the array interface.)
        offset = hidden.__array_interface__["data"][0] - source.__array_interface__["data"][0]
        first, misaligned = divmod(offset, source.strides[0])
        if misaligned or not 0 <= first <= source.shape[0] - hidden.shape[0]:
            return None
        return scores[first:first + hidden.shape[0]].astype(np.float32)
