"""The MoE FFN for CPU inference: the reference's function, computed in the fastest of four ways for the
number of tokens at hand (moe_block: the whole block, routing included, in one call). Forward only (no
autograd): the model takes it on CPU under torch.no_grad() / inference mode; training, and anything that needs
gradients, goes through the reference.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, S shared width, U experts in use.

The weights are packed once per weight version (a copy, ~ the FFN's size again; repacked when a weight is
changed in place, moved or replaced):
    gate_up_all [2S + E*2F, D]  the shared gate rows, the shared up rows, then each expert's gate rows and
                                up rows (one matmul over a run of rows gives both)
    down_all [S + E*F, D]       the shared expert's down projection (transposed), then every routed expert's

Paths (`path=`), all equal to the reference up to float32 rounding:
    "gather"   only the U experts some token selected: their gate/up rows and down columns gathered into one
               small dense SwiGLU that runs on every token, each token's hidden units scaled by its routing
               weight (0 for experts it did not select). Reads only the selected experts' weights: the path
               for one token, where reading weights is the cost. One token with at most
               ONE_TOKEN_MAX_K experts reads their rows in place instead (no gathered copy).
    "sorted"   tokens sorted by expert; one gate/up matmul per expert on its own tokens (only the selected
               experts' FLOPs); the weighted hidden units scattered into a [T, S + E*F] matrix (zeros
               elsewhere) that goes through ONE down projection, the shared expert's included. The down
               projection is dense, but it replaces K scattered per-expert outputs of width D per token,
               whose accumulation costs more than the FLOPs it saves at these expert widths.
    "masked"   the experts some token selected, as a few dense SwiGLU products over their packed rows in place
               (runs of used experts; an unused expert is skipped where that saves a wide enough read), each
               token's routed hidden units scaled by its routing weights (0 where not selected): at most a
               dense model's work, for a few tokens up to batches too small for "sorted" to pay.
    "grouped"  the reference's algorithm on the packed weights (per-expert gate/up and down on the expert's own
               tokens): for many tokens per expert.
    "auto"     by T, E, K and F (choose_path): "gather" for one token, "masked" for some, "sorted", then
               "grouped" once each expert's products are large (T * K / E * F rows of hidden units).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn

from .reference import sort_pairs

PATHS = ("auto", "gather", "masked", "sorted", "grouped")
# "auto": "gather" for one token (it reads only that token's experts); else "sorted" once it skips enough FLOPs
# to pay for its per-expert calls and scatter ((1 - K/E) * T at least SORTED_MIN_SKIPPED), else "masked".
# Round 14 (2-core Xeon, the 30 layers' weights streamed, demo model's E10 K2 of 96 and E13 K1 of 96): the
# masked path, which reads the used experts' rows in place, beat gathering them into a copy from 2 tokens on
# (E13 K1 at 2 / 4 / 8 tokens: 10.5 / 17.3 / 25.0 ms against 12.6 / 20.5 / 29.3; E48 K16 of 24: level);
# earlier rounds fitted the sorted threshold on a 2-core AVX2 EPYC (E 48 K 16 with S 384, and E 56 K 8 with
# S 192, T from 1 to 512; README "CPU inference path"); the variables override them.
SORTED_MIN_SKIPPED = float(os.environ.get("SURGERY_CPU_SORTED_MIN_SKIPPED", "48"))
# "grouped" (the reference's algorithm: per-expert gate/up AND down, outputs added back) skips the down
# projection's FLOPs too, where "sorted" runs one dense down projection; it pays once each expert's products
# are large enough for their per-call cost: from this many rows of expert hidden units per expert, (T * K / E)
# pairs times the expert width F. Round 23 (2-core Xeon, float32, every layer's FFN on real routed inputs,
# `python -m surgery_evals.bench_cpu_paths`, results/bench/cpu-paths-*-r23.json): 96-wide experts (E10 K2)
# break even between 1,229 and 2,458 rows (T = 64 / 128; at 512 tokens grouped 1.53x dense, sorted 1.28x),
# 24-wide ones (E40 K8) at ~2,458 (T = 512: 1.09x / 1.13x; at 4,096 grouped 1.34x, sorted 0.89x). Until
# round 23 the threshold was 256 pairs per expert whatever F (fitted on 24-wide experts).
GROUPED_MIN_ROWS = float(os.environ.get("SURGERY_CPU_GROUPED_MIN_ROWS", "2500"))
# The masked path's gate/up products are cut into pieces of at most this many weight rows: at 4-16 tokens
# this machine's BLAS ran one [T, 576] x [576, 3072] product 25-30% slower than the same rows in pieces of
# 512-1,536 (a dense Llama FFN's gate and up are two products of 1,536 rows), 30 layers' weights streamed.
MAX_ROWS = int(os.environ.get("SURGERY_CPU_MAX_ROWS", "1536"))
# ... and skip unused experts only where the gap holds at least this many gate/up rows.
MIN_GAP_ROWS = int(os.environ.get("SURGERY_CPU_MIN_GAP_ROWS", "192"))
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
    # Views into the two, made once (per-call slicing is Python overhead on the one-token path):
    gate_up: torch.Tensor = field(init=False)  # [E, 2F, D]
    down: torch.Tensor = field(init=False)  # [E, F, D]
    expert_gate_up: list = field(init=False)  # E x [2F, D]
    expert_down: list = field(init=False)  # E x [F, D]
    shared_gate_up: torch.Tensor | None = field(init=False)  # [2S, D]
    shared_down: torch.Tensor | None = field(init=False)  # [S, D]

    def __post_init__(self):
        S, E, F = self.shared_width, self.num_experts, self.width
        self.gate_up = self.gate_up_all[2 * S:].view(E, 2 * F, -1)
        self.down = self.down_all[S:].view(E, F, -1)
        self.expert_gate_up, self.expert_down = list(self.gate_up.unbind(0)), list(self.down.unbind(0))
        self.shared_gate_up = self.gate_up_all[:2 * S] if S else None
        self.shared_down = self.down_all[:S] if S else None


_ATTR = "_surgery_cpu_packed"  # the packed copy lives on the gate tensor, and goes when it goes


def _key(tensors) -> tuple:
    # A move or a dtype change gives new storage (a new data_ptr); in-place changes bump _version.
    return tuple([(t.data_ptr(), t._version) for t in tensors])


def pack(gate_EFD, up_EFD, down_EDF, shared=None) -> Packed:
    """The packed weights for these tensors, built once and reused while none of them changes."""
    key = _key((gate_EFD, up_EFD, down_EDF) + tuple(shared or ()))
    hit = getattr(gate_EFD, _ATTR, None)
    if hit is not None and hit.key == key:
        return hit
    with torch.no_grad():
        return _pack(key, gate_EFD, up_EFD, down_EDF, shared)


def _pack(key, gate_EFD, up_EFD, down_EDF, shared) -> Packed:
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


def choose_path(T: int, E: int, K: int, F: int) -> str:
    """The path for T tokens routed to K of E experts of width F."""
    if K >= E:  # every token runs every expert (e.g. E1 K1: a head-experts model's dense FFN): dense work
        return "masked"
    if T == 1:
        return "gather"
    skipped = 1 - K / E  # the fraction of routed experts a token does not run
    if T * K / E * F >= GROUPED_MIN_ROWS:
        return "grouped"
    return "sorted" if skipped * T >= SORTED_MIN_SKIPPED else "masked"


@torch.no_grad()
def route(logits_TE: torch.Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.route in fewer operations where that is exact in real arithmetic: with softmax scores
    renormalised over the top k, the weights are a softmax over the k largest logits (softmax is monotone,
    so the same experts are chosen). Other settings take the reference."""
    return _route(logits_TE, top_k, score_func, renormalize, scale)


def _route(logits_TE, top_k, score_func="softmax", renormalize=True, scale=1.0):
    """route without the no_grad wrapper (for moe_block, whose caller has autograd off already)."""
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
    return _ffn(x_TD, pack(gate_EFD, up_EFD, down_EDF, shared), weights_TK, ids_TK, path)


def moe_block(x_TD: torch.Tensor, router_ED: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor,
              down_EDF: torch.Tensor, shared, top_k: int, score_func: str = "softmax", renormalize: bool = True,
              scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole MoE block in one call: float32 router logits, routing, then moe_ffn's "auto" path. Returns
    (y [T, D] in x's dtype, logits [T, E] float32). For a caller already under no_grad with autocast off
    (surgery.moe.MoEBlock on CPU): at one token the dispatch layers it skips (ops.route, ops.moe_ffn and
    their checks) cost a third as much again as the FFN's own work (30 layers, 2-core Xeon)."""
    if x_TD.dtype == router_ED.dtype == torch.float32:
        logits_TE = Fn.linear(x_TD, router_ED)
    else:
        logits_TE = Fn.linear(x_TD.float(), router_ED.float())
    weights_TK, ids_TK = _route(logits_TE, top_k, score_func, renormalize, scale)
    return _ffn(x_TD, pack(gate_EFD, up_EFD, down_EDF, shared), weights_TK, ids_TK, "auto"), logits_TE


def _ffn(x_TD, p: Packed, weights_TK, ids_TK, path):
    if path == "auto":
        path = choose_path(ids_TK.shape[0], p.num_experts, ids_TK.shape[1], p.width)
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
    E, S = p.num_experts, p.shared_width
    order, token_of, counts = sort_pairs(ids_TK, E)  # one host sync per layer
    weight_of = weights_TK.reshape(-1)[order, None].to(x_TD.dtype)
    out = _shared(x_TD, p) if S else x_TD.new_zeros(T, D)
    start = 0
    for e, n in enumerate(counts):
        if n:
            tokens = token_of[start:start + n]
            act = _swiglu_halves(Fn.linear(x_TD.index_select(0, tokens), p.gate_up[e]))
            act.mul_(weight_of[start:start + n])
            out.index_add_(0, tokens, act @ p.down[e])
            start += n
    return out


def _masked(x_TD, p: Packed, weights_TK, ids_TK):
    """The experts some token selected as a few dense products over their contiguous packed rows (unused
    experts' rows are not read where they leave a wide enough gap), each token's hidden units scaled by its
    routing weight (0 for an expert it did not select)."""
    T, D = x_TD.shape
    E, F, S = p.num_experts, p.width, p.shared_width
    scale_TE = x_TD.new_zeros(T, E).scatter_(1, ids_TK, weights_TK.to(x_TD.dtype))
    used = torch.zeros(E, dtype=torch.bool, device=x_TD.device)
    used[ids_TK.reshape(-1)] = True
    y = _shared(x_TD, p) if S else x_TD.new_zeros(T, D)
    for e0, e1 in spans(used.tolist(), 2 * F):
        n = e1 - e0
        h = Fn.linear(x_TD, p.gate_up_all[2 * S + e0 * 2 * F:2 * S + e1 * 2 * F]).view(T, n, 2, F)
        act = Fn.silu(h[:, :, 0]).mul_(h[:, :, 1]).mul_(scale_TE[:, e0:e1, None])
        y.addmm_(act.view(T, n * F), p.down_all[S + e0 * F:S + e1 * F])
    return y


def _shared(x_TD, p: Packed):
    """The shared expert's SwiGLU; gate and up as two products where one would exceed MAX_ROWS rows."""
    S = p.shared_width
    if 2 * S <= MAX_ROWS:
        return _swiglu_halves(Fn.linear(x_TD, p.shared_gate_up)) @ p.shared_down
    gu = p.shared_gate_up
    return Fn.silu(Fn.linear(x_TD, gu[:S])).mul_(Fn.linear(x_TD, gu[S:])) @ p.shared_down


def spans(used: list, rows_per_expert: int) -> list[tuple[int, int]]:
    """The [e0, e1) runs of experts the masked path computes: the used ones, joined across gaps of fewer than
    MIN_GAP_ROWS gate/up rows (reading those costs less than another product call), cut into near-equal
    pieces of at most MAX_ROWS rows."""
    min_gap = -(-MIN_GAP_ROWS // rows_per_expert)  # in experts
    runs, E, e = [], len(used), 0
    while e < E:
        if not used[e]:
            e += 1
            continue
        end = e + 1
        while end < E:
            nxt = end
            while nxt < E and not used[nxt]:
                nxt += 1
            if nxt == end:  # used: extend
                end += 1
            elif nxt < E and nxt - end < min_gap:  # a narrow gap before more used experts: read through it
                end = nxt
            else:
                break
        runs.append((e, end))
        e = end
    per = max(1, MAX_ROWS // rows_per_expert)
    out = []
    for a, b in runs:
        pieces = -(-(b - a) // per)
        size = -(-(b - a) // pieces)
        out += [(i, min(i + size, b)) for i in range(a, b, size)]
    return out


def _gather(x_TD, p: Packed, weights_TK, ids_TK):
    T, D = x_TD.shape
    E, F = p.num_experts, p.width
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
    down_U = p.down.index_select(0, experts_U).view(U * F, D)
    y = h.view(T, U * F) @ down_U
    if p.shared_gate_up is not None:
        y.addmm_(_swiglu_halves(Fn.linear(x_TD, p.shared_gate_up)), p.shared_down)
    return y


def _one_token(x_TD, p: Packed, weights_TK, ids_TK):
    """One token, few experts: each selected expert's rows read where they are packed (views), no gathered
    copy. At one token the products are matrix-vector and read each weight once, so a gathered copy (read,
    write, read again) costs about as much as the products it feeds. The routing weight scales each expert's
    product (addmm's alpha), one operation fewer per expert than scaling its hidden units."""
    y = _shared(x_TD, p) if p.shared_width else None
    for e, w in zip(ids_TK[0].tolist(), weights_TK[0].tolist()):
        h = _swiglu_halves(Fn.linear(x_TD, p.expert_gate_up[e]))
        y = torch.mm(h, p.expert_down[e]).mul_(w) if y is None else y.addmm_(h, p.expert_down[e], alpha=w)
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
