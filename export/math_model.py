"""The math expert's network in torch: a llama model over a compact slice of SmolLM2's vocabulary.

The expert reads any SmolLM2 token but only needs to tell apart the few thousand that GSM8K text
uses, and only ever writes digits, ``.``, ``-`` and ``>>``. So the trained model has a compact
input table (frequent tokens, plus one row shared by every other id) and a compact output table
(those 13 tokens). The full-vocabulary GGUF is assembled from it (export.math_expert).

One hidden dimension, the last, is held constant: every embedding row has ``ANCHOR`` there, no
block writes to it (its rows of ``attn_output`` and ``ffn_down`` are zero) and the final norm's
gain there is 1. After the final RMSNorm that coordinate is ``ANCHOR / rms(x) > 0`` for every
input. An unused vocabulary row in the GGUF is a used row minus ``MARGIN`` times that unit
vector, so its logit is the used row's logit minus a positive amount: it can never be the
argmax, for any input, without changing anything the trained model computes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from export import torch_import

if TYPE_CHECKING:
    import torch

ANCHOR = 1.0
MARGIN = 1000.0
OUTPUT_TEXTS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ".", "-", ">>")


def import_torch() -> Any:
    """torch without the toy build's thread pinning (GPU training leaves threads to torch)."""
    return torch_import.import_torch("training the math expert")


@dataclass(frozen=True)
class ExpertShape:
    """Sizes of the network; the defaults are the shipped expert's."""

    width: int = 256
    blocks: int = 8
    heads: int = 4
    ffn: int = 768
    input_rows: int = 2048  # compact input table, row 0 shared by all rare ids
    output_rows: int = len(OUTPUT_TEXTS)
    context_length: int = 2048
    rope_freq_base: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensor_shapes(shape: ExpertShape) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names with compact vocabulary shapes."""
    width, ffn = shape.width, shape.ffn
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (shape.input_rows, width)}
    for block in range(shape.blocks):
        p = f"blk.{block}."
        shapes |= {
            p + "attn_norm.weight": (width,),
            p + "attn_q.weight": (width, width),
            p + "attn_k.weight": (width, width),
            p + "attn_v.weight": (width, width),
            p + "attn_output.weight": (width, width),
            p + "ffn_norm.weight": (width,),
            p + "ffn_gate.weight": (ffn, width),
            p + "ffn_up.weight": (ffn, width),
            p + "ffn_down.weight": (width, ffn),
        }
    return shapes | {"output_norm.weight": (width,), "output.weight": (shape.output_rows, width)}


def init_parameters(shape: ExpertShape, seed: int) -> dict[str, torch.Tensor]:
    torch = import_torch()
    generator = torch.Generator().manual_seed(seed)
    parameters = {}
    for name, size in tensor_shapes(shape).items():
        if len(size) == 1:
            tensor = torch.ones(size)
        else:
            fan_in = size[1]
            scale = fan_in**-0.5 * (
                0.5 / shape.blocks**0.5 if name.endswith(("attn_output.weight", "ffn_down.weight")) else 1.0
            )
            tensor = torch.randn(size, generator=generator) * scale
        parameters[name] = tensor
    enforce_anchor(parameters, shape)
    return {name: tensor.requires_grad_(True) for name, tensor in parameters.items()}


def enforce_anchor(parameters: dict[str, torch.Tensor], shape: ExpertShape) -> None:
    """Hold the last hidden dimension constant (see the module docstring); idempotent."""
    torch = import_torch()
    anchor = shape.width - 1
    with torch.no_grad():
        parameters["token_embd.weight"][:, anchor] = ANCHOR
        parameters["output_norm.weight"][anchor] = 1.0
        for block in range(shape.blocks):
            parameters[f"blk.{block}.attn_output.weight"][anchor, :] = 0.0
            parameters[f"blk.{block}.ffn_down.weight"][anchor, :] = 0.0


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    torch = import_torch()
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


@functools.cache
def _rope_tables(length: int, head_dim: int, base: float, device: str) -> tuple[Any, Any]:
    torch = import_torch()
    inverse = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inverse[None, :]
    return torch.cos(angles).float().to(device), torch.sin(angles).float().to(device)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's rope type NORM for the llama architecture: rotate pairs (x[2i], x[2i+1])."""
    torch = import_torch()
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def forward(parameters: dict[str, torch.Tensor], tokens: torch.Tensor, shape: ExpertShape) -> torch.Tensor:
    """Logits [batch, time, output_rows] for compact input ids [batch, time]."""
    torch = import_torch()
    functional = torch.nn.functional
    batch, length = tokens.shape
    heads, head_dim, eps = shape.heads, shape.head_dim, shape.rms_norm_eps
    cos, sin = _rope_tables(length, head_dim, shape.rope_freq_base, str(tokens.device))
    x = parameters["token_embd.weight"][tokens]
    for block in range(shape.blocks):
        p = f"blk.{block}."
        h = _rms_norm(x, parameters[p + "attn_norm.weight"], eps)
        q, k, v = (
            (h @ parameters[p + name].T).view(batch, length, heads, head_dim).transpose(1, 2)
            for name in ("attn_q.weight", "attn_k.weight", "attn_v.weight")
        )
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attended.transpose(1, 2).reshape(batch, length, -1) @ parameters[p + "attn_output.weight"].T
        h = _rms_norm(x, parameters[p + "ffn_norm.weight"], eps)
        gate = functional.silu(h @ parameters[p + "ffn_gate.weight"].T)
        x = x + (gate * (h @ parameters[p + "ffn_up.weight"].T)) @ parameters[p + "ffn_down.weight"].T
    x = _rms_norm(x, parameters["output_norm.weight"], eps)
    return x @ parameters["output.weight"].T


def greedy_results(
    parameters: dict[str, torch.Tensor],
    shape: ExpertShape,
    prompts: Sequence[Sequence[int]],
    *,
    stop_row: int,
    max_tokens: int = 14,
    batch_size: int = 64,
    device: str = "cpu",
) -> list[list[int]]:
    """Greedy compact output rows after each compact prompt, up to and including ``stop_row``.

    Prompts are left-padded with row 0 and never attended past... left padding would shift
    positions, so each batch groups prompts of one length (sorted), padding-free.
    """
    torch = import_torch()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    output_to_input = parameters.get("_output_to_input")
    with torch.no_grad():
        start = 0
        while start < len(order):
            length = len(prompts[order[start]])
            group = [i for i in order[start : start + batch_size] if len(prompts[i]) == length]
            start += len(group)
            tokens = torch.tensor([list(prompts[i]) for i in group], dtype=torch.long, device=device)
            done = torch.zeros(len(group), dtype=torch.bool, device=device)
            generated = []
            for _ in range(max_tokens):
                logits = forward(parameters, tokens, shape)[:, -1].float()
                best = logits.argmax(-1)
                generated.append(best)
                done |= best == stop_row
                if bool(done.all()):
                    break
                assert output_to_input is not None
                tokens = torch.cat([tokens, output_to_input[best][:, None]], dim=1)
            stacked = torch.stack(generated, dim=1).tolist()
            for row, index in enumerate(group):
                out = stacked[row]
                results[index] = out[: out.index(stop_row) + 1] if stop_row in out else out
    return results
