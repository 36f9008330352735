"""A decode attention kernel for the hf engine's steps: split-key (flash-decoding) in Triton.

A step's attention is few queries per row (``W`` tokens x ``G`` heads per KV head) over a slot of
up to thousands of keys. SDPA's kernels give each (row, KV head) pair one thread block that walks
the keys in turn: at batch 1 with 8 KV heads, 8 of an H200's 132 multiprocessors work, and a step
over 2,048 keys cost 0.65 ms more than over 128 (24 layers, cuDNN; the memory-efficient kernel
2.7 ms more). Here the keys are cut into chunks attended in parallel, about one program per
multiprocessor in all, and merged by their log-sum-exps; and each program stops at the last key
its queries may see (read from the step's positions on the device), so a graph captured for a
2,048-key bucket costs what its rows' real lengths cost.

The mask is the step's own: query row ``r`` of a KV head is token ``r // G`` of head ``r % G`` and
sees the keys at positions ``<= positions[b, r // G]``; no mask tensor is built. Keys and values
are read in place from the slot view ``[B, T, 2, KVH, D]``.

triton is imported on first use; ``available`` says whether it can be (the engine then offers
this kernel among its attention candidates, checks it against SDPA, and times it per shape).
"""

from __future__ import annotations

import functools
import math
from typing import Any

NAME = "TRITON_DECODE"
BLOCK_N = 64  # keys per inner step
MAX_SPLITS = 64


@functools.cache
def available() -> str | None:
    """None when the Triton kernel can be used here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def splits_for(batch: int, kv_heads: int, length: int, processors: int) -> int:
    """Key chunks per (row, KV head) pair: about two programs per multiprocessor in all, each
    chunk at least ``BLOCK_N`` keys; 1 (no merge) when the pairs alone fill the chip."""
    pairs = batch * kv_heads
    wanted = 1 if pairs >= processors else math.ceil(2 * processors / pairs)
    return max(1, min(wanted, math.ceil(length / BLOCK_N), MAX_SPLITS))


def _pad(value: int) -> int:
    return max(16, 1 << (value - 1).bit_length())  # tl.dot needs 16 or more rows and columns


def decode_attention(torch: Any, grouped: Any, rows: Any, positions: Any, *, scale: float,
                     splits: int) -> Any:
    """Attention of ``grouped`` queries ``[B, KVH, R, D]`` over their slots ``rows``
    ``[B, T, 2, KVH, D]``, where query row r of row b sees keys ``<= positions[b, r // G]``
    (``positions`` ``[B, W]``, ``G = R / W``): the output ``[B, KVH, R, D]``, as SDPA gives it."""
    from expert_gateway.backends.decode_triton import merge_chunks, split_keys

    batch, kv_heads, count, dim = grouped.shape
    length, width = rows.shape[1], positions.shape[1]
    if grouped.stride(-1) != 1:  # other strides are passed on; a compiled block could lay it out so
        grouped = grouped.contiguous()
    if rows.stride(-1) != 1 or positions.stride(-1) != 1:
        raise ValueError("decode_attention needs the slots' and positions' last dimension contiguous")
    keys, values = rows[:, :, 0], rows[:, :, 1]  # [B, T, KVH, D] views
    out = torch.empty((batch, kv_heads, count, dim), dtype=grouped.dtype, device=grouped.device)
    chunk = math.ceil(length / splits / BLOCK_N) * BLOCK_N
    splits = math.ceil(length / chunk)
    if splits > 1:
        part = torch.empty((batch, kv_heads, splits, count, dim), dtype=torch.float32,
                           device=grouped.device)
        lse = torch.empty((batch, kv_heads, splits, count), dtype=torch.float32, device=grouped.device)
    else:
        part = lse = out  # not written
    r_pad, d_pad = _pad(count), _pad(dim)
    split_keys[(batch * kv_heads, splits)](
        grouped, keys, values, positions, part, lse, out,
        grouped.stride(0), grouped.stride(1), grouped.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        positions.stride(0),
        kv_heads, count, count // width, chunk, scale * math.log2(math.e),
        R_PAD=r_pad, D=dim, D_PAD=d_pad, BLOCK_N=BLOCK_N, SPLITS=splits)
    if splits > 1:
        merge_chunks[(batch * kv_heads, count)](
            part, lse, out, count, splits, S_PAD=max(2, 1 << (splits - 1).bit_length()), D=dim,
            D_PAD=d_pad)
    return out


def reference(torch: Any, grouped: Any, rows: Any, positions: Any, *, scale: float) -> Any:
    """The same attention in float64 (tests and the engine's check)."""
    count = grouped.shape[2]
    length, width = rows.shape[1], positions.shape[1]
    keys = rows[:, :, 0].transpose(1, 2).double()
    values = rows[:, :, 1].transpose(1, 2).double()
    token_of_row = torch.arange(count, device=grouped.device) // (count // width)
    seen = (torch.arange(length, device=grouped.device)[None, None, :]
            <= positions[:, token_of_row][:, :, None])  # [B, R, T]
    scores = (grouped.double() @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


def check(torch: Any, *, device: Any, dtype: Any, batch: int, kv_heads: int, groups: int, dim: int,
          width: int, length: int, scale: float, splits: int) -> str | None:
    """None when the kernel matches float64 attention (to 2e-2) on random data of this shape,
    rows seeing all keys, a third of them or one; else why it may not be used."""
    problem = available()
    if problem is not None:
        return problem
    generator = torch.Generator(device=device).manual_seed(1)
    try:
        with torch.inference_mode():
            cache = torch.randn((batch + 1, length, 2, kv_heads, dim), generator=generator,
                                device=device, dtype=dtype)
            grouped = torch.randn((batch, kv_heads, width * groups, dim), generator=generator,
                                  device=device, dtype=dtype)
            ends = torch.tensor([(length, length // 3 + width, width)[index % 3] for index in range(batch)],
                                device=device)
            positions = ends[:, None] - width + torch.arange(width, device=device)[None]
            rows = cache[1:]
            got = decode_attention(torch, grouped, rows, positions, scale=scale, splits=splits)
            expected = reference(torch, grouped, rows, positions, scale=scale)
            error = float((got.double() - expected).abs().max())
    except Exception as exc:  # no compiler here, or a shape the kernel cannot take
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    if not error < 2e-2:
        return f"differs from float64 attention by {error:.3g}"
    return None
