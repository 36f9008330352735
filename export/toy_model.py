"""The toy llama model in torch: functional forward over GGUF-named tensors, training, greedy.

Parameters live in a dict keyed by GGUF tensor names, so writing the GGUF is a loop. RoPE is the
interleaved-pair form llama.cpp uses for the llama architecture (rope type NORM), so Q and K are
written as they are. torch is imported inside functions: this module is importable without it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from export import torch_import
from export.gguf_writer import LlamaHyperparameters, tensor_shapes
from export.torch_import import TorchMissingError as TorchMissingError  # math_model's import

if TYPE_CHECKING:
    import torch


def import_torch() -> Any:
    """torch pinned to one thread and deterministic algorithms: the toy pair builds byte-exact."""
    return torch_import.import_torch("building the toy models", pinned=True)


@dataclass(frozen=True)
class TrainingSchedule:
    """Cosine cycles with warm restarts; training stops at the first validation check that passes.

    Tiny models learn copying and addition in a sudden transition whose step varies with the
    seed; annealing helps them settle, and a restart gives a late seed another chance.
    """

    cycle_steps: int
    max_cycles: int
    learning_rate: float
    check_every: int = 100
    warmup_steps: int = 30
    weight_decay: float = 0.01

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step % self.cycle_steps) / self.cycle_steps
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def init_parameters(hparams: LlamaHyperparameters, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    torch = import_torch()
    generator = torch.Generator().manual_seed(seed)
    parameters = {}
    for name, shape in tensor_shapes(hparams, vocab_size).items():
        if len(shape) == 1:
            tensor = torch.ones(shape)
        else:
            scale = 0.02 if name.endswith(("attn_output.weight", "ffn_down.weight")) else 0.05
            tensor = torch.randn(shape, generator=generator) * scale
        parameters[name] = tensor.requires_grad_(True)
    return parameters


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    torch = import_torch()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@functools.cache
def _rope_tables(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch = import_torch()
    inverse = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inverse[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]); x is [batch, heads, time, head_dim]."""
    torch = import_torch()
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)


def forward(
    parameters: dict[str, torch.Tensor], tokens: torch.Tensor, hparams: LlamaHyperparameters
) -> torch.Tensor:
    """Logits [batch, time, vocab] for token ids [batch, time] (causal, from position 0)."""
    torch = import_torch()
    functional = torch.nn.functional
    batch, length = tokens.shape
    heads, kv_heads, head_dim = hparams.head_count, hparams.head_count_kv, hparams.head_dim
    cos, sin = _rope_tables(length, head_dim, hparams.rope_freq_base)
    eps = hparams.rms_norm_eps
    x = parameters["token_embd.weight"][tokens]
    for block in range(hparams.block_count):
        p = f"blk.{block}."
        h = _rms_norm(x, parameters[p + "attn_norm.weight"], eps)
        q = (h @ parameters[p + "attn_q.weight"].T).view(batch, length, heads, head_dim)
        k = (h @ parameters[p + "attn_k.weight"].T).view(batch, length, kv_heads, head_dim)
        v = (h @ parameters[p + "attn_v.weight"].T).view(batch, length, kv_heads, head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, length, heads * head_dim)
        x = x + attended @ parameters[p + "attn_output.weight"].T
        h = _rms_norm(x, parameters[p + "ffn_norm.weight"], eps)
        gate = functional.silu(h @ parameters[p + "ffn_gate.weight"].T)
        x = x + (gate * (h @ parameters[p + "ffn_up.weight"].T)) @ parameters[p + "ffn_down.weight"].T
    x = _rms_norm(x, parameters["output_norm.weight"], eps)
    return x @ parameters["output.weight"].T


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> Any:
    """Right-padded ids; causal attention means padding never changes earlier positions."""
    torch = import_torch()
    length = max(len(sequence) for sequence in sequences)
    rows = [list(sequence) + [pad_id] * (length - len(sequence)) for sequence in sequences]
    return torch.tensor(rows, dtype=torch.long)


BatchFn = Callable[[int], tuple[list[list[int]], list[list[float]]]]


def train(
    parameters: dict[str, torch.Tensor],
    hparams: LlamaHyperparameters,
    schedule: TrainingSchedule,
    make_batch: BatchFn,
    *,
    pad_id: int,
    good_enough: Callable[[], bool] | None = None,
) -> list[float]:
    """AdamW; ``make_batch(step)`` gives ids and per-target weights; returns the losses.

    ``weights[i][t]`` weighs the loss of predicting ``ids[i][t + 1]`` from the prefix up to t.
    ``good_enough`` runs every ``check_every`` steps; it is deterministic, so the same seed still
    stops at the same step. Without it, training runs one cycle.
    """
    torch = import_torch()
    optimizer = torch.optim.AdamW(
        parameters.values(), lr=schedule.learning_rate, weight_decay=schedule.weight_decay,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    losses = []
    for step in range(schedule.cycle_steps * schedule.max_cycles):
        ids, weights = make_batch(step)
        tokens = pad_batch(ids, pad_id)
        weight = pad_batch_weights(weights, tokens.shape[1] - 1)
        logits = forward(parameters, tokens[:, :-1], hparams)
        token_losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
        )
        loss = (token_losses * weight.reshape(-1)).sum() / weight.sum().clamp(min=1e-6)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters.values(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        at_cycle_end = (step + 1) % schedule.cycle_steps == 0
        if good_enough is None:
            if at_cycle_end:
                break
        elif (at_cycle_end or (step + 1) % schedule.check_every == 0) and good_enough():
            break
    return losses


def pad_batch_weights(weights: Sequence[Sequence[float]], length: int) -> Any:
    torch = import_torch()
    rows = [list(row)[:length] + [0.0] * (length - len(row)) for row in weights]
    return torch.tensor(rows, dtype=torch.float32)


def argmax_predictions(
    parameters: dict[str, torch.Tensor],
    hparams: LlamaHyperparameters,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy next-token choice at every position of each sequence (teacher forcing).

    Greedy decoding reproduces a gold continuation exactly when every one of these argmaxes
    equals the next gold token, so one forward pass scores exact match.
    """
    torch = import_torch()
    predictions: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            best = forward(parameters, pad_batch(chunk, pad_id), hparams).argmax(-1)
            predictions += [best[row, : len(seq)].tolist() for row, seq in enumerate(chunk)]
    return predictions


def greedy_generate(
    parameters: dict[str, torch.Tensor],
    hparams: LlamaHyperparameters,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    stop_id: int | None = None,
) -> list[int]:
    """Greedy continuation, recomputing the whole prefix each step (the model is tiny)."""
    torch = import_torch()
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            tokens = torch.tensor([list(prompt_ids) + generated], dtype=torch.long)
            next_id = int(forward(parameters, tokens, hparams)[0, -1].argmax())
            generated.append(next_id)
            if next_id == stop_id:
                break
    return generated


def to_numpy(parameters: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().astype(np.float32) for name, tensor in parameters.items()}


def from_numpy(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    torch = import_torch()
    return {name: torch.from_numpy(np.array(array)) for name, array in arrays.items()}
