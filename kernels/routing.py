"""Fused routing: scores (softmax or sigmoid, float32), top-k, renormalisation and scale in one kernel.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logits_ptr, w_ptr, ids_ptr, T, E, stride_lt, stride_le, scale,
                  K: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le
    l = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if SIGMOID:
        s = tl.sigmoid(l)
    else:
        l = tl.where(col_ok[None, :], l, float("-inf"))
        p = tl.exp(l - tl.max(l, axis=1)[:, None])
        s = p / tl.sum(p, axis=1)[:, None]
    # Scores live in [0, 1]: padded experts get -1 so that they are never chosen, even when a real score
    # underflows to 0; a chosen expert gets -2 so that it is not chosen twice.
    s = tl.where(col_ok[None, :], s, -1.0)
    kcol = tl.arange(0, BLOCK_K)
    w_TK = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids_TK = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for k in tl.static_range(K):  # K is small: k-th largest by repeated argmax, in descending order
        best = tl.max(s, axis=1)
        idx = tl.argmax(s, axis=1)
        w_TK = tl.where(kcol[None, :] == k, best[:, None], w_TK)
        ids_TK = tl.where(kcol[None, :] == k, idx[:, None].to(tl.int64), ids_TK)
        s = tl.where(cols[None, :] == idx[:, None], -2.0, s)
    if RENORM:
        w_TK = w_TK / tl.sum(w_TK, axis=1)[:, None]
    w_TK = w_TK * scale
    out = rows[:, None].to(tl.int64) * K + kcol[None, :]
    ok = row_ok[:, None] & (kcol[None, :] < K)
    tl.store(w_ptr + out, w_TK, mask=ok)
    tl.store(ids_ptr + out, ids_TK, mask=ok)


def route(logits_TE: torch.Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as reference.route: (weights_TK float32, ids_TK int64), experts in descending score."""
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', not {score_func!r}")
    T, E = logits_TE.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, E={E}]")
    w_TK = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    if T == 0:
        return w_TK, ids_TK
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T = max(1, min(64, 4096 // BLOCK_E))  # keep the [BLOCK_T, BLOCK_E] tile within registers
    _route_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits_TE, w_TK, ids_TK, T, E, logits_TE.stride(0), logits_TE.stride(1), float(scale),
        K=top_k, SIGMOID=score_func == "sigmoid", RENORM=bool(renormalize),
        BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(top_k))
    return w_TK, ids_TK
