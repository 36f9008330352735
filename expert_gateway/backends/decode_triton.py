"""Triton kernels of ``decode_attention`` (imported when that kernel is used; defined where triton is).

``split_keys`` attends one (row, KV head) pair's grouped queries over one chunk of its slot's
keys; a program stops at the last key any of its queries may see, so a step's cost follows the
rows' real lengths, not the length bucket its graph was captured for. With one chunk per row it
writes the normalised output straight away; with more, it writes each chunk's output and its
log-sum-exp (base 2) and ``merge_chunks`` combines them (flash-decoding).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # decode_attention.available() says why the kernel is not offered
    triton = None

if triton is not None:  # every module imports without triton (the error tree's test walks them all)

    @triton.jit
    def split_keys(q_ptr, k_ptr, v_ptr, pos_ptr, part_ptr, lse_ptr, out_ptr,
                   stride_qb, stride_qh, stride_qr,
                   stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh,
                   stride_pb,
                   kv_heads, rows, groups, chunk, scale_log2,
                   R_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLITS: tl.constexpr):
        pair = tl.program_id(0)
        split = tl.program_id(1)
        b = pair // kv_heads
        h = pair % kv_heads
        r = tl.arange(0, R_PAD)
        d = tl.arange(0, D_PAD)
        row_ok = r < rows
        dim_ok = d < D
        # query row r is token r // groups; it sees the keys at positions <= that token's position
        pos = tl.load(pos_ptr + b * stride_pb + r // groups, mask=row_ok, other=-1)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + r[:, None] * stride_qr + d[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        top = (tl.max(pos, axis=0) + 1).to(tl.int32)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, top)
        m = tl.full([R_PAD], float("-inf"), tl.float32)
        total = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, D_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            key_ok = t < hi
            k = tl.load(k_ptr + b * stride_kb + t[:, None] * stride_kt + h * stride_kh + d[None, :],
                        mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale_log2
            seen = (t[None, :] <= pos[:, None]) & key_ok[None, :]
            scores = tl.where(seen, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
            alpha = tl.exp2(m - base)
            p = tl.exp2(scores - base[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + b * stride_vb + t[:, None] * stride_vt + h * stride_vh + d[None, :],
                        mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        seen_any = total > 0
        out = acc / tl.where(seen_any, total, 1.0)[:, None]
        keep = row_ok[:, None] & dim_ok[None, :]
        if SPLITS == 1:  # one chunk: the answer itself, [B, KVH, R, D] contiguous
            tl.store(out_ptr + ((b * kv_heads + h) * rows + r[:, None]) * D + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=keep)
        else:  # [B, KVH, S, R, D] float32 outputs and [B, KVH, S, R] log-sum-exps, merged next
            part = (pair * SPLITS + split) * rows
            tl.store(part_ptr + (part + r[:, None]) * D + d[None, :], out, mask=keep)
            lse = tl.where(seen_any, m + tl.log2(tl.where(seen_any, total, 1.0)), float("-inf"))
            tl.store(lse_ptr + part + r, lse, mask=row_ok)


    @triton.jit
    def merge_chunks(part_ptr, lse_ptr, out_ptr, rows, splits,
                     S_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        """Combine one query row's chunk outputs by their log-sum-exps, all chunks in one load (one
        program per (pair, query row): a loop over the chunks in turn cost 10 us a layer at 32
        chunks); a chunk that saw no key (log-sum-exp -inf) weighs nothing."""
        pair = tl.program_id(0)
        r = tl.program_id(1)
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        split_ok = s < splits
        at = (pair * splits + s) * rows + r  # [S]: this row in each chunk
        lse = tl.load(lse_ptr + at, mask=split_ok, other=float("-inf"))
        top = tl.max(lse, axis=0)
        weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
        part = tl.load(part_ptr + at[:, None] * D + d[None, :], mask=split_ok[:, None] & (d < D)[None, :],
                       other=0.0)
        total = tl.sum(weight, axis=0)
        out = tl.sum(weight[:, None] * part, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + (pair * rows + r) * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
