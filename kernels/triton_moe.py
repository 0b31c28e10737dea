"""The Triton MoE FFN and routing as autograd functions: Triton forward, PyTorch backward.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, N = T*K pairs, S shared width.

Forward picks one of two paths:
  T <= DECODE_MAX_T  decode.py:  GEMV kernels over the chosen experts, no grouping
  otherwise          grouping.py (device-side counting sort) -> expert_gemm.up -> expert_gemm.down
                     -> expert_gemm.combine (sum over k in order, shared expert added)
The shared expert (an always-on dense SwiGLU) is a plain dense FFN, which cuBLAS already runs at its best:
it is computed with torch matmuls and only its addition is fused (into combine / the decode down kernel).

Backward recomputes the forward with the PyTorch reference under autograd and differentiates that (the
reference is the ground truth, so the gradients are exactly the reference's). It costs a second forward in
PyTorch; a Triton backward is future work if training on GPU becomes the bottleneck.
"""

from __future__ import annotations

import torch

from . import reference
from .decode import moe_decode
from .expert_gemm import combine, down, up
from .grouping import group_by_expert
from .routing import route as _route_kernel

DECODE_MAX_T = 64


def moe_ffn_forward(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared=None, decode=None):
    """Forward only (no autograd). `decode` forces a path; None picks by T."""
    T, D = x_TD.shape
    E, F, _ = gate_EFD.shape
    K = ids_TK.shape[1]
    if T == 0:
        return x_TD.new_zeros(T, D)
    x_TD = x_TD.contiguous()
    w_TK = weights_TK.float().contiguous()
    ids_TK = ids_TK.contiguous()
    shared_TD = reference.swiglu(x_TD, *shared) if shared is not None else None
    if decode if decode is not None else T <= DECODE_MAX_T:
        return moe_decode(x_TD, gate_EFD, up_EFD, down_EDF, w_TK, ids_TK, shared_TD)
    groups = group_by_expert(ids_TK, E)
    h_NF = up(x_TD, gate_EFD, up_EFD, groups, K)
    # Per-pair rows stay float32 for float32 inputs; in bf16/fp16 they are rounded once (after the routing
    # weight) to halve the traffic of this [N, D] buffer, and summed over k in float32 by combine.
    y_ND = down(h_NF, down_EDF, w_TK.reshape(-1), groups, torch.float32 if x_TD.dtype == torch.float32
                else x_TD.dtype)
    return combine(y_ND, K, shared_TD, x_TD.dtype)


class MoEFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, s_gate, s_up, s_down, decode):
        shared = (s_gate, s_up, s_down) if s_gate is not None else None
        ctx.has_shared = shared is not None
        ctx.save_for_backward(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, *(shared or ()))
        return moe_ffn_forward(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared, decode)

    @staticmethod
    def backward(ctx, grad_TD):
        x, gate, up_w, down_w, weights, ids, *shared = ctx.saved_tensors
        needs = list(ctx.needs_input_grad)
        del needs[5]  # ids: never differentiable
        inputs = [x, gate, up_w, down_w, weights] + (shared if ctx.has_shared else [])
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
            y = reference.moe_ffn(*leaves[:5], ids, shared=tuple(leaves[5:]) if ctx.has_shared else None)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            got = iter(torch.autograd.grad(y, wanted, grad_TD)) if wanted else iter(())
        grads = [next(got) if leaf.requires_grad else None for leaf in leaves]
        grads = grads[:5] + [None] + grads[5:]  # ids
        grads += [None] * (10 - len(grads))    # absent shared weights, `decode`
        return tuple(grads)


class Route(torch.autograd.Function):
    """Routing with a gradient to the logits: d weights / d logits through the chosen experts (top-k is
    piecewise constant, as in torch.topk's own backward)."""

    @staticmethod
    def forward(ctx, logits_TE, top_k, score_func, renormalize, scale):
        w_TK, ids_TK = _route_kernel(logits_TE, top_k, score_func, renormalize, scale)
        ctx.save_for_backward(logits_TE, ids_TK)
        ctx.args = (score_func, renormalize, scale)
        ctx.mark_non_differentiable(ids_TK)
        return w_TK, ids_TK

    @staticmethod
    def backward(ctx, grad_w_TK, _grad_ids):
        logits_TE, ids_TK = ctx.saved_tensors
        score_func, renormalize, scale = ctx.args
        with torch.enable_grad():
            logits = logits_TE.detach().requires_grad_(True)
            lf = logits.float()
            scores = torch.softmax(lf, -1) if score_func == "softmax" else torch.sigmoid(lf)
            w = scores.gather(1, ids_TK)
            if renormalize:
                w = w / w.sum(-1, keepdim=True)
            (grad,) = torch.autograd.grad(w * scale, logits, grad_w_TK)
        return grad, None, None, None, None


def moe_ffn(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared=None, decode=None):
    s = tuple(shared) if shared is not None else (None, None, None)
    return MoEFFN.apply(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, *s, decode)


def route(logits_TE, top_k, score_func="softmax", renormalize=True, scale=1.0):
    return Route.apply(logits_TE, top_k, score_func, renormalize, scale)
