"""Decode path (small T): matrix-vector kernels that read only the chosen experts' weights, no grouping.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, N = T*K (token, k) pairs, n = t*K + k.

At decode a GEMM tile of BLOCK_M >= 16 rows would be mostly padding, and the sort costs launches that
matter at this latency. Instead:
  up:   one program per (pair n, F block):   h[n, f] = silu(gate_e[f] . x_t) * (up_e[f] . x_t)
  down: one program per (token t, D block):  out[t, d] = sum_k w[t,k] * down_{e_k}[d] . h[t*K+k]  (+ shared)
The pair (resp. token) index is the fastest grid axis, so the programs in flight together work on the same
F (resp. D) block: pairs that share an expert read the same weight tile at about the same time and hit in
L2, so each selected expert's weights come from memory about once even when T*K > E. The down kernel sums
over k in order inside one program: token order, deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning

_UP_CONFIGS = [tuning.cfg(w, 3, BLOCK_F=f, BLOCK_D=d) for f, d, w in ((8, 256, 2), (16, 128, 4), (16, 256, 4),
                                                                        (32, 128, 4), (32, 256, 8), (64, 128, 8))]
_DOWN_CONFIGS = [tuning.cfg(w, 3, BLOCK_D=d, BLOCK_F=f) for d, f, w in ((16, 128, 2), (16, 256, 4), (32, 128, 4),
                                                                        (32, 256, 4), (64, 128, 8), (64, 256, 8))]
_UP_INTERP = tuning.cfg(BLOCK_F=32, BLOCK_D=32)
_DOWN_INTERP = tuning.cfg(BLOCK_D=32, BLOCK_F=32)


@tuning.autotune(_UP_CONFIGS, _UP_INTERP, key=["N_BUCKET", "F", "D"])
@triton.jit
def _decode_up_kernel(x_ptr, gate_ptr, up_ptr, ids_ptr, h_ptr, F, D, K, N_BUCKET,
                      sx_t, sx_d, sg_e, sg_f, sg_d, su_e, su_f, su_d,
                      BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    t = (n // K).to(tl.int64)
    e = tl.load(ids_ptr + n).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    d = tl.arange(0, BLOCK_D)
    g_ptrs = gate_ptr + e * sg_e + f[:, None] * sg_f + d[None, :] * sg_d  # [BLOCK_F, BLOCK_D], D contiguous
    u_ptrs = up_ptr + e * su_e + f[:, None] * su_f + d[None, :] * su_d
    # Accumulate elementwise and reduce once at the end: one cross-lane reduction instead of one per chunk.
    acc_g = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + d < D
        xv = tl.load(x_ptr + t * sx_t + (d0 + d) * sx_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        w_ok = f_ok[:, None] & d_ok[None, :]
        acc_g += tl.load(g_ptrs, mask=w_ok, other=0.0).to(tl.float32) * xv
        acc_u += tl.load(u_ptrs, mask=w_ok, other=0.0).to(tl.float32) * xv
        g_ptrs += BLOCK_D * sg_d
        u_ptrs += BLOCK_D * su_d
    g = tl.sum(acc_g, axis=1)
    h = g * tl.sigmoid(g) * tl.sum(acc_u, axis=1)
    tl.store(h_ptr + n.to(tl.int64) * F + f, h, mask=f_ok)  # h stays float32: it is tiny at decode


@tuning.autotune(_DOWN_CONFIGS, _DOWN_INTERP, key=["N_BUCKET", "F", "D"])
@triton.jit
def _decode_down_kernel(h_ptr, down_ptr, ids_ptr, w_ptr, shared_ptr, out_ptr, F, D, K, N_BUCKET,
                        sd_e, sd_d, sd_f, HAS_SHARED: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    f = tl.arange(0, BLOCK_F)
    out = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(K):
        n = t * K + k
        e = tl.load(ids_ptr + n).to(tl.int64)
        w_ptrs = down_ptr + e * sd_e + d[:, None] * sd_d + f[None, :] * sd_f  # [BLOCK_D, BLOCK_F], F contiguous
        acc = tl.zeros((BLOCK_D, BLOCK_F), dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f_ok = f0 + f < F
            hv = tl.load(h_ptr + n * F + f0 + f, mask=f_ok, other=0.0)
            acc += tl.load(w_ptrs, mask=d_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32) * hv[None, :]
            w_ptrs += BLOCK_F * sd_f
        out += tl.load(w_ptr + n) * tl.sum(acc, axis=1)  # routing weight applied in float32
    if HAS_SHARED:
        out += tl.load(shared_ptr + t * D + d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def moe_decode(x_TD, gate_EFD, up_EFD, down_EDF, w_TK, ids_TK, shared_TD=None) -> torch.Tensor:
    """The whole routed FFN for small T; `shared_TD` (the shared expert's output, if any) is added in."""
    T, D = x_TD.shape
    E, F, _ = gate_EFD.shape
    K = ids_TK.shape[1]
    N = T * K
    h_NF = torch.empty(N, F, dtype=torch.float32, device=x_TD.device)
    out_TD = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    nb = tuning.bucket(N, lo=1, hi=512)
    grid = lambda meta: (N, triton.cdiv(F, meta["BLOCK_F"]))  # noqa: E731
    _decode_up_kernel[grid](x_TD, gate_EFD, up_EFD, ids_TK, h_NF, F, D, K, nb,
                            *x_TD.stride(), *gate_EFD.stride(), *up_EFD.stride())
    has_shared = shared_TD is not None
    shared_TD = shared_TD.contiguous() if has_shared else out_TD  # any pointer: unread when HAS_SHARED is off
    grid = lambda meta: (T, triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _decode_down_kernel[grid](h_NF, down_EDF, ids_TK, w_TK, shared_TD, out_TD, F, D, K, nb,
                              *down_EDF.stride(), HAS_SHARED=has_shared)
    return out_TD
