"""The MoE FFN for CPU inference: the reference's function, computed in the fastest of three ways for the
number of tokens at hand. Forward only (no autograd): the model takes it on CPU under torch.no_grad() /
inference mode; training, and anything that needs gradients, goes through the reference.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, S shared width, U experts in use.

The weights are packed once per weight version (a copy, ~ the FFN's size again; repacked when a weight is
changed in place, moved or replaced):
    gate_up_all [2S + E*2F, D]  the shared gate rows, the shared up rows, then each expert's gate rows and
                                up rows (one matmul gives both; the whole FFN is one matrix)
    down_all [S + E*F, D]       the shared expert's down projection (transposed), then every routed expert's

Paths (`path=`), all equal to the reference up to float32 rounding:
    "gather"   only the U experts some token selected: their gate/up rows and down columns gathered into one
               small dense SwiGLU that runs on every token, each token's hidden units scaled by its routing
               weight (0 for experts it did not select). Reads only the selected experts' weights: the path
               for one or a few tokens, where reading weights is the cost. One token with at most
               ONE_TOKEN_MAX_K experts reads their rows in place instead (no gathered copy).
    "sorted"   tokens sorted by expert; one gate/up matmul per expert on its own tokens (only the selected
               experts' FLOPs); the weighted hidden units scattered into a [T, S + E*F] matrix (zeros
               elsewhere) that goes through ONE down projection, the shared expert's included. The down
               projection is dense, but it replaces K scattered per-expert outputs of width D per token,
               whose accumulation costs more than the FLOPs it saves at these expert widths.
    "masked"   the whole FFN as one dense SwiGLU (one gate/up matmul, one down), each token's routed hidden
               units scaled by its routing weights (0 where not selected): a dense model's cost and no more,
               for batches that use nearly every expert but are too small for "sorted" to pay.
    "auto"     by T, E and K (choose_path): "gather" for few tokens, "masked" for some, "sorted" for many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from .reference import sort_pairs

PATHS = ("auto", "gather", "masked", "sorted", "grouped")
# "auto": "gather" while the experts some token selected are expected to be at most GATHER_MAX_IN_USE of all
# (1 - (1 - K/E)^T, for independent tokens), since gathering pays off only while it skips many experts;
# else "sorted" once it skips enough FLOPs to pay for its per-expert calls and scatter ((1 - K/E) * T at
# least SORTED_MIN_SKIPPED), else "masked". Fitted to the demo model's two converted shapes (D 576, F 24;
# E 48 K 16 with S 384, and E 56 K 8 with S 192) on a 2-core AVX2 EPYC, 30 layers of weights, T from 1 to
# 512 (all paths timed, see README "CPU inference path"); the variables override them.
GATHER_MAX_IN_USE = float(os.environ.get("SURGERY_CPU_GATHER_MAX_IN_USE", "0.75"))
SORTED_MIN_SKIPPED = float(os.environ.get("SURGERY_CPU_SORTED_MIN_SKIPPED", "48"))
# Above this many (token, expert) pairs per expert, compute dominates and "grouped" (the reference's
# algorithm: per-expert gate/up AND down, outputs added back) does less work than "sorted"'s dense down
# projection; measured end to end on 8 x 512 prefill of the 50% demo model (1.30x dense vs 0.91x).
GROUPED_MIN_PAIRS = float(os.environ.get("SURGERY_CPU_GROUPED_MIN_PAIRS", "256"))
# One token with at most this many experts: "gather" reads the experts' rows in place, one small product pair
# per expert, instead of gathering them into one copy first (the loop's per-call cost grows with K).
ONE_TOKEN_MAX_K = int(os.environ.get("SURGERY_CPU_ONE_TOKEN_MAX_K", "4"))


@dataclass
class Packed:
    key: tuple
    gate_up_all: torch.Tensor  # [2S + E*2F, D]: the shared gate rows, shared up rows, then gate_up below
    down_all: torch.Tensor  # [S + E*F, D]: rows of the transposed down projections
    shared_width: int
    num_experts: int
    width: int

    @property
    def gate_up(self) -> torch.Tensor:  # [E, 2F, D]
        S, E, F = self.shared_width, self.num_experts, self.width
        return self.gate_up_all[2 * S:].view(E, 2 * F, -1)

    @property
    def shared_gate_up(self) -> torch.Tensor | None:  # [2S, D]
        return self.gate_up_all[:2 * self.shared_width] if self.shared_width else None


_ATTR = "_surgery_cpu_packed"  # the packed copy lives on the gate tensor, and goes when it goes


def _key(tensors) -> tuple:
    # A move or a dtype change gives new storage (a new data_ptr); in-place changes bump _version.
    return tuple((t.data_ptr(), t._version) for t in tensors)


@torch.no_grad()
def pack(gate_EFD, up_EFD, down_EDF, shared=None) -> Packed:
    """The packed weights for these tensors, built once and reused while none of them changes."""
    sources = (gate_EFD, up_EFD, down_EDF) + tuple(shared or ())
    key = _key(sources)
    hit = getattr(gate_EFD, _ATTR, None)
    if hit is not None and hit.key == key:
        return hit
    E, F, D = gate_EFD.shape
    routed = torch.cat([gate_EFD, up_EFD], dim=1).reshape(E * 2 * F, D)
    down_r = down_EDF.transpose(1, 2).reshape(E * F, D)
    if shared is not None:
        s_gate, s_up, s_down = shared
        gate_up_all = torch.cat([s_gate, s_up, routed]).contiguous()
        down_all = torch.cat([s_down.t(), down_r]).contiguous()
        S = s_gate.shape[0]
    else:
        gate_up_all, down_all, S = routed.contiguous(), down_r.contiguous(), 0
    packed = Packed(key, gate_up_all, down_all, S, E, F)
    setattr(gate_EFD, _ATTR, packed)
    return packed


def choose_path(T: int, E: int, K: int) -> str:
    if K >= E:  # every token runs every expert (e.g. E1 K1: a head-experts model's dense FFN): dense work
        return "masked"
    skipped = 1 - K / E  # the fraction of routed experts a token does not run
    if 1 - skipped ** T <= GATHER_MAX_IN_USE:
        return "gather"
    if T * K / E >= GROUPED_MIN_PAIRS:
        return "grouped"
    return "sorted" if skipped * T >= SORTED_MIN_SKIPPED else "masked"


@torch.no_grad()
def route(logits_TE: torch.Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.route in fewer operations where that is exact in real arithmetic: with softmax scores
    renormalised over the top k, the weights are a softmax over the k largest logits (softmax is monotone,
    so the same experts are chosen). Other settings take the reference."""
    from . import reference

    if score_func != "softmax" or not renormalize:
        return reference.route(logits_TE, top_k, score_func, renormalize, scale)
    top, ids_TK = logits_TE.float().topk(top_k, dim=-1)
    weights_TK = torch.softmax(top, dim=-1)
    if scale != 1.0:
        weights_TK.mul_(scale)
    return weights_TK, ids_TK


def _swiglu_halves(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [..., 2F] holding gate then up."""
    g, u = h.chunk(2, dim=-1)
    return Fn.silu(g).mul_(u)


@torch.no_grad()
def moe_ffn(x_TD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
            weights_TK: torch.Tensor, ids_TK: torch.Tensor, shared=None, path: str = "auto") -> torch.Tensor:
    """y[t] = sum_k weights[t,k] * expert_{ids[t,k]}(x[t]) (+ shared SwiGLU(x[t])), in x's dtype."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    p = pack(gate_EFD, up_EFD, down_EDF, shared)
    T, K = ids_TK.shape
    if path == "auto":
        path = choose_path(T, p.num_experts, K)
    if path == "gather":
        return _gather(x_TD, p, weights_TK, ids_TK)
    if path == "masked":
        return _masked(x_TD, p, weights_TK, ids_TK)
    if path == "grouped":
        return _grouped(x_TD, p, weights_TK, ids_TK)
    return _sorted(x_TD, p, weights_TK, ids_TK)


def _grouped(x_TD, p: Packed, weights_TK, ids_TK):
    """The reference's algorithm on the packed weights: each expert's gate/up and down on its own tokens,
    weighted outputs added back per token."""
    T, D = x_TD.shape
    E, F, S = p.num_experts, p.width, p.shared_width
    order, token_of, counts = sort_pairs(ids_TK, E)  # one host sync per layer
    weight_of = weights_TK.reshape(-1)[order, None].to(x_TD.dtype)
    down_EFD = p.down_all[S:].view(E, F, D)
    if p.shared_gate_up is not None:
        out = _swiglu_halves(Fn.linear(x_TD, p.shared_gate_up)) @ p.down_all[:S]
    else:
        out = x_TD.new_zeros(T, D)
    start = 0
    for e, n in enumerate(counts):
        if n:
            tokens = token_of[start:start + n]
            act = _swiglu_halves(Fn.linear(x_TD.index_select(0, tokens), p.gate_up[e]))
            act.mul_(weight_of[start:start + n])
            out.index_add_(0, tokens, act @ down_EFD[e])
            start += n
    return out


def _masked(x_TD, p: Packed, weights_TK, ids_TK):
    T, D = x_TD.shape
    E, F, S = p.num_experts, p.width, p.shared_width
    h = Fn.linear(x_TD, p.gate_up_all)  # the whole FFN's gate and up in one matmul, as a dense model would
    act = x_TD.new_empty(T, S + E * F)
    if S:
        torch.mul(Fn.silu(h[:, :S]), h[:, S:2 * S], out=act[:, :S])
    hr = h[:, 2 * S:].view(T, E, 2, F)
    routed = act[:, S:].view(T, E, F)
    torch.mul(Fn.silu(hr[:, :, 0]), hr[:, :, 1], out=routed)
    scale = x_TD.new_zeros(T, E).scatter_(1, ids_TK, weights_TK.to(x_TD.dtype))
    routed.mul_(scale[:, :, None])
    return act @ p.down_all


def _gather(x_TD, p: Packed, weights_TK, ids_TK):
    T, D = x_TD.shape
    E, F, S = p.num_experts, p.width, p.shared_width
    if T == 1 and ids_TK.shape[1] <= ONE_TOKEN_MAX_K:
        return _one_token(x_TD, p, weights_TK, ids_TK)
    if T == 1:  # one token (batch-1 decode): its K experts are distinct, in any order
        experts_U, w_TU = ids_TK[0], weights_TK.to(x_TD.dtype)
    else:
        used = torch.zeros(E, dtype=torch.bool, device=x_TD.device)
        used[ids_TK.reshape(-1)] = True
        experts_U = used.nonzero().squeeze(1)
        slot_E = torch.empty(E, dtype=torch.long, device=x_TD.device)
        slot_E[experts_U] = torch.arange(experts_U.numel(), device=x_TD.device)
        w_TU = torch.zeros(T, experts_U.numel(), dtype=x_TD.dtype, device=x_TD.device)
        w_TU.scatter_(1, slot_E[ids_TK], weights_TK.to(x_TD.dtype))
    U = experts_U.numel()
    gate_up = p.gate_up.index_select(0, experts_U).view(U * 2 * F, D)
    h = _swiglu_halves(Fn.linear(x_TD, gate_up).view(T, U, 2 * F))  # [T, U, F]
    h.mul_(w_TU[:, :, None])
    down_U = p.down_all[S:].view(E, F, D).index_select(0, experts_U).view(U * F, D)
    y = h.view(T, U * F) @ down_U
    if p.shared_gate_up is not None:
        y.addmm_(_swiglu_halves(Fn.linear(x_TD, p.shared_gate_up)), p.down_all[:S])
    return y


def _one_token(x_TD, p: Packed, weights_TK, ids_TK):
    """One token, few experts: each selected expert's rows read where they are packed (views), no gathered
    copy. At one token the products are matrix-vector and read each weight once, so a gathered copy (read,
    write, read again) costs about as much as the products it feeds."""
    S, F = p.shared_width, p.width
    w = weights_TK.to(x_TD.dtype)
    y = _swiglu_halves(Fn.linear(x_TD, p.shared_gate_up)) @ p.down_all[:S] if S else None
    for k, e in enumerate(ids_TK[0].tolist()):
        h = _swiglu_halves(Fn.linear(x_TD, p.gate_up[e])).mul_(w[:, k:k + 1])
        down = p.down_all[S + e * F:S + (e + 1) * F]
        y = h @ down if y is None else y.addmm_(h, down)
    return y


def _sorted(x_TD, p: Packed, weights_TK, ids_TK):
    T, D = x_TD.shape
    E, F, S = p.num_experts, p.width, p.shared_width
    order, token_of, counts = sort_pairs(ids_TK, E)  # one host sync per layer
    expert_of = ids_TK.reshape(-1)[order]
    x_sorted = x_TD.index_select(0, token_of)
    h = torch.empty(order.numel(), 2 * F, dtype=x_TD.dtype, device=x_TD.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_sorted[start:start + n], p.gate_up[e].t(), out=h[start:start + n])
            start += n
    act = _swiglu_halves(h).mul_(weights_TK.reshape(-1)[order, None].to(x_TD.dtype))  # [T*K, F]
    H = x_TD.new_zeros(T, S + E * F)
    if p.shared_gate_up is not None:
        H[:, :S] = _swiglu_halves(Fn.linear(x_TD, p.shared_gate_up))
    # Each (token, expert) pair owns F consecutive slots of H's routed part; a token selects an expert once.
    cols = (S + expert_of * F)[:, None] + torch.arange(F, device=x_TD.device)
    H.view(-1).index_copy_(0, (token_of[:, None] * (S + E * F) + cols).view(-1), act.view(-1))
    return H @ p.down_all
