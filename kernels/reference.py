"""The PyTorch reference for routing and the sparse MoE FFN: ground truth for the Triton kernels, and the
path the model takes on CPU (it is differentiable, so calibration can train through it).

Shape legend: T tokens, D hidden, E experts, F expert width, K experts per token, S shared width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn


def route(logits_TE: torch.Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores over all experts (float32), top-k, optional renormalisation, scale.
    Returns (weights_TK float32, ids_TK int64)."""
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', not {score_func!r}")
    logits = logits_TE.float()
    scores = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
    weights_TK, ids_TK = scores.topk(top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weights_TK = weights_TK * scale
    return weights_TK, ids_TK


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return Fn.linear(Fn.silu(Fn.linear(x, gate)) * Fn.linear(x, up), down)


def sort_pairs(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The (token, k) pairs sorted by expert, stably (ties keep token order): (order [T*K], the flat pair index
    of each sorted row; token_of [T*K], its token; counts, pairs per expert as a list: one host sync)."""
    flat = ids_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, order // ids_TK.shape[1], torch.bincount(flat, minlength=num_experts).tolist()


def moe_ffn(x_TD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
            weights_TK: torch.Tensor, ids_TK: torch.Tensor, shared=None) -> torch.Tensor:
    """y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])  (+ shared SwiGLU(x[t]) with weight 1).

    Tokens are grouped by expert with one stable sort; each expert runs once on its tokens and its weighted
    output is added back in float32, experts in increasing order (as transformers' Mixtral does, so the two
    agree to the bit in float32)."""
    T = ids_TK.shape[0]
    order, token_of, counts = sort_pairs(ids_TK, gate_EFD.shape[0])  # one host sync: fine for the reference
    weight_of = weights_TK.reshape(-1)[order]
    out = torch.zeros(T, x_TD.shape[1], dtype=torch.float32, device=x_TD.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens = token_of[start:start + n]
        # gate and up as one matmul, as transformers' fused experts do: identical rounding, so a stock
        # Mixtral / Qwen2-MoE export reproduces our logits to the bit in float32.
        g, u = Fn.linear(x_TD[tokens], torch.cat([gate_EFD[e], up_EFD[e]])).chunk(2, dim=-1)
        y = Fn.linear(Fn.silu(g) * u, down_EDF[e])
        out = out.index_add(0, tokens, y.float() * weight_of[start:start + n, None])
        start += n
    if shared is not None:
        out = out + swiglu(x_TD, *shared).float()
    return out.to(x_TD.dtype)


def moe_ffn_masked(x_TD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
                   weights_TK: torch.Tensor, ids_TK: torch.Tensor, shared=None) -> torch.Tensor:
    """The same function as moe_ffn, computed densely: every expert runs on every token and its neurons are
    scaled by the token's routing weight (0 for experts not selected). It does E/K times the routed FLOPs but
    as three large matmuls, which on a CPU trains and evaluates several times faster than grouping tokens by
    expert once experts are small (calibration's path; never a speed claim). Differentiable in the weights."""
    T, D = x_TD.shape
    E, F, _ = gate_EFD.shape
    w_TE = torch.zeros(T, E, dtype=torch.float32, device=x_TD.device).scatter(1, ids_TK, weights_TK.float())
    h_TEF = (Fn.silu(Fn.linear(x_TD, gate_EFD.reshape(E * F, D))) * Fn.linear(x_TD, up_EFD.reshape(E * F, D)))
    h_TEF = h_TEF.reshape(T, E, F) * w_TE[:, :, None].to(h_TEF.dtype)
    y = Fn.linear(h_TEF.reshape(T, E * F), down_EDF.permute(1, 0, 2).reshape(D, E * F))
    if shared is not None:
        y = y + swiglu(x_TD, *shared)
    return y.to(x_TD.dtype)


def moe_ffn_sorted(x_TD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
                   weights_TK: torch.Tensor, ids_TK: torch.Tensor, shared=None) -> torch.Tensor:
    """The same function with only the selected experts' work, laid out for training: the (token, expert) pairs
    are sorted by expert and gathered ONCE, each expert runs on its contiguous slice, and the weighted outputs
    go back in ONE scatter-add (moe_ffn gathers and scatters per expert, so its backward zero-fills a [T, D]
    gradient per expert). K/E of the masked path's FLOPs: the calibration path when experts are few and K small.
    Differentiable in x, the weights and the routing weights; one host sync (the counts).
    Under CPU autocast the routed experts run in float32 (the shared expert follows autocast): each expert's
    token count changes every step, and oneDNN builds a bfloat16 matmul afresh for every new shape (~1 ms a
    call for a [100, 576] x [576, 96] product on 2 Xeon cores, against ~0.1 ms in float32)."""
    y = sorted_routed(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK)
    return y if shared is None else y + swiglu(x_TD, *shared)


# torch.compiler.disable, but importing torch._dynamo only at the first call (at import it costs ~2 s of every
# command's start-up here); falls back to the public decorator where torch lacks the lazy one
_eager_under_compile = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


@_eager_under_compile
def sorted_routed(x_TD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
                  weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """moe_ffn_sorted's routed experts. Eager even inside a compiled layer (surgery/compiled.py): the per-expert
    slices change shape every step, and each new shape would recompile."""
    if x_TD.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return sorted_routed(x_TD.float(), gate_EFD.float(), up_EFD.float(), down_EDF.float(), weights_TK,
                                 ids_TK)
    T, D = x_TD.shape
    order, token_of, counts = sort_pairs(ids_TK, gate_EFD.shape[0])
    xs = x_TD.index_select(0, token_of)
    # unbind, not gate_EFD[e]: the backward of E index views zero-fills E full [E, F, D] gradients and adds
    # them up; unbind's is one stack
    gates, ups, downs = gate_EFD.unbind(0), up_EFD.unbind(0), down_EDF.unbind(0)
    parts = [Fn.linear(Fn.silu(Fn.linear(xe, gates[e])) * Fn.linear(xe, ups[e]), downs[e])
             for e, xe in enumerate(xs.split(counts)) if counts[e]]
    ys = torch.cat(parts) * weights_TK.reshape(-1)[order, None].to(x_TD.dtype)
    return torch.zeros(T, D, dtype=x_TD.dtype, device=x_TD.device).index_add(0, token_of, ys)


def moe_ffn_one_token(x_TD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
                      weights_TK: torch.Tensor, ids_TK: torch.Tensor, shared=None) -> torch.Tensor:
    """The same function for a single token (T = 1, a batch-1 decode step): its K experts' weights gathered by
    index and nothing else read, with no host sync (the compiled CPU path's decode step)."""
    assert x_TD.shape[0] == 1, "one token only"
    ids_K, w_K = ids_TK[0], weights_TK[0]
    x_D = x_TD[0]
    g_KF = torch.einsum("kfd,d->kf", gate_EFD.index_select(0, ids_K), x_D)
    u_KF = torch.einsum("kfd,d->kf", up_EFD.index_select(0, ids_K), x_D)
    h_KF = Fn.silu(g_KF) * u_KF * w_K[:, None].to(x_TD.dtype)
    y = torch.einsum("kdf,kf->d", down_EDF.index_select(0, ids_K), h_KF)[None]
    if shared is not None:
        y = y + swiglu(x_TD, *shared)
    return y.to(x_TD.dtype)
