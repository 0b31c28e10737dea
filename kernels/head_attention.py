"""Triton attention over selected (token, head) pairs: the core of the sparse head-expert path on GPU.

Shape legend: N selected (token, head) pairs, B batch, G key/value heads, S_k key positions, d head dim,
M rows per program (BLOCK_M), S_n keys per step (BLOCK_N).

Layering (as the MoE FFN's): the kernel attends one block of query rows that share a batch row and a
key/value head; `routed_attention` (what surgery/attention/sparse.py calls on CUDA) and `pair_attention`
(the same on a plain list of queries, for tests and other callers) sort the pairs into such blocks and
launch it, with the projections in PyTorch around it. Each row is one selected pair's query and attends
causally to its batch row's keys 0..pos (pos = its key position, S_k - T + t with a cache): flash attention's
online softmax, keys visited only up to the block's last position, so no score matrix is ever stored and a
block skips the keys none of its rows can see. Heads of the same key/value group share a block (their rows
read the same keys). For `routed_attention` the kernel also reads each pair's query in place from the
un-rotated q projection, applies RoPE in registers, and writes its output times the routing weight straight
into the [tokens, heads, d] matrix that goes through o_proj: the pairs are never gathered or scattered in
memory (a profile on an H200 showed those copies costing more than the attention itself).
Forward only (inference).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .tuning import interpreting

_LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), the scale folded into one multiply


@triton.jit
def _pair_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, row_ptr, tok_ptr, pos_ptr, w_ptr, cos_ptr, sin_ptr,
                           blk_seg_ptr, blk_start_ptr, blk_end_ptr, keep_ptr, S_k, G, d, half, qk_scale,
                           stride_kb, stride_kg, stride_ks, stride_vb, stride_vg, stride_vs, stride_keep_b,
                           ROPE: tl.constexpr, HAS_W: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid)  # b * G + g
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(blk_end_ptr + pid)
    b = seg // G
    g = seg % G
    idx = start + tl.arange(0, BLOCK_M)  # positions in the sorted order
    row_ok = idx < end
    row = tl.load(row_ptr + idx, mask=row_ok, other=0).to(tl.int64)  # the pair's row of q and of o
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    # q and k in two halves of the head dim: RoPE rotates one half into the other, and q . k is the sum of the
    # halves' products, so the rotation happens in registers with no rotated copy of q in memory.
    ch = tl.arange(0, BLOCK_H)
    h_ok = ch < half
    qm = row_ok[:, None] & h_ok[None, :]
    q1 = tl.load(q_ptr + row[:, None] * d + ch[None, :], mask=qm, other=0.0)
    q2 = tl.load(q_ptr + row[:, None] * d + half + ch[None, :], mask=qm, other=0.0)
    if ROPE:  # HF Llama: q * cos + rotate_half(q) * sin, rotate_half(q) = (-q2, q1); float32 in registers
        tok = tl.load(tok_ptr + idx, mask=row_ok, other=0).to(tl.int64)
        c_base = cos_ptr + tok[:, None] * d + ch[None, :]
        s_base = sin_ptr + tok[:, None] * d + ch[None, :]
        c1 = tl.load(c_base, mask=qm, other=0.0).to(tl.float32)
        c2 = tl.load(c_base + half, mask=qm, other=0.0).to(tl.float32)
        s1 = tl.load(s_base, mask=qm, other=0.0).to(tl.float32)
        s2 = tl.load(s_base + half, mask=qm, other=0.0).to(tl.float32)
        f1, f2 = q1.to(tl.float32), q2.to(tl.float32)
        q1 = (f1 * c1 - f2 * s1).to(q_ptr.dtype.element_ty)
        q2 = (f2 * c2 + f1 * s2).to(q_ptr.dtype.element_ty)
    pos = tl.load(pos_ptr + idx, mask=row_ok, other=-1)
    hi = tl.max(pos, axis=0) + 1  # keys past the block's last position are never needed

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + g * stride_kg
    v_base = v_ptr + b * stride_vb + g * stride_vg
    for n0 in range(0, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < S_k
        km = key_ok[:, None] & h_ok[None, :]
        k1 = tl.load(k_base + keys[:, None] * stride_ks + ch[None, :], mask=km, other=0.0)
        k2 = tl.load(k_base + keys[:, None] * stride_ks + half + ch[None, :], mask=km, other=0.0)
        if IEEE:
            s = tl.dot(q1, tl.trans(k1), input_precision="ieee") + tl.dot(q2, tl.trans(k2), input_precision="ieee")
        else:
            s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
        s = s * qk_scale  # log2 units: exp2 is the GPU's native exponential
        keep = (keys[None, :] <= pos[:, None]) & key_ok[None, :]
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + b * stride_keep_b + keys, mask=key_ok, other=0) != 0)[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vs + cols[None, :], mask=key_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that keeps no key (padding) gives 0
    if HAS_W:  # the pair's routing weight, applied before the output projection
        out = out * tl.load(w_ptr + idx, mask=row_ok, other=0.0)[:, None]
    tl.store(o_ptr + row[:, None] * d + cols[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _blocks(seg_N: torch.Tensor, segments: int, block_m: int):
    """Cut the rows (sorted by segment) into blocks of at most block_m rows within one segment, on the device
    (no host sync): (segment, first row, end row) per block, int32, padded to the static upper bound
    cdiv(N, block_m) + segments with empty blocks (end == start) that return at once. The rows are sorted, so
    each segment's first row is a binary search (bincount would read the largest id back to the host: one
    sync a layer, which left the GPU idle while the next launches were queued, ~0.6 ms a 7B layer on an H200)."""
    N = seg_N.numel()
    bounds = torch.searchsorted(seg_N, torch.arange(segments + 1, device=seg_N.device, dtype=seg_N.dtype))
    seg_start, counts = bounds[:-1], bounds[1:] - bounds[:-1]
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
    if N == 0:
        return q_Nd.new_zeros(0, d)
    q = q_Nd.contiguous()
    o = torch.empty_like(q)
    _launch(q, o, None, None, None, None, b_N, g_N, pos_N, k_BGSd, v_BGSd, scaling, key_keep_BS)
    return o


def routed_attention(q_THd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor, tok_N: torch.Tensor,
                     h_N: torch.Tensor, w_N: torch.Tensor, b_N: torch.Tensor, g_N: torch.Tensor, pos_N: torch.Tensor,
                     k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, scaling: float, out_THd: torch.Tensor,
                     tiles: tuple[int, int, int, int] | None = None) -> None:
    """The sparse head path's whole routed attention in one launch, written into out_THd (zeros where no pair
    falls): for each pair n, the query of token tok_N[n], head h_N[n], read from the un-rotated projection
    q_THd [T, H, d] and rotated by that token's cos/sin [T, d] (RoPE, HF Llama's convention) in registers,
    attends as in `pair_attention`, and its output times w_N[n] goes to out_THd[tok_N[n], h_N[n]]. No per-pair
    copy of queries or outputs is made; (token, head) pairs must be distinct. `tiles` (BLOCK_M, BLOCK_N,
    num_warps, num_stages) overrides the table `tiles_for` reads (for evals/tune_head_kernel.py)."""
    if tok_N.numel() == 0:
        return
    T, H, d = q_THd.shape
    q = q_THd.contiguous()
    assert out_THd.is_contiguous() and out_THd.shape == q.shape and d % 2 == 0
    rows = tok_N.long() * H + h_N.long()
    _launch(q, out_THd, rows, tok_N, w_N.float().contiguous(), (cos_Td.contiguous(), sin_Td.contiguous()),
            b_N, g_N, pos_N, k_BGSd, v_BGSd, scaling, None, tiles)


def tiles_for(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim d. Under the interpreter one small fixed tile.
    SURGERY_HEAD_TILES="128=64,64,8,3;64=..." overrides per head dim (what evals/tune_head_kernel.py's --best-out
    writes), so a sweep's choice can be benchmarked in the whole model before it becomes the default."""
    if interpreting():
        return 16, 16, 1, 1
    override = os.environ.get("SURGERY_HEAD_TILES", "")
    for item in filter(None, override.split(";")):
        try:
            dim, tiles = item.split("=")
            values = tuple(int(x) for x in tiles.split(","))
        except ValueError:
            raise ValueError(f"SURGERY_HEAD_TILES: {item!r} is not HEAD_DIM=BLOCK_M,BLOCK_N,WARPS,STAGES") from None
        if len(values) != 4:
            raise ValueError(f"SURGERY_HEAD_TILES: {item!r} needs four numbers after '='")
        if int(dim) == d:
            return values
    # H200 sweep (results/attention/head-kernel-tiles-h200.json): 64x64 tiles, 4 warps, 3 stages were fastest or
    # within 1% of it at d 64 and 128, 2,048 and 4,096 tokens (d 128: 8% ahead of the 64x32 used before).
    return 64, 64, 4, 3


def _launch(q, o, rows_N, tok_N, w_N, cos_sin, b_N, g_N, pos_N, k_BGSd, v_BGSd, scaling, key_keep_BS,
            tiles=None) -> None:
    """Sort the pairs into blocks of one (batch row, key/value head) and launch. q and o are addressed by row
    (rows_N[n], or n itself): the sort permutes only small index vectors, never q or o."""
    d = q.shape[-1]
    if d % 2:
        raise ValueError(f"head dim {d}: the kernel splits it in halves (RoPE), so it must be even")
    B, G, S_k, _ = k_BGSd.shape
    # Sort by (batch row, kv head, position): blocks share keys, and their positions are close together.
    seg_N = b_N.long() * G + g_N.long()
    order = torch.argsort(seg_N * (S_k + 1) + pos_N.long())
    seg_sorted = seg_N[order]
    pos_sorted = pos_N[order].int().contiguous()
    row_sorted = (order if rows_N is None else rows_N[order]).contiguous()
    tok_sorted = tok_N[order].int().contiguous() if tok_N is not None else pos_sorted  # dummy when no RoPE
    w_sorted = w_N[order].contiguous() if w_N is not None else pos_sorted              # dummy when no weights
    cos, sin = cos_sin if cos_sin is not None else (q, q)                               # dummies
    block_m, block_n, warps, stages = tiles or tiles_for(d)
    blk_seg, blk_start, blk_end, grid = _blocks(seg_sorted, B * G, block_m)
    k, v = k_BGSd, v_BGSd
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    keep = key_keep_BS.to(torch.int8).contiguous() if key_keep_BS is not None else pos_sorted  # dummy pointer
    _pair_attention_kernel[(grid,)](
        q, k, v, o, row_sorted, tok_sorted, pos_sorted, w_sorted, cos, sin, blk_seg, blk_start, blk_end, keep,
        S_k, G, d, d // 2, float(scaling) * _LOG2E,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keep.stride(0) if key_keep_BS is not None else 0,
        ROPE=cos_sin is not None, HAS_W=w_N is not None, HAS_KEEP=key_keep_BS is not None,
        IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_H=max(16, triton.next_power_of_2(max(1, d // 2))),
        num_warps=warps, num_stages=stages)
