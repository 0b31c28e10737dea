"""Triton attention over selected (token, head) pairs: the core of the sparse head-expert path on GPU.

Shape legend: N selected (token, head) pairs, B batch, G key/value heads, S_k key positions, d head dim,
M rows per program (BLOCK_M), S_n keys per step (BLOCK_N).

Layering (as the MoE FFN's): the kernel attends one block of query rows that share a batch row and a
key/value head; `pair_attention` (the function) sorts the pairs into such blocks and launches it;
surgery/attention/sparse.py calls the function on CUDA, with the projections, RoPE and routing weights in
PyTorch around it. Each row is one selected pair's query (already RoPE'd) and attends causally to its batch
row's keys 0..pos (pos = its key position, S_k - T + t with a cache): flash attention's online softmax, keys
visited only up to the block's last position, so no score matrix is ever stored and a block skips the keys
none of its rows can see. Heads of the same key/value group share a block (their rows read the same keys).
Forward only (inference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import interpreting


@triton.jit
def _pair_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, blk_seg_ptr, blk_start_ptr, blk_end_ptr,
                           keep_ptr, S_k, G, d, scaling,
                           stride_kb, stride_kg, stride_ks, stride_vb, stride_vg, stride_vs, stride_keep_b,
                           HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid)  # b * G + g
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(blk_end_ptr + pid)
    b = seg // G
    g = seg % G
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    q = tl.load(q_ptr + rows[:, None] * d + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    hi = tl.max(pos, axis=0) + 1  # keys past the block's last position are never needed

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + g * stride_kg
    v_base = v_ptr + b * stride_vb + g * stride_vg
    for n0 in range(0, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < S_k
        k = tl.load(k_base + keys[:, None] * stride_ks + cols[None, :], mask=key_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scaling
        keep = (keys[None, :] <= pos[:, None]) & key_ok[None, :]
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + b * stride_keep_b + keys, mask=key_ok, other=0) != 0)[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet: no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vs + cols[None, :], mask=key_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that keeps no key (padding) gives 0
    tl.store(o_ptr + rows[:, None] * d + cols[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _blocks(seg_N: torch.Tensor, segments: int, block_m: int):
    """Cut the rows (sorted by segment) into blocks of at most block_m rows within one segment, on the device
    (no host sync): (segment, first row, end row) per block, int32, padded to the static upper bound
    cdiv(N, block_m) + segments with empty blocks (end == start) that return at once."""
    N = seg_N.numel()
    counts = torch.bincount(seg_N, minlength=segments)
    seg_start = torch.cumsum(counts, 0) - counts
    per_seg = (counts + block_m - 1) // block_m
    blk_end_cum = torch.cumsum(per_seg, 0)
    bound = triton.cdiv(N, block_m) + segments
    ids = torch.arange(bound, device=seg_N.device)
    seg = torch.searchsorted(blk_end_cum, ids, right=True).clamp_max(segments - 1)
    first = ids - (blk_end_cum[seg] - per_seg[seg])  # block index within its segment
    start = seg_start[seg] + first * block_m
    end = torch.minimum(start + block_m, seg_start[seg] + counts[seg])
    valid = ids < blk_end_cum[-1]
    start = torch.where(valid, start, 0)
    end = torch.where(valid, end, 0)
    return seg.int(), start.int(), end.int(), bound


def pair_attention(q_Nd: torch.Tensor, b_N: torch.Tensor, g_N: torch.Tensor, pos_N: torch.Tensor,
                   k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, scaling: float,
                   key_keep_BS: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling) v for each pair n: query q_Nd[n] against batch row b_N[n]'s keys of key/value
    head g_N[n] at positions 0..pos_N[n] (and, when given, only keys with key_keep_BS[b, j]). Returns [N, d]
    in q's dtype; a row with no key kept gives zeros. Pairs may come in any order."""
    N, d = q_Nd.shape
    B, G, S_k, _ = k_BGSd.shape
    if N == 0:
        return q_Nd.new_zeros(0, d)
    # Sort by (batch row, kv head, position): blocks share keys, and their positions are close together.
    seg_N = b_N.long() * G + g_N.long()
    order = torch.argsort(seg_N * (S_k + 1) + pos_N.long())
    q_sorted = q_Nd[order].contiguous()
    seg_sorted = seg_N[order]
    pos_sorted = pos_N[order].int().contiguous()
    if interpreting():
        block_m, block_n, warps = 16, 16, 1
    else:
        block_m, block_n, warps = (64, 64, 4) if d <= 64 else (64, 32, 4)
    blk_seg, blk_start, blk_end, grid = _blocks(seg_sorted, B * G, block_m)
    k, v = k_BGSd, v_BGSd
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    keep = key_keep_BS.to(torch.int8).contiguous() if key_keep_BS is not None else pos_sorted  # dummy pointer
    o_sorted = torch.empty_like(q_sorted)
    _pair_attention_kernel[(grid,)](
        q_sorted, k, v, o_sorted, pos_sorted, blk_seg, blk_start, blk_end, keep, S_k, G, d, float(scaling),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keep.stride(0) if key_keep_BS is not None else 0,
        HAS_KEEP=key_keep_BS is not None, IEEE=q_Nd.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=warps)
    o = torch.empty_like(o_sorted)
    o[order] = o_sorted
    return o
