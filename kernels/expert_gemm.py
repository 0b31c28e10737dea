"""Grouped expert GEMMs for prefill / training-size batches, over the pairs sorted by grouping.py.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, N = T*K (token, k) pairs,
n = t*K + k a flat pair index, r a row in expert-sorted order.

  up:      h[r, :]   = silu(gate_e @ x[t]) * (up_e @ x[t])        gate and up in one kernel, x read in
                                                                  place through the sorted index
  down:    y[n, :]   = w[n] * (down_e @ h[r])                      written to the pair's own row, token order
  combine: out[t, :] = sum_k y[t*K + k] (+ shared[t])              a fixed order: deterministic, no atomics

Tiles never straddle experts. The grid is an upper bound on the number of row tiles,
sum_e ceil(n_e / BLOCK_M) <= ceil(N / BLOCK_M) + E, so nothing waits on the host for the counts; each
program finds its expert from the device-side counts and surplus programs exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .grouping import Groups

_UP_CONFIGS = [tuning.cfg(4, 4, BLOCK_M=m, BLOCK_F=f, BLOCK_D=64) for m, f in ((16, 64), (16, 128), (32, 64),
                                                                               (32, 128), (64, 64))] + [
    tuning.cfg(8, 4, BLOCK_M=64, BLOCK_F=128, BLOCK_D=64),
    tuning.cfg(8, 3, BLOCK_M=128, BLOCK_F=64, BLOCK_D=64),
    tuning.cfg(8, 3, BLOCK_M=128, BLOCK_F=128, BLOCK_D=32),
    tuning.cfg(8, 3, BLOCK_M=128, BLOCK_F=128, BLOCK_D=64),
]
_DOWN_CONFIGS = [tuning.cfg(4, 4, BLOCK_M=m, BLOCK_D=d, BLOCK_F=64) for m, d in ((16, 64), (16, 128), (32, 128),
                                                                               (64, 128))] + [
    tuning.cfg(8, 3, BLOCK_M=64, BLOCK_D=256, BLOCK_F=64),
    tuning.cfg(8, 3, BLOCK_M=128, BLOCK_D=128, BLOCK_F=64),
    tuning.cfg(8, 3, BLOCK_M=128, BLOCK_D=256, BLOCK_F=64),
]
# Under the interpreter: small tiles that still exercise masking (F=24 < 32, D=48 spans two chunks).
_UP_INTERP = tuning.cfg(BLOCK_M=16, BLOCK_F=32, BLOCK_D=32)
_DOWN_INTERP = tuning.cfg(BLOCK_M=16, BLOCK_D=32, BLOCK_F=32)


@triton.jit
def _expert_tile(counts_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's row tile: (expert e, its first sorted row, row offsets m within e, row mask).
    e == E for a surplus program."""
    pid = tl.program_id(0)
    ex = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    e = tl.sum((tile_end <= pid).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(ex == e, tile_end - tiles, 0), axis=0)
    count = tl.sum(tl.where(ex == e, counts, 0), axis=0)
    start = tl.load(offsets_ptr + e)  # offsets has E+1 entries, so e == E is in bounds
    m = (pid - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    return e, start, m, m < count


@tuning.autotune(_UP_CONFIGS, _UP_INTERP, key=["M_BUCKET", "F", "D"], prune=tuning.prune_block_m)
@triton.jit
def _up_kernel(x_ptr, gate_ptr, up_ptr, h_ptr, sorted_ptr, counts_ptr, offsets_ptr, E, F, D, K, M_BUCKET,
               sx_t, sx_d, sg_e, sg_f, sg_d, su_e, su_f, su_d, sh_r, sh_f,
               PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    e, start, m, row_ok = _expert_tile(counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rows = (start + m).to(tl.int64)
    tok = (tl.load(sorted_ptr + rows, mask=row_ok, other=0) // K).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    d = tl.arange(0, BLOCK_D)
    e64 = e.to(tl.int64)
    x_ptrs = x_ptr + tok[:, None] * sx_t + d[None, :] * sx_d                  # [BLOCK_M, BLOCK_D] gathered rows
    g_ptrs = gate_ptr + e64 * sg_e + f[None, :] * sg_f + d[:, None] * sg_d    # [BLOCK_D, BLOCK_F]
    u_ptrs = up_ptr + e64 * su_e + f[None, :] * su_f + d[:, None] * su_d
    acc_g = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + d < D
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w_ok = d_ok[:, None] & f_ok[None, :]
        acc_g = tl.dot(xt, tl.load(g_ptrs, mask=w_ok, other=0.0), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(xt, tl.load(u_ptrs, mask=w_ok, other=0.0), acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_D * sx_d
        g_ptrs += BLOCK_D * sg_d
        u_ptrs += BLOCK_D * su_d
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # SwiGLU epilogue in float32
    h_ptrs = h_ptr + rows[:, None] * sh_r + f[None, :] * sh_f
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :])


@tuning.autotune(_DOWN_CONFIGS, _DOWN_INTERP, key=["M_BUCKET", "F", "D"], prune=tuning.prune_block_m)
@triton.jit
def _down_kernel(h_ptr, down_ptr, w_ptr, y_ptr, sorted_ptr, counts_ptr, offsets_ptr, E, F, D, M_BUCKET,
                 sh_r, sh_f, sd_e, sd_d, sd_f, sy_n, sy_d,
                 PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    e, start, m, row_ok = _expert_tile(counts_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rows = (start + m).to(tl.int64)
    n = tl.load(sorted_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    f = tl.arange(0, BLOCK_F)
    h_ptrs = h_ptr + rows[:, None] * sh_r + f[None, :] * sh_f                          # [BLOCK_M, BLOCK_F]
    w_ptrs = down_ptr + e.to(tl.int64) * sd_e + d[None, :] * sd_d + f[:, None] * sd_f  # [BLOCK_F, BLOCK_D]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f_ok = f0 + f < F
        ht = tl.load(h_ptrs, mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        acc = tl.dot(ht, tl.load(w_ptrs, mask=f_ok[:, None] & d_ok[None, :], other=0.0), acc,
                     input_precision=PRECISION)
        h_ptrs += BLOCK_F * sh_f
        w_ptrs += BLOCK_F * sd_f
    acc = acc * tl.load(w_ptr + n, mask=row_ok, other=0.0)[:, None]  # routing weight, float32
    y_ptrs = y_ptr + n[:, None] * sy_n + d[None, :] * sy_d
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, shared_ptr, out_ptr, T, D, K, HAS_SHARED: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (t < T)[:, None] & (d < D)[None, :]
    t64 = t.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(K):  # k = 0..K-1 in order: the same sum, bit for bit, on every run
        acc += tl.load(y_ptr + (t64 * K + k) * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + t64 * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t64 * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def _precision(dtype: torch.dtype) -> str:
    # float32 stays IEEE float32 (tf32 would miss the reference by ~1e-3); bf16/fp16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def up(x_TD, gate_EFD, up_EFD, groups: Groups, K: int) -> torch.Tensor:
    """h [N, F] in x's dtype, rows in expert-sorted order."""
    T, D = x_TD.shape
    E, F, _ = gate_EFD.shape
    N = T * K
    h_NF = torch.empty(N, F, dtype=x_TD.dtype, device=x_TD.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) + E, triton.cdiv(F, meta["BLOCK_F"]))  # noqa: E731
    _up_kernel[grid](x_TD, gate_EFD, up_EFD, h_NF, groups.sorted_N, groups.counts_E, groups.offsets_E1,
                     E, F, D, K, tuning.bucket(triton.cdiv(N, E)),
                     *x_TD.stride(), *gate_EFD.stride(), *up_EFD.stride(), *h_NF.stride(),
                     PRECISION=_precision(x_TD.dtype), BLOCK_E=triton.next_power_of_2(E))
    return h_NF


def down(h_NF, down_EDF, w_N, groups: Groups, out_dtype: torch.dtype) -> torch.Tensor:
    """y [N, D] in `out_dtype`, one row per (token, k) pair in token order, routing weight applied."""
    N, F = h_NF.shape
    E, D, _ = down_EDF.shape
    y_ND = torch.empty(N, D, dtype=out_dtype, device=h_NF.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) + E, triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _down_kernel[grid](h_NF, down_EDF, w_N, y_ND, groups.sorted_N, groups.counts_E, groups.offsets_E1,
                       E, F, D, tuning.bucket(triton.cdiv(N, E)),
                       *h_NF.stride(), *down_EDF.stride(), *y_ND.stride(),
                       PRECISION=_precision(h_NF.dtype), BLOCK_E=triton.next_power_of_2(E))
    return y_ND


def combine(y_ND: torch.Tensor, K: int, shared_TD: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    N, D = y_ND.shape
    T = N // K
    out_TD = torch.empty(T, D, dtype=out_dtype, device=y_ND.device)
    BLOCK_T, BLOCK_D = (4, 32) if tuning.interpreting() else (4, 512)
    has_shared = shared_TD is not None
    shared_TD = shared_TD.contiguous() if has_shared else y_ND  # any pointer: unread when HAS_SHARED is off
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    _combine_kernel[grid](y_ND, shared_TD, out_TD, T, D, K, HAS_SHARED=has_shared, BLOCK_T=BLOCK_T,
                          BLOCK_D=BLOCK_D)
    return out_TD
