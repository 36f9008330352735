"""The hf backend's engine: static KV slots and one batched step, replayed as CUDA graphs.

gpt-fast style. Every session owns a slot of ``capacity`` positions in one preallocated cache
tensor ``[layers, slots + 1, capacity, 2, kv_heads, head_dim]`` (the extra slot is scratch that
padded positions write into). A step feeds ``W`` tokens to each of ``B`` rows, where row ``b`` is
slot ``start + b``: the new keys and values are written in place at each token's position, and
attention reads ``cache[start:start + B, :T]`` as a view, masked so that each query sees its own
slot up to its own position. No cache is copied, padded or gathered per step.

The forward pass is our own over the model's modules (Llama, Mistral, Qwen2 and Qwen3 share the
structure: RMSNorm, rotary attention with grouped KV heads, gated MLP), because transformers'
forward cannot read a slot table and does Python work per call that a CUDA graph cannot hold.
It reuses the model's own layer modules and rotary table, so the arithmetic is the model's.

Sampling runs on the device at the end of the step (greedy, or inverse-CDF on the client's
positional uniforms in float64, plus log-probs and the top alternatives) and the step returns one
small float64 array per row, copied to the host once.

On CUDA, steps of ``B`` in the batch buckets, ``W`` in ``GRAPH_WIDTHS`` and ``T`` in the length
buckets are captured as CUDA graphs on first use (or by ``warmup``) and replayed; anything wider
(a long prefill) runs eagerly through the same function.

Each layer is two functions of tensors around the attention call (``layer_blocks``), which
``compile_blocks`` runs through torch.compile on CUDA: their elementwise work (residual adds,
RMSNorm, rotary embedding, the activation, layout changes) fuses into a few kernels. Each
captured shape keeps the fastest of ``attention_candidates``, each timed over rows at the end of
the shape's key bucket; ``TRITON_DECODE`` (``decode_attention``) attends any step's keys in
parallel chunks merged by log-sum-exp and reads each row only up to its own position, and
``SPLIT_KEYS`` does the same for batch-1 steps through SDPA, each after a check against plain
attention.

torch is imported when an engine is built, never at module import.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from expert_gateway.backends.decode_attention import NAME as TRITON_DECODE
from expert_gateway.backends.decode_attention import check as check_decode
from expert_gateway.backends.decode_attention import decode_attention, splits_for
from expert_gateway.errors import BackendError
from tandem_core.protocol import MAX_TOP_LOGPROBS

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Tokens per row of a captured step; wider steps run eagerly. 6: a call that adds 4 tokens feeds
# 5 (its last sampled token too), which width 8 would pad by 60%.
GRAPH_WIDTHS = (1, 2, 4, 6, 8)
EAGER_KERNELS = ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH")  # take a mask, no per-shape plan
MIN_LENGTH_BUCKET = 64
# A captured step's attention may also split the keys of a batch-1 step into chunks attended in
# parallel and merged by their log-sum-exp (flash-decoding): one row's 8 KV heads otherwise keep
# 8 of the chip's 132 multiprocessors busy, walking 2,000 keys in turn.
SPLIT_KEYS = "EFFICIENT_SPLIT_KEYS"
SPLIT_MIN_LENGTH = 512
SPLIT_MASK = -1e30  # finite: a chunk whose keys are all masked gets weight 0, never NaN
# TRITON_DECODE, the Triton split-key kernel (``decode_attention``): any batch, keys read up to
# each row's own length; offered where triton imports, on bf16 and fp16 models.
GIB = 1024**3
# Columns of a step's output row: token, its log-prob, then top ids and top log-probs.
TOKEN, LOGPROB, TOP = 0, 1, 2


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch``: 1, 2, 4, ..., 32, 64 for 64."""
    buckets = []
    size = 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch)


def length_buckets(capacity: int) -> tuple[int, ...]:
    """Key lengths a step attends over: 64, 128, ... below ``capacity``, then ``capacity``."""
    buckets = []
    size = MIN_LENGTH_BUCKET
    while size < capacity:
        buckets.append(size)
        size *= 2
    return (*buckets, capacity)


def bucket(value: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``value``."""
    for size in buckets:
        if size >= value:
            return size
    raise ValueError(f"{value} is above the largest bucket {buckets[-1]}")


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, element_size: int) -> int:
    return 2 * layers * kv_heads * head_dim * element_size


def check_fits(*, slots: int, capacity: int, per_token: int, free: int, headroom: int,
               device: str) -> int:
    """Bytes the slots need; a BackendError that says what to lower when they do not fit."""
    need = per_token * (slots + 1) * capacity
    if need + headroom > free:
        raise BackendError(
            f"the KV slots need {need / GIB:.2f} GiB ({slots} sessions x {capacity} tokens x "
            f"{per_token / 1024:.0f} KiB per token, plus one scratch slot) but {device} has "
            f"{free / GIB:.2f} GiB free after the weights, of which {headroom / GIB:.2f} GiB stay "
            "for activations: lower sessions.max_sessions (or hf.slots) or hf.max_context")
    return need


@dataclass(frozen=True)
class RowFeed:
    """One row of a step: ``tokens`` fed after the ``cached`` positions its slot holds."""

    cached: int
    tokens: Sequence[int]
    temperature: float = 0.0
    uniform: float = 0.0
    # >= 0: the row's first token is the one the previous launched step sampled in its row
    # ``source`` (still on the device; ``tokens[0]`` is then a placeholder). See ``launch``.
    source: int = -1


@dataclass(frozen=True)
class StepInput:
    """Host arrays of one step over ``B`` rows of ``W`` tokens (padding included)."""

    ids: np.ndarray  # [B, W] token ids (0 where padded)
    positions: np.ndarray  # [B, W] absolute positions (0 where padded)
    dest: np.ndarray  # [B, W] flat cache index slot * capacity + position (scratch where padded)
    last: np.ndarray  # [B] index of each row's last real token
    temperature: np.ndarray  # [B] float64, 0 = greedy
    uniform: np.ndarray  # [B] float64 uniforms for inverse-CDF sampling
    source: np.ndarray  # [B] row of the previous step whose sampled token is fed first, or -1
    length: int  # keys the step must attend over: 1 + the largest real position


def build_step(rows: Sequence[RowFeed], *, batch: int, width: int, start: int, capacity: int,
               scratch: int) -> StepInput:
    """Lay out ``rows`` (slots ``start``, ``start + 1``, ...) as a ``batch`` x ``width`` step.

    Rows past ``len(rows)`` and tokens past a row's own are padding: they write into the scratch
    slot, never into a session's, and their outputs are ignored.
    """
    if len(rows) > batch:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch}")
    ids = np.zeros((batch, width), dtype=np.int64)
    positions = np.zeros((batch, width), dtype=np.int64)
    pads = np.arange(batch * width, dtype=np.int64).reshape(batch, width) % capacity
    dest = scratch * capacity + pads
    last = np.zeros(batch, dtype=np.int64)
    temperature = np.zeros(batch, dtype=np.float64)
    uniform = np.zeros(batch, dtype=np.float64)
    source = np.full(batch, -1, dtype=np.int64)
    length = 1
    for index, row in enumerate(rows):
        count = len(row.tokens)
        if not 1 <= count <= width:
            raise ValueError(f"row {index} feeds {count} tokens; a step takes 1..{width}")
        end = row.cached + count
        if end > capacity:
            raise ValueError(f"row {index} would hold {end} tokens, over the slot's {capacity}")
        ids[index, :count] = row.tokens
        positions[index, :count] = np.arange(row.cached, end)
        dest[index, :count] = (start + index) * capacity + positions[index, :count]
        last[index] = count - 1
        temperature[index] = row.temperature
        uniform[index] = row.uniform
        source[index] = row.source
        length = max(length, end)
    return StepInput(ids, positions, dest, last, temperature, uniform, source, length)


def sample_head(torch: Any, logits: Any, temperature: Any, uniform: Any, top: int) -> Any:
    """Per row: the next token, its log-prob and the ``top`` best log-probs, as float64 columns.

    Greedy rows take the first maximum (numpy's argmax). Sampled rows invert the float64 CDF of
    ``softmax(logits / T)`` at their uniform, as ``protocol.sample_from_logits`` does on the host.
    """
    vocabulary = logits.shape[-1]
    wide = logits.double()
    logprobs = torch.log_softmax(wide, dim=-1)
    greedy = logits.argmax(dim=-1)
    sampled = temperature > 0
    scale = torch.where(sampled, temperature, torch.ones_like(temperature))
    cumulative = torch.softmax(wide / scale[:, None], dim=-1).cumsum(dim=-1)
    drawn = torch.searchsorted(cumulative, uniform[:, None], right=True)[:, 0].clamp_max(vocabulary - 1)
    token = torch.where(sampled, drawn, greedy)
    chosen = logprobs.gather(1, token[:, None])
    best, best_ids = logprobs.topk(top, dim=-1)
    return torch.cat([token[:, None].double(), chosen, best_ids.double(), best], dim=1)


def _model_parts(model: Any, capacity: int) -> tuple[Any, Any, Any, Any, Any]:
    """Embedding, layers, final norm, LM head and rotary module of a supported model."""
    config = model.config
    kind = getattr(config, "model_type", None)
    inner = getattr(model, "model", None)
    parts = [getattr(inner, name, None) for name in ("embed_tokens", "layers", "norm", "rotary_emb")]
    if kind not in SUPPORTED_MODEL_TYPES or None in parts or not hasattr(model, "lm_head"):
        raise BackendError(
            f"the hf backend's static-cache engine runs {', '.join(sorted(SUPPORTED_MODEL_TYPES))} "
            f"models; this one is {kind!r}: serve it through the openai_compat backend (e.g. vLLM)")
    window = getattr(config, "sliding_window", None)
    sliding = (getattr(config, "use_sliding_window", True) if kind == "qwen2"
               else "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"]))
    if window and sliding and window < capacity:
        raise BackendError(f"the model attends over a sliding window of {window} tokens, under "
                           f"hf.max_context = {capacity}: set hf.max_context <= {window}")
    embed, layers, norm, rotary = parts
    return embed, layers, norm, model.lm_head, rotary


def _free_bytes(torch: Any, device: Any) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class StaticKVEngine:
    """Static per-slot KV cache and the batched step over slot rows (graphs on CUDA)."""

    def __init__(self, model: Any, *, slots: int, capacity: int, max_batch: int,
                 cuda_graphs: bool = True, compile_blocks: bool = False) -> None:
        import torch

        self._torch = torch
        self._embed, self._layers, self._norm, self._lm_head, rotary = _model_parts(model, capacity)
        config = model.config
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        attention = self._layers[0].self_attn
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(attention, "head_dim", None) or config.hidden_size // self.heads)
        self.groups = self.heads // self.kv_heads
        self.scaling = float(getattr(attention, "scaling", self.head_dim**-0.5))
        self.qk_norm = hasattr(attention, "q_norm")
        self.vocab_size = int(self._lm_head.out_features)
        self.top = min(MAX_TOP_LOGPROBS, self.vocab_size)
        self.slots, self.capacity, self.scratch = slots, capacity, slots
        self.max_batch = min(max_batch, slots)
        per_token = kv_bytes_per_token(len(self._layers), self.kv_heads, self.head_dim,
                                       parameter.element_size())
        # Working memory beside the slots: prefill activations, graph pool, and the logits of
        # an uncached score of max_context tokens (float32, twice over).
        headroom = GIB + 8 * capacity * self.vocab_size
        self.kv_bytes = check_fits(slots=slots, capacity=capacity, per_token=per_token,
                                   free=_free_bytes(torch, self.device), headroom=headroom,
                                   device=str(self.device))
        try:
            self.cache = torch.zeros((len(self._layers), slots + 1, capacity, 2, self.kv_heads,
                                      self.head_dim), dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError) as exc:
            raise BackendError(f"cannot allocate {self.kv_bytes / GIB:.2f} GiB of KV slots: {exc}") from exc
        self._weights = [_layer_weights(torch, layer) for layer in self._layers]
        first = self._layers[0]
        blocks = layer_blocks(torch, heads=self.heads, kv_heads=self.kv_heads, dim=self.head_dim,
                              eps=_eps(first.input_layernorm),
                              qk_eps=_eps(attention.q_norm) if self.qk_norm else 0.0,
                              activation=first.mlp.act_fn)
        eager = (*blocks, merge_chunks)
        # True: the torch.compile'd blocks once compile_blocks has run; until then the very same
        # tuple (compile_blocks tests identity: two equal tuples made it skip compiling for good)
        self._blocks = {False: eager, True: eager}
        self.compiled = False
        self._splits = 0  # key chunks of the batch-1 step being captured (0: attention in one call)
        self._split_checked: dict[tuple[int, int], str | None] = {}
        self._decode_splits = 0  # > 0 while a step with the Triton kernel is captured: its chunks
        self._decode_checked: dict[tuple[int, int, int], str | None] = {}
        self.processors = (torch.cuda.get_device_properties(self.device).multi_processor_count
                           if self.device.type == "cuda" else 1)
        with torch.inference_mode():
            probe = torch.zeros(1, 1, dtype=self.dtype, device=self.device)
            cos, sin = rotary(probe, torch.arange(capacity, device=self.device)[None])
            # [capacity, 1, head_dim]: the model's own table, broadcast over heads
            self._cos, self._sin = cos[0][:, None], sin[0][:, None]
        self.batch_buckets = batch_buckets(self.max_batch)
        self.length_buckets = length_buckets(capacity)
        self.graphs_enabled = cuda_graphs and self.device.type == "cuda"
        # Attention kernels tried for each captured shape; the faster replay is kept. Measured on
        # an H200 (24x2048 model, bf16, compiled blocks), ms per step: cuDNN 1.67 / 2.32 / 1.99 /
        # 3.30 at batch 1 over 128 / 2,048 keys and batch 32 over 128 / 2,048 keys; the
        # memory-efficient kernel 1.77 / 4.47 / 2.05 / 5.01 (one block per row and KV head walks
        # the keys in turn); MATH (eager blocks) 3.07 / 4.48 / 4.56 / 23.2. cuDNN matched a
        # float64 reference and uncached passes as closely as the others (bench, tests).
        # SPLIT_KEYS applies to batch-1 steps over >= 512 keys only (see split_attention).
        # TRITON_DECODE (decode_attention) splits the keys of any step and reads each row's keys
        # up to its own length only. Measured in another run on an H200 (blocks eager: a bug then
        # kept compile_blocks from compiling), ms per step at batch 1 (width 2) over 128 / 2,048
        # keys: cuDNN 2.63 / 3.30, TRITON_DECODE 2.52 / 2.76 (with its first merge, since made a
        # single load); batch 32 over 512 / 2,048 keys: cuDNN 3.12 / 4.16, TRITON_DECODE 2.89 /
        # 3.42. It won 139 of 140 captured shapes.
        self.attention_candidates: tuple[str, ...] = (
            "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", SPLIT_KEYS, TRITON_DECODE)
        self.kernel_choice: dict[tuple[int, int, int], str] = {}
        self._kept: list[Any] = []  # every graph ever captured shares the pool: none is freed
        self._graphs: dict[tuple[int, int, int], tuple[Any, Any]] = {}
        # The tokens the last launched batched step sampled, one per row, kept on the device so
        # that the next step can be launched before the host has read them (RowFeed.source).
        self._sampled = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._turn = 0  # input loads so far; a load fills host input buffer turn % 2
        self._out_turn = 0  # launches so far; a launch's outputs land in host buffer turn % 2
        self._holders: list[PendingStep | None] = [None, None]
        if self.device.type == "cuda":
            # One float64 buffer (ids, positions, destinations, last, temperature, uniform,
            # source; all integers here are far below 2**53): one host-to-device copy per step.
            # Two of each pinned host buffer: a launch fills one while the other's copies may
            # still be queued behind the step in flight.
            cells = self.max_batch * GRAPH_WIDTHS[-1]
            self._inputs = torch.zeros((7, cells), dtype=torch.float64, device=self.device)
            self._host_inputs = [torch.zeros((7, cells), dtype=torch.float64).pin_memory()
                                 for _ in range(2)]
            self._host_outputs = [torch.zeros((slots, TOP + 2 * self.top),
                                              dtype=torch.float64).pin_memory() for _ in range(2)]
            self._loaded = [torch.cuda.Event(), torch.cuda.Event()]
            for event in self._loaded:
                event.record()
        if self.graphs_enabled:
            self._pool = torch.cuda.graph_pool_handle()
        if compile_blocks and self.device.type == "cuda":
            self.compile_blocks()

    # -- public ----------------------------------------------------------------------------

    @property
    def graphs(self) -> int:
        """CUDA graphs captured so far."""
        return len(self._graphs)

    def compile_blocks(self, enabled: bool = True) -> None:
        """Run the two per-layer blocks through torch.compile (fused elementwise kernels).

        Compiled once with dynamic shapes for all layers (the weights are arguments, not
        constants) on first use of each shape class; graphs captured before are dropped.
        """
        if enabled and self._blocks[True] is self._blocks[False]:
            import torch._dynamo

            # batch 1 and width 1 specialise; the layers share the compiled code
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            attention_inputs, mlp_block, merge = (
                self._torch.compile(block, dynamic=True, fullgraph=True) for block in self._blocks[False])
            self._blocks[True] = (attention_inputs, mlp_block, merge)
            was, self.compiled = self.compiled, True
            try:  # compile now, on throwaway steps, rather than inside the first capture
                with self._torch.inference_mode(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # inductor's advice (TF32 and the like)
                    self._probe()
            except Exception as exc:  # no compiler toolchain, or an unsupported op: stay eager
                self._blocks[True] = self._blocks[False]
                warnings.warn(f"torch.compile of the layer blocks failed, running them eagerly: "
                              f"{type(exc).__name__}: {str(exc)[:500]}", RuntimeWarning, stacklevel=2)
                return
            finally:
                self.compiled = was
        if enabled != self.compiled:
            self.compiled = enabled
            self.reset_graphs()

    def step(self, rows: Sequence[RowFeed], *, start: int = 0) -> np.ndarray:
        """Feed ``rows`` (slots ``start``...) in one forward pass and wait; one output row each.

        Output columns: the sampled token, its log-prob, ``top`` ids, ``top`` log-probs.
        A step at ``start`` 0 is a batched step (``launch``); any other is a one-row prefill,
        run eagerly, that leaves the device-side sampled tokens of the last launch alone.
        """
        if start == 0:
            return self.launch(rows).result()
        width = max(len(row.tokens) for row in rows)
        feed = build_step(rows, batch=len(rows), width=width, start=start, capacity=self.capacity,
                          scratch=self.scratch)
        length = bucket(feed.length, self.length_buckets)
        with self._torch.inference_mode(), self._kernels(EAGER_KERNELS):
            output = self._compute(*self._tensors(feed), start=start, length=length, chain=False)
            return np.asarray(output[:len(rows)].cpu().numpy())

    def launch(self, rows: Sequence[RowFeed]) -> PendingStep:
        """Queue the batched step over rows ``0..len(rows) - 1`` on the device; do not wait.

        Its sampled tokens stay on the device for the next launch (``RowFeed.source``): the host
        may prepare and launch step k + 1 while step k runs, and read step k's outputs after.
        The outputs land in one of two pinned host buffers, so at most two launches may be
        unread at a time (a third reads the oldest first).
        """
        width = max(len(row.tokens) for row in rows)
        graphed = (self.graphs_enabled and width <= GRAPH_WIDTHS[-1] and len(rows) <= self.max_batch)
        batch = bucket(len(rows), self.batch_buckets) if graphed else len(rows)
        width = bucket(width, GRAPH_WIDTHS) if graphed else width
        feed = build_step(rows, batch=batch, width=width, start=0, capacity=self.capacity,
                          scratch=self.scratch)
        length = bucket(feed.length, self.length_buckets)
        torch = self._torch
        with torch.inference_mode(), self._kernels(EAGER_KERNELS):
            began = None
            if graphed:
                graph, output = self._graph(batch, width, length)
                self._load(feed)
                began = torch.cuda.Event(enable_timing=True)
                began.record()
                graph.replay()
            else:
                output = self._compute(*self._tensors(feed), start=0, length=length, chain=True)
                if self.device.type != "cuda":
                    return PendingStep(np.asarray(output[:len(rows)].numpy()))
            turn = self._out_turn % 2
            self._out_turn += 1
            held = self._holders[turn]
            if held is not None:
                held.result()  # its buffer is about to be reused: read it first
            host = self._host_outputs[turn]
            host[:len(rows)].copy_(output[:len(rows)], non_blocking=True)
            event = torch.cuda.Event(enable_timing=began is not None)
            event.record()
            pending = PendingStep(None, host=host, rows=len(rows), event=event, began=began)
            self._holders[turn] = pending
            return pending

    def swap(self, first: int, second: int, length: int, other: int | None = None) -> None:
        """Exchange two slots' KV: ``length`` positions held in ``first``, ``other`` (default
        ``length``) in ``second``. The shorter side goes through a temporary: 2 x shorter +
        longer positions copied, instead of 3 x the longer."""
        other = length if other is None else other
        if max(length, other) <= 0 or first == second:
            return
        if length > other:  # keep the temporary the shorter one
            first, second, length, other = second, first, other, length
        with self._torch.inference_mode():
            held = self.cache[:, first, :length].clone()
            if other > 0:
                self.cache[:, first, :other].copy_(self.cache[:, second, :other])
            if length > 0:
                self.cache[:, second, :length].copy_(held)

    def warmup(self, max_length: int | None = None) -> int:
        """Capture the graphs of every bucket up to ``max_length`` keys now; how many exist."""
        if not self.graphs_enabled:
            return 0
        lengths = [size for size in self.length_buckets if max_length is None or size <= max_length]
        with self._torch.inference_mode():
            for length in lengths or self.length_buckets[:1]:
                for batch in self.batch_buckets:
                    for width in GRAPH_WIDTHS:
                        self._graph(batch, width, length)
        return len(self._graphs)

    # -- the step ----------------------------------------------------------------------------

    def replay_ms(self, batch: int, width: int, length: int, *, repeats: int = 50) -> float:
        """Median milliseconds of one replayed step of this shape over padding (benchmarks)."""
        import time

        torch = self._torch
        timings = []
        with torch.inference_mode():
            graph, _ = self._graph(batch, width, length)
            self._load(self._padding_feed(batch, width, length))
            for _ in range(repeats):
                torch.cuda.synchronize(self.device)
                started = time.perf_counter()
                graph.replay()
                torch.cuda.synchronize(self.device)
                timings.append(time.perf_counter() - started)
        return float(np.median(timings) * 1e3)

    def _probe(self) -> None:
        """One eager step over padding only (its writes land in the scratch slot)."""
        for batch, width in ((2, 2), (1, 1), (1, 2), (2, 1)):  # the shapes that specialise
            feed = build_step([], batch=batch, width=width, start=0, capacity=self.capacity,
                              scratch=self.scratch)
            with self._kernels(EAGER_KERNELS):
                self._compute(*self._tensors(feed), start=0, length=MIN_LENGTH_BUCKET, chain=False)

    def reset_graphs(self) -> None:
        """Capture afresh on next use (after changing ``attention_candidates``)."""
        self._graphs.clear()
        self.kernel_choice.clear()

    def _kernels(self, names: Sequence[str]) -> Any:
        """SDPA limited to the kernels ``names``, in order of preference."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, name) for name in names])

    def _tensors(self, feed: StepInput) -> list[Any]:
        """A step's host arrays as device tensors (eager steps)."""
        return [self._torch.from_numpy(array).to(self.device) for array in (
            feed.ids, feed.positions, feed.dest, feed.last, feed.temperature, feed.uniform, feed.source)]

    def _compute(self, ids: Any, positions: Any, dest: Any, last: Any, temperature: Any,
                 uniform: Any, source: Any, *, start: int, length: int, chain: bool) -> Any:
        """One forward step over slot rows; few kernels per layer, since a graph replays each.

        Per layer: ``attention_inputs`` (residual add, RMSNorm, one GEMM for q, k and v, rotary
        embedding, the grouped query layout), one indexed write of k and v into the slots, one
        attention call, then ``mlp_block`` (o_proj, residual add, RMSNorm, one GEMM for gate and
        up, the activation, down_proj). With ``compiled`` the two blocks are torch.compile'd, which
        fuses their elementwise work into a few kernels; the arithmetic is the same.

        With ``chain`` (batched steps) a row whose ``source`` is >= 0 takes the previous step's
        sampled token of that row as its first token, and the step's own sampled tokens are
        kept for the next.
        """
        torch = self._torch
        functional = torch.nn.functional
        batch, width = ids.shape
        if chain:
            fed = torch.where(source >= 0, self._sampled[source.clamp(min=0)], ids[:, 0])
            ids = torch.cat((fed[:, None], ids[:, 1:]), dim=1)
        attention_inputs, mlp_block, merge = self._blocks[self.compiled]
        splits = self._splits if batch == 1 else 0
        decode_splits = self._decode_splits
        x = self._embed(ids)
        cos, sin = self._cos[positions], self._sin[positions]  # [B, W, 1, D]
        bias = None
        if not decode_splits:  # the Triton kernel masks by the positions themselves
            keys_at = torch.arange(length, device=self.device)
            allowed = keys_at[None, None, :] <= positions[:, :, None]  # [B, W, T]: own slot, causal
            # Query row r of a KV head is token r // G of head r % G; one additive mask for all layers.
            allowed = allowed[:, None, :, None].expand(batch, 1, width, self.groups, length).reshape(
                batch, 1, width * self.groups, length)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~allowed, float("-inf"))
            if splits:
                bias = split_bias(torch, allowed, splits, self.dtype)
        flat = dest.reshape(-1)
        delta = None
        for index, weights in enumerate(self._weights):
            x, grouped, kv = attention_inputs(x, delta, cos, sin, *weights.attention)
            slots = self.cache[index]  # [S + 1, C, 2, KVH, D]
            slots.view(-1, 2, self.kv_heads, self.head_dim).index_copy_(0, flat, kv)
            rows = slots[start:start + batch, :length]  # a view: no cache is copied
            if decode_splits:
                out = decode_attention(torch, grouped, rows, positions, scale=self.scaling,
                                       splits=decode_splits)
            elif splits:
                out = merge(*split_attention(torch, grouped, rows, bias, splits, self.scaling))
            else:
                out = functional.scaled_dot_product_attention(
                    grouped, rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2),
                    attn_mask=bias, scale=self.scaling)
            x, delta = mlp_block(out, x, *weights.mlp)
        x = (x + delta)[torch.arange(batch, device=self.device), last]
        x = _rms_norm(functional, self._norm, x)
        logits = self._lm_head(x).float()
        output = sample_head(torch, logits, temperature, uniform, self.top)
        if chain:
            self._sampled[:batch].copy_(output[:, TOKEN])
        return output

    # -- graphs ------------------------------------------------------------------------------

    def _views(self, batch: int, width: int) -> list[Any]:
        """The step's inputs, converted from the static buffer inside the graph."""
        cells = batch * width
        ints = self._inputs[:4, :cells].long()
        ids, positions, dest = (ints[row].view(batch, width) for row in range(3))
        return [ids, positions, dest, ints[3, :batch], self._inputs[4, :batch], self._inputs[5, :batch],
                self._inputs[6, :batch].long()]

    def _load(self, feed: StepInput) -> None:
        """Copy a step's inputs to the device buffer the graphs read (queued behind the step in
        flight, which still reads it)."""
        batch, width = feed.ids.shape
        cells = batch * width
        turn = self._turn % 2
        self._turn += 1
        self._loaded[turn].synchronize()  # its last copy is done (long since, in practice)
        host = self._host_inputs[turn].numpy()
        for row, array in enumerate((feed.ids, feed.positions, feed.dest)):
            host[row, :cells] = array.reshape(-1)
        host[3, :batch], host[4, :batch], host[5, :batch] = feed.last, feed.temperature, feed.uniform
        host[6, :batch] = feed.source
        self._inputs.copy_(self._host_inputs[turn], non_blocking=True)
        self._loaded[turn].record()

    def _padding_feed(self, batch: int, width: int, length: int) -> StepInput:
        """Inputs to capture and time a step over: padding only, so every write lands in the
        scratch slot, but each row at the end of the key bucket, so that a kernel that reads a
        row's keys up to its own position (TRITON_DECODE) is timed at the bucket's full length,
        as the others always are."""
        feed = build_step([], batch=batch, width=width, start=0, capacity=self.capacity,
                          scratch=self.scratch)
        feed.positions[:] = np.arange(length - width, length)[None] if length >= width else 0
        return feed

    def _graph(self, batch: int, width: int, length: int) -> tuple[Any, Any]:
        """The captured step for this shape: captured now with each attention candidate if new,
        the fastest replay kept."""
        key = (batch, width, length)
        if key in self._graphs:
            return self._graphs[key]
        # Captures and their timed replays overwrite the sampled tokens that the step being
        # prepared may read (RowFeed.source): put them back after.
        torch = self._torch
        torch.cuda.synchronize(self.device)
        sampled = self._sampled.clone()
        try:
            return self._capture_best(batch, width, length)
        finally:
            self._sampled.copy_(sampled)
            torch.cuda.synchronize(self.device)

    def _capture_best(self, batch: int, width: int, length: int) -> tuple[Any, Any]:
        key = (batch, width, length)
        self._load(self._padding_feed(batch, width, length))
        best: tuple[float, str, Any, Any] | None = None
        failures = []
        for name in self.attention_candidates:
            if name == SPLIT_KEYS:
                if not split_count(batch, length):
                    continue  # only batch-1 steps over long key ranges split
                problem = self._check_split(width, length)
                if problem is not None:
                    failures.append(f"{name}: {problem}")
                    continue
            if name == TRITON_DECODE:
                problem = self._check_decode(batch, width, length)
                if problem is not None:
                    failures.append(f"{name}: {problem}")
                    continue
            try:
                with warnings.catch_warnings():  # "kernel not used because ..." for refusals
                    warnings.simplefilter("ignore")
                    graph, output = self._capture(batch, width, length, name)
            except Exception as exc:  # a kernel that cannot take this shape or dtype
                failures.append(f"{name}: {exc}")
                continue
            self._kept.append(graph)
            seconds = self._time(graph) if len(self.attention_candidates) > 1 else 0.0
            if best is None or seconds < best[0]:
                best = (seconds, name, graph, output)
        if best is None:
            raise BackendError(f"no attention kernel can run a step of {key}: {'; '.join(failures)}")
        self._graphs[key] = (best[2], best[3])
        self.kernel_choice[key] = best[1]
        return best[2], best[3]

    def _capture(self, batch: int, width: int, length: int, kernel: str) -> tuple[Any, Any]:
        self._splits = split_count(batch, length) if kernel == SPLIT_KEYS else 0
        self._decode_splits = self._decode_split_count(batch, length) if kernel == TRITON_DECODE else 0
        try:
            return self._capture_with(batch, width, length, "EFFICIENT_ATTENTION"
                                      if kernel in (SPLIT_KEYS, TRITON_DECODE) else kernel)
        finally:
            self._splits = self._decode_splits = 0

    def _decode_split_count(self, batch: int, length: int) -> int:
        return splits_for(batch, self.kv_heads, length, self.processors)

    def _check_decode(self, batch: int, width: int, length: int) -> str | None:
        """The Triton kernel against float64 attention on random data of this shape (once per
        shape); None if they agree to bf16 accuracy, else why the kernel is not used here."""
        key = (batch, width, length)
        if key not in self._decode_checked:
            if self.dtype not in (self._torch.bfloat16, self._torch.float16):
                problem: str | None = f"runs bf16 and fp16 models only, not {self.dtype}"
            else:
                problem = check_decode(
                    # a few rows stand for the batch: the split and chunk are the batch's own
                    self._torch, device=self.device, dtype=self.dtype, batch=min(batch, 4),
                    kv_heads=self.kv_heads, groups=self.groups, dim=self.head_dim, width=width,
                    length=length, scale=self.scaling, splits=self._decode_split_count(batch, length))
            self._decode_checked[key] = problem
        return self._decode_checked[key]

    def _capture_with(self, batch: int, width: int, length: int, kernel: str) -> tuple[Any, Any]:
        torch = self._torch
        with self._kernels([kernel]):
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisation (cuBLAS handles, workspaces) before capture
                    self._compute(*self._views(batch, width), start=0, length=length, chain=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = self._compute(*self._views(batch, width), start=0, length=length, chain=True)
        return graph, output

    def _check_split(self, width: int, length: int) -> str | None:
        """Split-key attention against one SDPA call on random data of this shape (once per
        shape); None if they agree to bf16 accuracy, else why the split is not used."""
        key = (width, length)
        if key not in self._split_checked:
            self._split_checked[key] = check_split_attention(
                self._torch, device=self.device, dtype=self.dtype, kv_heads=self.kv_heads,
                groups=self.groups, dim=self.head_dim, width=width, length=length, scale=self.scaling,
                merge=self._blocks[self.compiled][2])
        return self._split_checked[key]

    def _time(self, graph: Any, repeats: int = 3) -> float:
        import time

        torch = self._torch
        graph.replay()
        torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        for _ in range(repeats):
            graph.replay()
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - started


class PendingStep:
    """A launched step's outputs: ``result`` waits for them (once) and returns a host copy.

    ``gpu_seconds``, once read: the device time from the replay's start to its outputs' copy
    (graphed steps; 0.0 otherwise), which benchmarks set against the scheduler's loop time.
    """

    def __init__(self, ready: np.ndarray | None, *, host: Any = None, rows: int = 0,
                 event: Any = None, began: Any = None) -> None:
        self._ready, self._host, self._rows, self._event = ready, host, rows, event
        self._began = began
        self.gpu_seconds = 0.0

    def result(self) -> np.ndarray:
        if self._ready is None:
            self._event.synchronize()  # releases the interpreter lock while it waits
            self._ready = np.array(self._host[:self._rows].numpy())
            if self._began is not None:
                self.gpu_seconds = self._began.elapsed_time(self._event) / 1e3
            self._host = self._event = self._began = None
        return self._ready


def split_count(batch: int, length: int) -> int:
    """Key chunks for a split-key step of this shape: 0 unless batch 1 over >= 512 keys;
    chunks of >= 128 keys (a multiple of 16, as the kernel's bias needs), at most 16."""
    if batch != 1 or length < SPLIT_MIN_LENGTH:
        return 0
    splits = min(16, length // 128)
    while splits > 1 and (length % splits or (length // splits) % 16):
        splits -= 1
    return splits if splits > 1 else 0


def split_bias(torch: Any, allowed: Any, splits: int, dtype: Any) -> Any:
    """``[1, 1, R, T]`` allowed keys as an additive bias per key chunk, ``[S, 1, R, T / S]``."""
    rows, length = allowed.shape[2], allowed.shape[3]
    chunked = allowed.reshape(rows, splits, length // splits).permute(1, 0, 2)[:, None]
    return torch.zeros(chunked.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~chunked, SPLIT_MASK)


def split_attention(torch: Any, grouped: Any, rows: Any, bias: Any, splits: int,
                    scale: float) -> tuple[Any, Any]:
    """Attention of one row's grouped queries ``[1, KVH, R, D]`` over its slot ``rows``
    ``[1, T, 2, KVH, D]`` in ``splits`` key chunks at once: per chunk outputs ``[S, KVH, R, D]``
    and log-sum-exps ``[S, KVH, R]`` for ``merge_chunks``. The chunks are views of the slot."""
    _, kv_heads, count, dim = grouped.shape
    length = rows.shape[1]
    chunks = rows[0].view(splits, length // splits, 2, kv_heads, dim)
    keys, values = chunks[:, :, 0].transpose(1, 2), chunks[:, :, 1].transpose(1, 2)
    query = grouped.expand(splits, kv_heads, count, dim)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, keys, values, bias.expand(splits, kv_heads, count, length // splits), True, 0.0,
        False, scale=scale)[:2]
    return out, lse[:, :, :count]


def merge_chunks(out: Any, lse: Any) -> Any:
    """Merge per-chunk attention outputs by their log-sum-exps: ``[S, H, R, D]`` -> ``[1, H, R, D]``."""
    weight = (lse - lse.amax(dim=0, keepdim=True)).exp()
    total = (weight[..., None] * out.float()).sum(dim=0, keepdim=True)
    return (total / weight.sum(dim=0, keepdim=True)[..., None]).to(out.dtype)


def check_split_attention(torch: Any, *, device: Any, dtype: Any, kv_heads: int, groups: int, dim: int,
                          width: int, length: int, scale: float, merge: Any = merge_chunks) -> str | None:
    """None when split-key attention equals one SDPA call (to 2e-2) on random data of this
    shape, for a row that sees every key and one that sees a third of them; else the reason."""
    splits = split_count(1, length)
    generator = torch.Generator(device=device).manual_seed(1)
    try:
        with torch.inference_mode():
            rows = torch.randn((1, length, 2, kv_heads, dim), generator=generator, device=device,
                               dtype=dtype)
            grouped = torch.randn((1, kv_heads, width * groups, dim), generator=generator,
                                  device=device, dtype=dtype)
            for end in (length, length // 3 + width):
                positions = torch.arange(end - width, end, device=device)
                allowed = torch.arange(length, device=device)[None, :] <= positions[:, None]
                allowed = allowed[:, None].expand(width, groups, length).reshape(1, 1, width * groups, length)
                full = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
                    ~allowed, float("-inf"))
                expected = torch.nn.functional.scaled_dot_product_attention(
                    grouped, rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2),
                    attn_mask=full, scale=scale)
                got = merge(*split_attention(torch, grouped, rows, split_bias(torch, allowed, splits, dtype),
                                             splits, scale))
                error = float((got.float() - expected.float()).abs().max())
                if not error < 2e-2:
                    return f"differs from one attention call by {error:.3g} (keys 0..{end - 1})"
    except Exception as exc:  # the kernel refuses these shapes or strides here
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


@dataclass(frozen=True)
class _LayerWeights:
    """A layer's tensors in the argument order of ``layer_blocks``' two functions."""

    attention: tuple[Any, ...]  # input norm, qkv, qkv bias, q norm, k norm
    mlp: tuple[Any, ...]  # o_proj weight and bias, post-attention norm, gate_up and bias, down and bias


def _layer_weights(torch: Any, layer: Any) -> _LayerWeights:
    fused = _fuse_projections(torch, layer)
    attention, mlp = layer.self_attn, layer.mlp
    q_norm = getattr(attention, "q_norm", None)
    k_norm = getattr(attention, "k_norm", None)
    return _LayerWeights(
        attention=(layer.input_layernorm.weight, fused.qkv, fused.qkv_bias,
                   None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight),
        mlp=(attention.o_proj.weight, attention.o_proj.bias, layer.post_attention_layernorm.weight,
             fused.gate_up, fused.gate_up_bias, mlp.down_proj.weight, mlp.down_proj.bias))


def layer_blocks(torch: Any, *, heads: int, kv_heads: int, dim: int, eps: float, qk_eps: float,
                 activation: Any) -> tuple[Any, Any]:
    """The two halves of a decoder layer around attention, as functions of tensors only.

    Weights are arguments, so one compiled version serves every layer. ``attention_inputs``
    returns the residual stream, the queries grouped per KV head (``[B, KVH, W * G, D]``: query
    row r of a KV head is token r // G of head r % G) and the new keys and values in the cache's
    row layout ``[B * W, 2, KVH, D]``; ``mlp_block`` returns the residual stream after attention
    and the MLP's output, which the next layer's ``attention_inputs`` adds (so the add fuses
    with the next RMSNorm).
    """
    functional = torch.nn.functional
    groups = heads // kv_heads

    def norm(x: Any, weight: Any, epsilon: float) -> Any:
        # transformers' Llama RMSNorm: float32 statistics, weight applied in the model's dtype
        return weight * functional.rms_norm(x.float(), (x.shape[-1],), eps=epsilon).to(x.dtype)

    def rotate(tensor: Any, cos: Any, sin: Any) -> Any:
        half = tensor.shape[-1] // 2  # transformers' rotate_half convention
        return tensor * cos + torch.cat((-tensor[..., half:], tensor[..., :half]), dim=-1) * sin

    def attention_inputs(x: Any, delta: Any, cos: Any, sin: Any, input_norm: Any, qkv_weight: Any,
                         qkv_bias: Any, q_norm: Any, k_norm: Any) -> tuple[Any, Any, Any]:
        if delta is not None:
            x = x + delta
        batch, width = x.shape[0], x.shape[1]
        qkv = functional.linear(norm(x, input_norm, eps), qkv_weight, qkv_bias).view(
            batch, width, heads + 2 * kv_heads, dim)
        if q_norm is None:
            rotated = rotate(qkv[:, :, :heads + kv_heads], cos, sin)
            query, key = rotated[:, :, :heads], rotated[:, :, heads:]
        else:
            query = rotate(norm(qkv[:, :, :heads], q_norm, qk_eps), cos, sin)
            key = rotate(norm(qkv[:, :, heads:heads + kv_heads], k_norm, qk_eps), cos, sin)
        value = qkv[:, :, heads + kv_heads:]
        kv = torch.stack((key, value), dim=2).reshape(batch * width, 2, kv_heads, dim)
        grouped = query.reshape(batch, width, kv_heads, groups, dim).permute(0, 2, 1, 3, 4).reshape(
            batch, kv_heads, width * groups, dim)
        return x, grouped, kv

    def mlp_block(out: Any, x: Any, o_weight: Any, o_bias: Any, post_norm: Any, gate_up: Any,
                  gate_up_bias: Any, down: Any, down_bias: Any) -> tuple[Any, Any]:
        batch, width = x.shape[0], x.shape[1]
        out = out.reshape(batch, kv_heads, width, groups, dim).permute(0, 2, 1, 3, 4).reshape(
            batch, width, heads * dim)
        x = x + functional.linear(out, o_weight, o_bias)
        gate, up = functional.linear(norm(x, post_norm, eps), gate_up, gate_up_bias).chunk(2, dim=-1)
        return x, functional.linear(activation(gate) * up, down, down_bias)

    return attention_inputs, mlp_block


def _eps(norm: Any) -> float:
    value = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    return float(value) if value is not None else 1e-6


@dataclass(frozen=True)
class _Fused:
    qkv: Any
    qkv_bias: Any
    gate_up: Any
    gate_up_bias: Any


def _fuse_projections(torch: Any, layer: Any) -> _Fused:
    """One weight for q, k, v and one for gate, up; the modules' weights become views of them.

    Two GEMMs instead of five per layer, and no second copy of the weights: the model's own
    modules (used by ``score`` and by anyone holding the model) keep the same values.
    """
    attention, mlp = layer.self_attn, layer.mlp
    if not hasattr(mlp, "gate_proj"):
        raise BackendError("the hf engine needs a gated MLP (gate_proj, up_proj, down_proj)")

    def fuse(modules: list[Any]) -> tuple[Any, Any]:
        with torch.no_grad():
            weight = torch.cat([module.weight for module in modules])
            biases = [module.bias for module in modules]
            bias = None
            if any(value is not None for value in biases):
                bias = torch.cat([value if value is not None else
                                  torch.zeros(module.out_features, dtype=weight.dtype, device=weight.device)
                                  for value, module in zip(biases, modules, strict=True)])
            begin = 0
            for module in modules:
                end = begin + module.out_features
                module.weight = torch.nn.Parameter(weight[begin:end], requires_grad=False)
                if module.bias is not None and bias is not None:
                    module.bias = torch.nn.Parameter(bias[begin:end], requires_grad=False)
                begin = end
        return weight, bias

    qkv, qkv_bias = fuse([attention.q_proj, attention.k_proj, attention.v_proj])
    gate_up, gate_up_bias = fuse([mlp.gate_proj, mlp.up_proj])
    return _Fused(qkv, qkv_bias, gate_up, gate_up_bias)


def _rms_norm(functional: Any, norm: Any, x: Any) -> Any:
    """transformers' Llama RMSNorm (float32 statistics, weight applied in the model's dtype)."""
    return norm.weight * functional.rms_norm(x.float(), (x.shape[-1],), eps=_eps(norm)).to(x.dtype)
