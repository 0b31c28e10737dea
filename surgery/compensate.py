"""Compensate: repair, in closed form, what routing drops from a converted MoE block.

Routing keeps K of E experts per token; the dense FFN summed them all. With the gate and up projections and
the routing fixed, the block output is LINEAR in the down-projections:

    y[n] = W_shared h_shared(x[n]) + sum_e w[n, e] W_e h_e(x[n])  =  W z[n],
    z[n] = concat(h_shared(x[n]), w[n, 1] h_1(x[n]), ..., w[n, E] h_E(x[n]))    (w = 0 off the top-k)

so the down-projections that best reproduce the dense FFN output t[n] on the student's own inputs are one
ridge regression per layer: W = (B + lam W0)(A + lam I)^-1 with A = sum_n a_n z z^T, B = sum_n a_n t z^T.
The token weights a_n are those of losses.block_error (pooled + per-token relative error), so the refit
minimises the same objective as layer-wise training, exactly. lam pulls towards the current weights W0 (a
dampening relative to A's mean diagonal, as GPTQ/SparseGPT do), which keeps neurons that routing rarely
uses where they were. Only down-projections change, so the result exports exactly to every format.

Cost on the demo model: one [N, 1536] feature matrix and a 1536 x 1536 solve per layer (well under a second).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from surgery.moe import MoEBlock


def _features(block: MoEBlock, x_ND: torch.Tensor) -> torch.Tensor:
    """z [N, S + E*F]: the shared expert's activations, then each routed expert's activations times its
    routing weight (0 when not selected), in float32."""
    from surgery_kernels import ops

    x = x_ND.float()
    e = block.experts
    E, F, D = e.gate_proj.shape
    w_NE = torch.zeros(x.shape[0], E)
    r = block.routing
    weights, ids = ops.route(block.router_logits(x), r.top_k, r.score_func, r.renormalize, r.scale)
    w_NE.scatter_(1, ids, weights.float())
    h = Fn.silu(x @ e.gate_proj.float().reshape(E * F, D).T) * (x @ e.up_proj.float().reshape(E * F, D).T)
    parts = [(h.reshape(-1, E, F) * w_NE[:, :, None]).reshape(-1, E * F)]
    if block.shared_expert is not None:
        s = block.shared_expert
        parts.insert(0, Fn.silu(Fn.linear(x, s.gate_proj.weight.float())) * Fn.linear(x, s.up_proj.weight.float()))
    return torch.cat(parts, 1)


def _down_matrix(block: MoEBlock) -> torch.Tensor:
    """The block's down-projections as one [D, S + E*F] matrix, in _features' column order."""
    e = block.experts
    E, D, F = e.down_proj.shape
    parts = [e.down_proj.detach().float().permute(1, 0, 2).reshape(D, E * F)]
    if block.shared_expert is not None:
        parts.insert(0, block.shared_expert.down_proj.weight.detach().float())
    return torch.cat(parts, 1)


def _set_down_matrix(block: MoEBlock, W_DZ: torch.Tensor) -> None:
    e = block.experts
    E, D, F = e.down_proj.shape
    S = W_DZ.shape[1] - E * F
    with torch.no_grad():
        if block.shared_expert is not None:
            block.shared_expert.down_proj.weight.copy_(W_DZ[:, :S].to(block.shared_expert.down_proj.weight.dtype))
        e.down_proj.copy_(W_DZ[:, S:].reshape(D, E, F).permute(1, 0, 2).to(e.down_proj.dtype))


def token_weights(target_ND: torch.Tensor) -> torch.Tensor:
    """a_n such that sum_n a_n ||y_n - t_n||^2 / N = losses.block_error(y, t) (pooled + per-token)."""
    sq = target_ND.float().pow(2).sum(-1)
    return 1.0 / sq.mean().clamp_min(1e-12) + 1.0 / sq.clamp_min(1e-12)


@torch.no_grad()
def refit_down(block: MoEBlock, x_ND: torch.Tensor, target_ND: torch.Tensor, damp: float = 1e-2,
               chunk: int = 2048) -> dict:
    """Refit every down-projection of `block` (routed experts and the shared expert) in closed form so that
    the block reproduces `target` on inputs `x` under its current routing. Returns the block error before
    and after (losses.block_error)."""
    from surgery import losses

    t = target_ND.float()
    a = token_weights(t)
    A = B = None
    for i in range(0, x_ND.shape[0], chunk):  # float32 products per chunk (fast), summed in float64
        z = _features(block, x_ND[i:i + chunk])
        za = z * a[i:i + chunk, None]
        Ac, Bc = (za.T @ z).double(), (t[i:i + chunk].T @ za).double()
        A = Ac if A is None else A + Ac
        B = Bc if B is None else B + Bc
    before = losses.block_error(block(x_ND.to(block.router.weight.dtype)).float(), t).item()
    W0 = _down_matrix(block).double()
    lam = damp * A.diagonal().mean().clamp_min(1e-12)
    # A is PSD; with lam > 0 it is positive definite: solve (A + lam I) W^T = (B + lam W0)^T by Cholesky.
    L = torch.linalg.cholesky(A + lam * torch.eye(A.shape[0], dtype=A.dtype))
    W = torch.cholesky_solve((B + lam * W0).T, L).T
    _set_down_matrix(block, W.float())
    after = losses.block_error(block(x_ND.to(block.router.weight.dtype)).float(), t).item()
    if after > before:  # cannot happen for the fitted tokens in exact arithmetic; guard against round-off
        _set_down_matrix(block, W0.float())
        after = before
    return {"refit_before": before, "refit_after": after}
