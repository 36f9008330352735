"""The transformers backend: one GPU, static KV slots, batched steps replayed as CUDA graphs.

A scheduler thread owns the model and its engine (``static_kv.StaticKVEngine``). Every session
keeps its KV cache in a preallocated slot across calls (``slots.SlotTable`` says which), so a
call feeds only the tokens past the longest common prefix with what its slot holds. Running calls
occupy the slots ``[0, active)``, which are the rows of ONE batched step per loop: a call just
arrived feeds its new tokens (the usual call of an ongoing answer brings a few), a call already
generating feeds its last sampled token. Steps of up to eight tokens a row are CUDA graphs; a
call bringing more than ``batch_prefill_tokens`` new tokens is prefilled alone first, eagerly, in
chunks. Sampling and log-probs come back from the device once per step.

The loop is pipelined one step deep: it launches step k + 1, whose running calls take their last
token straight from step k's output on the device, and only then reads step k's tokens and
answers, admits and retires calls, so that Python's bookkeeping runs while the GPU steps.

The gateway runs this backend in a child process by default (``hf_process.ProcessBackend``), so
that HTTP handling does not share an interpreter lock with the scheduler. ``submit`` hands out
plain tuples for that reason: nothing pydantic is built on the scheduler thread.

torch and transformers are imported when the backend is opened, never at module import.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expert_gateway.backends.base import Continuation, ContinueOptions, score_rows
from expert_gateway.backends.hf_process import WireContinuation, WireLogprob, from_wire
from expert_gateway.backends.slots import SlotTable
from expert_gateway.backends.static_kv import LOGPROB, TOKEN, TOP, PendingStep, RowFeed, StaticKVEngine
from expert_gateway.errors import BackendError
from tandem_core.interpreter import favour_engine_threads
from tandem_core.protocol import (
    ModelInfo,
    ScoreResult,
    ScoreSequence,
    positional_uniform,
)

INSTALL_HINT = "the hf backend needs torch and transformers: pip install 'tandem[train]' transformers"
FINGERPRINT_FILE = "tandem-fingerprint.txt"
STEP_HISTORY = 10_000  # batched steps remembered in HfBackend.steps / .widths


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendError(INSTALL_HINT) from exc
    return torch, transformers


@dataclass
class _Job:
    session_id: str
    sequence: list[int]
    options: ContinueOptions
    future: Future[WireContinuation] = field(default_factory=Future)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[WireLogprob] = field(default_factory=list)
    reused: int = 0
    pending: list[int] = field(default_factory=list)  # host tokens fed by the next step
    row: int = -1  # its row (= slot) while running
    expected: int = 0  # tokens it will have once every launched step is read
    source: int = -1  # its row in the last launched step, while that step is unread
    done: bool = False  # answered (or failed): later outputs of launched steps are dropped
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _Launched:
    """A launched batched step not yet read: its calls, one per output row."""

    jobs: list[_Job]
    pending: PendingStep


@dataclass
class _Call:
    """Work other than a continuation (score, warm-up), run on the scheduler thread."""

    work: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


class HfBackend:
    """ExpertBackend over a transformers causal LM: static KV slots, graph-replayed steps."""

    def __init__(self, model: Any, *, name: str, fingerprint: str, vocab_size: int,
                 eos_ids: frozenset[int], max_batch: int, max_context: int, slots: int,
                 batch_prefill_tokens: int = 64, prefill_chunk: int = 512,
                 cuda_graphs: bool = True, attention_kernels: tuple[str, ...] | None = None,
                 compile_blocks: bool = False) -> None:
        self._torch, _ = _import_torch()
        self._model = model
        self._device = next(model.parameters()).device
        self._eos_ids = eos_ids
        self._engine = StaticKVEngine(model, slots=slots, capacity=max_context, max_batch=max_batch,
                                      cuda_graphs=cuda_graphs, compile_blocks=compile_blocks)
        if attention_kernels:
            self._engine.attention_candidates = attention_kernels
        self._table = SlotTable(slots, max_context)
        self.max_batch = self._engine.max_batch
        self.max_concurrency = self.max_batch
        self.batch_prefill_tokens = batch_prefill_tokens
        self.prefill_chunk = prefill_chunk
        self.info = ModelInfo(name=name, vocab_size=vocab_size, tokenizer=fingerprint,
                              max_context=max_context)
        self._inbox: queue.Queue[_Job | _Call | None] = queue.Queue()
        self._rows: list[_Job] = []  # row b runs in slot b (scheduler thread only)
        self._waiting: deque[_Job] = deque()
        self._launched: _Launched | None = None  # the step in flight, read after the next launch
        # Rows and widest row (tokens fed) of the recent batched steps, for tests and benchmarks.
        self.steps: deque[int] = deque(maxlen=STEP_HISTORY)
        self.widths: deque[int] = deque(maxlen=STEP_HISTORY)
        # Where the scheduler's time goes (see stats): loops that stepped without waiting for
        # work, their seconds, the seconds launching steps (inputs, replay) and waiting for them.
        # Measured on an H200 at 32 sessions (24x2048 model): 4.3 ms per loop, 0.6 ms launching,
        # 1.7 ms waiting; 7.6 ms per loop before the loop was pipelined.
        # gpu_s: the device's own time in those steps (CUDA events), for the share the GPU is busy;
        # calls, call_s: calls answered and their seconds from submit to answer (against the
        # clients' round trips, the time a call spends outside the engine).
        self._timing = {"loops": 0, "loop_s": 0.0, "engine_s": 0.0, "wait_s": 0.0, "gpu_s": 0.0,
                        "calls": 0, "call_s": 0.0}
        # The scheduler thread must take the interpreter lock back soon after each torch call
        # releases it, not after request threads busy with HTTP held it for a whole step.
        favour_engine_threads()
        self._thread = threading.Thread(target=self._run, name="hf-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: Path, *, name: str, device: str, dtype: str, max_batch: int,
             max_context: int, slots: int, batch_prefill_tokens: int = 64,
             prefill_chunk: int = 512, cuda_graphs: bool = True,
             attention_kernels: tuple[str, ...] | None = None, compile_blocks: bool = False) -> HfBackend:
        """Load the model folder and capture the step graphs (a few seconds on a GPU)."""
        torch, transformers = _import_torch()
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=getattr(torch, dtype)).to(device).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise BackendError(f"cannot load a transformers model from {path}: {exc}") from exc
        eos = model.config.eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        backend = cls(model, name=name, fingerprint=vocabulary_fingerprint(path),
                      vocab_size=int(model.config.vocab_size), eos_ids=eos_ids, max_batch=max_batch,
                      max_context=max_context, slots=slots, batch_prefill_tokens=batch_prefill_tokens,
                      prefill_chunk=prefill_chunk, cuda_graphs=cuda_graphs,
                      attention_kernels=attention_kernels, compile_blocks=compile_blocks)
        backend.warmup()
        return backend

    # -- the ExpertBackend surface (called from request threads) -----------------------------

    def continue_(self, session_id: str, sequence: Sequence[int], *,
                  options: ContinueOptions) -> Continuation:
        return from_wire(self.submit(session_id, sequence, options=options).result())

    async def continue_async(self, session_id: str, sequence: Sequence[int], *,
                             options: ContinueOptions) -> Continuation:
        """``continue_`` awaited on the event loop: the scheduler resolves it (ContinuesAsync)."""
        # shielded: a cancelled caller must not cancel the future the scheduler resolves
        future = self.submit(session_id, sequence, options=options)
        return from_wire(await asyncio.shield(asyncio.wrap_future(future)))

    def submit(self, session_id: str, sequence: Sequence[int], *,
               options: ContinueOptions) -> Future[WireContinuation]:
        """Queue a continuation without waiting; its future holds plain tuples (``from_wire``).

        The engine process sends those tuples as they are, and no pydantic object is built on
        the scheduler thread, which does this for every row of every step.
        """
        job = _Job(session_id, list(sequence), options)
        self._inbox.put(job)
        return job.future

    def score(self, sequences: Sequence[ScoreSequence]) -> list[ScoreResult]:
        return list(self.submit_score(sequences).result())

    def submit_score(self, sequences: Sequence[ScoreSequence]) -> Future[list[ScoreResult]]:
        """Queue a score without waiting (run on the scheduler thread between steps)."""
        return self.submit_call(lambda: [self._score_one(entry) for entry in sequences])

    def forget(self, session_id: str) -> None:
        """Free the session's slot (kept while a running call uses it: see ``SlotTable``)."""
        self._table.forget(session_id)

    def warmup(self, max_length: int | None = None) -> int:
        """Capture the step graphs up to ``max_length`` keys now; the number captured."""
        return int(self._call(lambda: self._engine.warmup(max_length)))

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    @property
    def engine(self) -> StaticKVEngine:
        return self._engine

    @property
    def table(self) -> SlotTable:
        return self._table

    def stats(self, *, clear: bool = False) -> dict[str, Any]:
        """Recent batched steps (rows and widest row fed), graphs and attention kernels picked.

        ``clear`` empties the step history after reading it (benchmarks measure one run).
        """
        steps, widths, timing = list(self.steps), list(self.widths), dict(self._timing)
        if clear:
            self.steps.clear()
            self.widths.clear()
            self._timing.update(loops=0, loop_s=0.0, engine_s=0.0, wait_s=0.0, gpu_s=0.0, calls=0,
                                call_s=0.0)
        choice = dict(self._engine.kernel_choice)
        return {"steps": steps, "widths": widths, "graphs": self._engine.graphs,
                "kernel_choice": {",".join(map(str, key)): name for key, name in choice.items()},
                "held": self._table.held(), "evictions": self._table.evictions, "timing": timing}

    def _call(self, work: Callable[[], Any]) -> Any:
        return self.submit_call(work).result()

    def submit_call(self, work: Callable[[], Any]) -> Future[Any]:
        """Run ``work`` on the scheduler thread between steps; its future, without waiting."""
        call = _Call(work)
        self._inbox.put(call)
        return call.future

    # -- the scheduler -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            busy = bool(self._rows or self._waiting or self._launched)  # then the drain does not wait
            looped = time.perf_counter()
            arrivals = self._drain(block=not busy)
            if arrivals is None:
                error = BackendError("the backend is closing")
                launched = self._launched.jobs if self._launched else []
                for job in [*self._rows, *self._waiting, *launched]:
                    if not job.future.done():
                        job.future.set_exception(error)
                return
            for item in arrivals:
                if isinstance(item, _Job):
                    self._waiting.append(item)
                else:
                    self._settle()  # other work sees the engine idle and every token read
                    self._run_call(item)
            self._retire_complete()
            self._admit_waiting()
            if self._rows or self._launched:
                self._step()
                if busy:
                    self._timing["loops"] += 1
                    self._timing["loop_s"] += time.perf_counter() - looped

    def _drain(self, *, block: bool) -> list[_Job | _Call] | None:
        items: list[_Job | _Call] = []
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return None
                items.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return items

    def _run_call(self, call: _Call) -> None:
        try:
            call.future.set_result(call.work())
        except Exception as exc:
            call.future.set_exception(exc if isinstance(exc, BackendError)
                                      else BackendError(f"transformers failed: {exc}"))

    def _admit_waiting(self) -> None:
        """Admit waiting calls in order while rows are free; a session runs one call at a time."""
        kept: deque[_Job] = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if len(self._rows) >= self.max_batch or self._table.is_active(job.session_id):
                kept.append(job)
            else:
                self._admit(job)
        self._waiting = kept

    def _admit(self, job: _Job) -> None:
        """Give the call its session's slot as the next row; its failure fails only its future."""
        sequence = job.sequence
        capacity = self._table.capacity
        if not sequence or len(sequence) + job.options.max_tokens - 1 > capacity:
            job.future.set_exception(BackendError(
                f"{len(sequence)} tokens + {job.options.max_tokens} new do not fit "
                f"hf.max_context = {capacity}"))
            return
        row, swaps = self._table.acquire(job.session_id)
        job.row = row
        self._rows.append(job)
        try:
            self._apply(swaps)
            reused = min(self._table.shared_prefix(row, sequence), len(sequence) - 1)
            self._table.truncate(row, reused)
            job.reused, job.pending = reused, sequence[reused:]
            if len(job.pending) > self.batch_prefill_tokens:
                self._prefill_alone(row, job)
        except Exception as exc:
            self._fail(row, exc)

    def _prefill_alone(self, row: int, job: _Job) -> None:
        """Feed a long run of new tokens in eager chunks of one row; sample the first token.

        Runs behind the step in flight (same stream) and waits for its own output; the
        device-side tokens of that step, which the next launch reads, stay as they are.
        """
        pending = job.pending
        output = None
        for begin in range(0, len(pending), self.prefill_chunk):
            chunk = pending[begin:begin + self.prefill_chunk]
            feed = self._feed(job, row, chunk)
            output = self._engine.step([feed], start=row)
            self._table.extend(row, chunk)
        assert output is not None
        job.expected += 1
        self._take(job, output[0])
        job.pending = [job.tokens[-1]]
        if self._finished(job):
            self._finish(row)

    def _step(self) -> None:
        """Launch ONE step over every running call, then read the step launched before it.

        Step k + 1 is launched before step k's tokens reach the host: a running call feeds its
        last sampled token straight from the device (``RowFeed.source``), so the host's
        bookkeeping of step k (taking tokens, answering calls, admitting new ones) overlaps
        the GPU's step k + 1. A call that reaches max_tokens is not launched again; one that
        samples an end-of-sequence token at step k has already been fed to step k + 1, whose
        output for it is dropped (its slot keeps that token's KV, which its table records).
        """
        previous, self._launched = self._launched, None
        if self._rows:
            self._launch()
        if previous is not None:
            self._read(previous)

    def _launch(self) -> None:
        rows = self._rows
        try:
            feeds = []
            for row, job in enumerate(rows):
                if job.pending:
                    feeds.append(self._feed(job, row, job.pending))
                else:  # its last token is still on the device, in its row of the step in flight
                    feed = self._feed(job, row, [0])
                    feeds.append(RowFeed(feed.cached, feed.tokens, feed.temperature, feed.uniform,
                                         source=job.source))
            started = time.perf_counter()
            pending = self._engine.launch(feeds)
            self._timing["engine_s"] += time.perf_counter() - started
        except Exception as exc:
            for row in reversed(range(len(rows))):
                self._fail(row, exc)
            return
        self.steps.append(len(rows))
        self.widths.append(max(len(feed.tokens) for feed in feeds))
        for row, job in enumerate(rows):
            if job.pending:  # host tokens: the slot holds them once this step has run
                self._table.extend(row, job.pending)
                job.pending = []
            job.source = row
            job.expected += 1
        self._launched = _Launched(list(rows), pending)

    def _read(self, launched: _Launched) -> None:
        """Take the tokens of a launched step; answer the calls that are complete."""
        started = time.perf_counter()
        try:
            output = launched.pending.result()
        except Exception as exc:
            for job in launched.jobs:
                if job.done:
                    continue
                if job.row >= 0:
                    self._retire(job.row)
                self._reject(job, exc)
            return
        finally:
            self._timing["wait_s"] += time.perf_counter() - started
        self._timing["gpu_s"] += launched.pending.gpu_seconds
        relaunched = self._launched.jobs if self._launched is not None else []
        ended = []
        for index, job in enumerate(launched.jobs):
            if job.done:
                continue
            self._take(job, output[index])
            token = job.tokens[-1]
            if job.row >= 0 and job.source >= 0 and relaunched and relaunched[job.source] is job:
                # already fed to the step in flight, from the device: its KV is being written
                self._table.extend(job.row, [token])
            elif job.row >= 0:
                job.pending = [token]
                job.source = -1
            if self._finished(job):
                ended.append(job)
        # Only now, with every table up to date with the device, may slots move.
        for job in ended:
            if job.row >= 0:
                self._retire(job.row)
            self._answer(job)

    def _retire_complete(self) -> None:
        """Give up the rows of calls whose last token is already launched (max_tokens reached):
        they are answered when that step is read."""
        for row in reversed(range(len(self._rows))):
            job = self._rows[row]
            if job.expected >= job.options.max_tokens:
                self._retire(row)

    def _feed(self, job: _Job, row: int, tokens: list[int]) -> RowFeed:
        options = job.options
        uniform = 0.0
        if options.temperature > 0:
            position = len(job.sequence) + job.expected  # where the token this step samples goes
            uniform = (positional_uniform(options.seed, position) if options.seed is not None
                       else float(np.random.random()))
        return RowFeed(cached=self._table.length(row), tokens=tokens,
                       temperature=options.temperature, uniform=uniform)

    def _take(self, job: _Job, output: np.ndarray) -> None:
        token = int(output[TOKEN])
        job.tokens.append(token)
        options = job.options
        if options.want_logprobs:
            top = min(options.top_logprobs, self._engine.top)
            ids = output[TOP:TOP + top]
            values = output[TOP + self._engine.top:TOP + self._engine.top + top]
            alternatives = [(int(index), float(value)) for index, value in zip(ids, values, strict=True)]
            job.logprobs.append((token, float(output[LOGPROB]), alternatives))

    def _finished(self, job: _Job) -> bool:
        return len(job.tokens) >= job.options.max_tokens or job.tokens[-1] in self._eos_ids

    def _retire(self, row: int) -> _Job:
        """Take the call out of ``row``; the last running call moves into that row."""
        job = self._rows[row]
        self._apply(self._table.release(row))
        moved = self._rows[-1]
        self._rows[row] = moved
        moved.row = row
        self._rows.pop()
        job.row = -1
        return job

    def _answer(self, job: _Job) -> None:
        job.done = True
        self._timing["calls"] += 1
        self._timing["call_s"] += time.perf_counter() - job.arrived
        job.future.set_result((job.tokens, job.logprobs if job.options.want_logprobs else None,
                               job.reused, len(job.sequence) - job.reused))

    def _finish(self, row: int) -> None:
        self._answer(self._retire(row))

    def _fail(self, row: int, exc: Exception) -> None:
        """End the call in ``row`` with an error; its slot keeps the KV of the tokens it holds."""
        self._reject(self._retire(row), exc)

    def _reject(self, job: _Job, exc: Exception) -> None:
        job.done = True
        if not job.future.done():
            job.future.set_exception(exc if isinstance(exc, BackendError)
                                     else BackendError(f"batched step failed: {exc}"))

    def _settle(self) -> None:
        """Read the step in flight, if any (before work that needs the engine to itself)."""
        launched, self._launched = self._launched, None
        if launched is not None:
            self._read(launched)

    def _apply(self, swaps: list[tuple[int, int]]) -> None:
        # after the table's swap, ``first`` physically holds ``second``'s tokens and vice versa
        for first, second in swaps:
            self._engine.swap(first, second, self._table.length(second), self._table.length(first))

    def _score_one(self, item: ScoreSequence) -> ScoreResult:
        if item.start >= len(item.tokens):
            return ScoreResult(logprobs=[], argmax=[])
        torch = self._torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with torch.inference_mode(), sdpa_kernel(kernels):
            output = self._model(input_ids=torch.tensor([item.tokens[:-1]], device=self._device))
        rows = output.logits[0, item.start - 1:].float().cpu().numpy()
        return score_rows(rows, item.tokens[item.start:])


def vocabulary_fingerprint(path: Path) -> str:
    """The vocabulary fingerprint of a model folder (same definition as tandem_core.base_model).

    ``tandem-fingerprint.txt`` in the folder wins (e.g. copied from the GGUF the base uses);
    else it is computed from the folder's tokenizer, decoding GPT-2 byte-level token strings.
    """
    pinned = Path(path) / FINGERPRINT_FILE
    if pinned.is_file():
        return pinned.read_text(encoding="utf-8").strip()
    import hashlib

    _, transformers = _import_torch()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise BackendError(f"no tokenizer in {path} and no {FINGERPRINT_FILE}: {exc}") from exc
    byte_decoder = {char: byte for byte, char in _bytes_to_unicode().items()}
    digest = hashlib.sha256()
    for token_id in range(len(tokenizer)):
        text = tokenizer.convert_ids_to_tokens(token_id)
        piece = (bytes(byte_decoder[char] for char in text) if all(char in byte_decoder for char in text)
                 else text.encode("utf-8"))
        digest.update(token_id.to_bytes(4, "little") + len(piece).to_bytes(4, "little") + piece)
    return digest.hexdigest()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table

