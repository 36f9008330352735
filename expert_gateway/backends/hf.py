"""The transformers backend: one GPU, continuous batching of concurrent sessions.

A scheduler thread owns the model. Request threads enqueue jobs and wait. A job feeds only the
tokens past the longest common prefix with its session's KV cache. Each loop runs ONE batched
forward step over every active job: a job just arrived feeds its new tokens (the usual call of
an ongoing answer brings a few), a job already generating feeds its last sampled token. Caches
are left-padded to the longest and new tokens right-aligned, with an attention mask over both
paddings and explicit position ids, so each row computes what it would alone. A fresh session,
or one bringing more than ``batch_prefill_tokens`` new tokens, is prefilled on its own first
(padding a batch to a long prompt would waste the step). A session's cache stays on the GPU
between calls until the gateway evicts the session.

torch and transformers are imported when the backend is opened, never at module import.
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.egress import common_prefix_length
from expert_gateway.backends.base import (
    Continuation,
    ContinueOptions,
    score_rows,
    token_logprob,
)
from expert_gateway.errors import BackendError
from expert_gateway.protocol import (
    ModelInfo,
    ScoreResult,
    ScoreSequence,
    TokenLogprob,
    sample_from_logits,
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
class _SessionCache:
    tokens: list[int]
    layers: list[tuple[Any, Any]]  # per layer (keys, values), each [1, heads, len, dim]


@dataclass
class _Job:
    session_id: str
    sequence: list[int]
    options: ContinueOptions
    future: Future[Continuation] = field(default_factory=Future)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reused: int = 0
    pending: list[int] = field(default_factory=list)  # fed by the next batched step
    # The session's KV while the call runs; back in the shared table when it ends, so a
    # session evicted mid-call cannot pull the cache from under a batched step.
    cache: _SessionCache = field(default_factory=lambda: _SessionCache([], []))


@dataclass
class _ScoreJob:
    sequences: Sequence[ScoreSequence]
    future: Future[list[ScoreResult]] = field(default_factory=Future)


class HfBackend:
    """ExpertBackend over a transformers causal LM with a continuous-batching scheduler."""

    def __init__(self, model: Any, *, name: str, fingerprint: str, vocab_size: int,
                 eos_ids: frozenset[int], max_batch: int, max_context: int,
                 batch_prefill_tokens: int = 64) -> None:
        self._torch, _ = _import_torch()
        self._model = model
        self._device = next(model.parameters()).device
        self._eos_ids = eos_ids
        # transformers 5.x renamed `past_key_values` to `cache` (input and output).
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.max_batch = max_batch
        self.max_concurrency = max_batch
        self.batch_prefill_tokens = batch_prefill_tokens
        self.info = ModelInfo(name=name, vocab_size=vocab_size, tokenizer=fingerprint,
                              max_context=max_context)
        self._caches: dict[str, _SessionCache] = {}
        self._caches_lock = threading.Lock()
        self._inbox: queue.Queue[_Job | _ScoreJob | None] = queue.Queue()
        # Rows and widest row (tokens fed) of the recent batched steps, for tests and benchmarks.
        self.steps: deque[int] = deque(maxlen=STEP_HISTORY)
        self.widths: deque[int] = deque(maxlen=STEP_HISTORY)
        self._thread = threading.Thread(target=self._run, name="hf-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: Path, *, name: str, device: str, dtype: str, max_batch: int,
             max_context: int, batch_prefill_tokens: int = 64) -> HfBackend:
        torch, transformers = _import_torch()
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=getattr(torch, dtype)).to(device).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise BackendError(f"cannot load a transformers model from {path}: {exc}") from exc
        eos = model.config.eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        return cls(model, name=name, fingerprint=vocabulary_fingerprint(path),
                   vocab_size=int(model.config.vocab_size), eos_ids=eos_ids, max_batch=max_batch,
                   max_context=max_context, batch_prefill_tokens=batch_prefill_tokens)

    # -- the ExpertBackend surface (called from request threads) -----------------------------

    def continue_(self, session_id: str, sequence: Sequence[int], *,
                  options: ContinueOptions) -> Continuation:
        job = _Job(session_id, list(sequence), options)
        self._inbox.put(job)
        return job.future.result()

    def score(self, sequences: Sequence[ScoreSequence]) -> list[ScoreResult]:
        job = _ScoreJob(sequences)
        self._inbox.put(job)
        return job.future.result()

    def forget(self, session_id: str) -> None:
        with self._caches_lock:
            self._caches.pop(session_id, None)

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # -- the scheduler -----------------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Job] = []
        while True:
            arrivals = self._drain(block=not active)
            if arrivals is None:
                for job in active:
                    job.future.set_exception(BackendError("the backend is closing"))
                return
            for arrival in arrivals:
                self._guard(arrival, active)
            if active:
                batch = active[:self.max_batch]
                try:
                    self._step(batch)
                except Exception as exc:
                    for job in batch:
                        self.forget(job.session_id)
                        job.future.set_exception(BackendError(f"batched step failed: {exc}"))
                    active = active[len(batch):]
                    continue
                for job in [job for job in batch if self._finished(job)]:
                    active.remove(job)
                    self._finish(job)

    def _drain(self, *, block: bool) -> list[_Job | _ScoreJob] | None:
        items: list[_Job | _ScoreJob] = []
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return None
                items.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return items

    def _guard(self, item: _Job | _ScoreJob, active: list[_Job]) -> None:
        """Admit one arrival; its failure fails only its own future."""
        try:
            self._admit(item, active)
        except Exception as exc:
            if isinstance(item, _Job):
                self.forget(item.session_id)
            item.future.set_exception(exc if isinstance(exc, BackendError)
                                      else BackendError(f"transformers failed: {exc}"))

    def _admit(self, item: _Job | _ScoreJob, active: list[_Job]) -> None:
        if isinstance(item, _ScoreJob):
            item.future.set_result([self._score_one(entry) for entry in item.sequences])
            return
        with self._caches_lock:
            cache = self._caches.get(item.session_id) or _SessionCache([], [])
        reused = min(common_prefix_length(cache.tokens, item.sequence), len(item.sequence) - 1)
        item.reused = reused
        layers = [(keys[:, :, :reused], values[:, :, :reused]) for keys, values in cache.layers]
        if reused and len(item.sequence) - reused <= self.batch_prefill_tokens:
            # Joins the next batched step; the cache keeps only the shared prefix.
            item.cache = _SessionCache(item.sequence[:reused], layers)
            item.pending = item.sequence[reused:]
            active.append(item)
            return
        self._take(item, self._prefill(item, layers))
        if self._finished(item):
            self._finish(item)
        else:
            item.pending = [item.tokens[-1]]
            active.append(item)

    def _prefill(self, job: _Job, layers: list[tuple[Any, Any]]) -> np.ndarray:
        """Feed the job's new tokens alone; the logits of its last position."""
        torch = self._torch
        reused = job.reused
        new = job.sequence[reused:]
        output = self._forward(
            input_ids=torch.tensor([new], device=self._device),
            attention_mask=torch.ones(1, len(job.sequence), dtype=torch.long, device=self._device),
            position_ids=torch.arange(reused, len(job.sequence), device=self._device)[None],
            use_cache=True,
            **{self._cache_argument: self._cache_object(layers) if reused else None},
        )
        job.cache = _SessionCache(list(job.sequence), self._layers_of(self._returned_cache(output)))
        return output.logits[0, -1].float().cpu().numpy()

    def _step(self, batch: list[_Job]) -> None:
        """Feed every job's pending tokens in ONE forward pass; sample one token for each.

        Row ``i`` is ``[pad] * (C - c_i) + cache_i + [pad] * (N - n_i) + pending_i`` with C the
        longest cache and N the most pending tokens: the last column is every row's next-token
        distribution. Every row has a cache, so no query row is fully masked.
        """
        torch = self._torch
        caches = [job.cache for job in batch]
        cached = [len(cache.tokens) for cache in caches]
        fed = [len(job.pending) for job in batch]
        longest, width = max(cached), max(fed)
        padded = []
        for layer in range(len(caches[0].layers)):
            keys = [self._left_pad(cache.layers[layer][0], longest) for cache in caches]
            values = [self._left_pad(cache.layers[layer][1], longest) for cache in caches]
            padded.append((torch.cat(keys), torch.cat(values)))
        # Built on the host, moved in one copy each.
        mask = torch.zeros(len(batch), longest + width, dtype=torch.long)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (job, length, count) in enumerate(zip(batch, cached, fed, strict=True)):
            mask[row, longest - length:longest] = 1
            mask[row, longest + width - count:] = 1
            input_ids[row, width - count:] = torch.tensor(job.pending)
            positions[row, width - count:] = torch.arange(length, length + count)
        output = self._forward(
            input_ids=input_ids.to(self._device), attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device), use_cache=True,
            **{self._cache_argument: self._cache_object(padded)},
        )
        self.steps.append(len(batch))
        self.widths.append(width)
        new_layers = self._layers_of(self._returned_cache(output))
        logits = output.logits[:, -1].float().cpu().numpy()
        for row, (job, cache, length, count) in enumerate(zip(batch, caches, cached, fed, strict=True)):
            layers = [(self._unpad(keys[row:row + 1], longest, length, width, count),
                       self._unpad(values[row:row + 1], longest, length, width, count))
                      for keys, values in new_layers]
            job.cache = _SessionCache([*cache.tokens, *job.pending], layers)
            self._take(job, logits[row])
            job.pending = [job.tokens[-1]]

    def _unpad(self, tensor: Any, longest: int, length: int, width: int, count: int) -> Any:
        """One row's cache without padding: its ``length`` cached and ``count`` fed positions."""
        if count == width:
            return tensor[:, :, longest - length:]
        cached, fed = tensor[:, :, longest - length:longest], tensor[:, :, longest + width - count:]
        return self._torch.cat([cached, fed], dim=2)

    def _take(self, job: _Job, logits: np.ndarray) -> None:
        options = job.options
        token = sample_from_logits(logits, temperature=options.temperature, seed=options.seed,
                                   position=len(job.sequence) + len(job.tokens))
        job.tokens.append(token)
        if options.want_logprobs:
            job.logprobs.append(token_logprob(logits, token, top=options.top_logprobs))

    def _finished(self, job: _Job) -> bool:
        return len(job.tokens) >= job.options.max_tokens or job.tokens[-1] in self._eos_ids

    def _finish(self, job: _Job) -> None:
        with self._caches_lock:
            self._caches[job.session_id] = job.cache
        job.future.set_result(Continuation(
            tokens=job.tokens, logprobs=job.logprobs if job.options.want_logprobs else None,
            reused_tokens=job.reused, prefilled_tokens=len(job.sequence) - job.reused))

    def _score_one(self, item: ScoreSequence) -> ScoreResult:
        if item.start >= len(item.tokens):
            return ScoreResult(logprobs=[], argmax=[])
        torch = self._torch
        output = self._forward(input_ids=torch.tensor([item.tokens[:-1]], device=self._device))
        rows = output.logits[0, item.start - 1:].float().cpu().numpy()
        return score_rows(rows, item.tokens[item.start:])

    def _forward(self, **inputs: Any) -> Any:
        """One model call without autograd, on attention kernels that need no per-shape plan.

        cuDNN's attention (PyTorch's first choice on Hopper) builds an execution plan for every
        new sequence length, and a growing session has a new length on every call: on an H100
        that made each forward of a 0.9 B model 50 ms instead of 11 ms.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with self._torch.inference_mode(), sdpa_kernel(kernels):
            return self._model(**inputs)

    # -- cache plumbing ----------------------------------------------------------------------

    def _left_pad(self, tensor: Any, length: int) -> Any:
        missing = length - tensor.shape[2]
        if missing == 0:
            return tensor
        pad = tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3])
        return self._torch.cat([pad, tensor], dim=2)

    def _cache_object(self, layers: list[tuple[Any, Any]]) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        return cache

    def _returned_cache(self, output: Any) -> Any:
        return getattr(output, self._cache_argument)

    @staticmethod
    def _layers_of(cache: Any) -> list[tuple[Any, Any]]:
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache, strict=True))


def vocabulary_fingerprint(path: Path) -> str:
    """The vocabulary fingerprint of a model folder (same definition as client.base_model).

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

