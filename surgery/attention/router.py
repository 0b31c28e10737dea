"""Head routing: scores, routing weights, which heads are shared, and the learned router's initialisation.

Shape legend: T tokens, D hidden, H query heads, R routable heads (H - S), K routed heads per token,
d head dim, N profiled tokens.

Both routers give a log-scale score per routable head, so that the routing rule (softmax over the R
scores, top-K, renormalised to sum 1, times K: surgery.router's rule, the FFN experts' one) turns them
into weights proportional to the score's exponent among the selected heads, averaging 1:
  * qnorm   (parameter-free, MoH's signal): log ||q_h||, the norm of the head's query vector. It needs every
            routable head's query, so q_proj runs for all heads; the sparse path skips the rest.
  * learned a linear map [R, D] + bias of the attention input, fitted by least squares to log of each
            head's output norm on profiled tokens (`surgery profile --heads`). Without a profile it starts
            at zero: equal scores, so top-K is a fixed set of K heads (torch.topk's tie order) with weight 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from surgery.precision import full_precision
from surgery.router import RoutingConfig, route_weights

EPS = 1e-6


def qnorm_logits(q_TRd: torch.Tensor) -> torch.Tensor:
    """log ||q_h|| per token and routable head, float32 [T, R]."""
    return q_TRd.float().norm(dim=-1).clamp_min(EPS).log()


def learned_logits(x_TD: torch.Tensor, weight_RD: torch.Tensor, bias_R: torch.Tensor | None) -> torch.Tensor:
    """The learned router's scores in float32 [T, R], autocast or not."""
    with full_precision(x_TD):
        return Fn.linear(x_TD.float(), weight_RD.float(), None if bias_R is None else bias_R.float())


def head_routing(top_k: int, scale: float) -> RoutingConfig:
    return RoutingConfig(top_k=top_k, score_func="softmax", renormalize=True, scale=float(scale))


def route_heads(logits_TR: torch.Tensor, top_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK float32, ids_TK into the routable heads): the model's one routing rule."""
    return route_weights(logits_TR, head_routing(top_k, scale))


def head_weights(weights_TK: torch.Tensor, ids_TK: torch.Tensor, shared: list[int], routed: list[int],
                 heads: int) -> torch.Tensor:
    """Per token and head, the weight its output gets: 1 for shared heads, the routing weight for the selected
    routed heads, 0 otherwise [T, H] (float32)."""
    T = weights_TK.shape[0]
    w_TR = torch.zeros(T, len(routed), dtype=torch.float32, device=weights_TK.device).scatter(1, ids_TK, weights_TK)
    w_TH = torch.zeros(T, heads, dtype=torch.float32, device=weights_TK.device)
    if shared:
        w_TH[:, shared] = 1.0
    w_TH[:, routed] = w_TR
    return w_TH


def choose_shared(contribution_H: torch.Tensor | None, shared_heads: int) -> list[int]:
    """The S always-on heads: the largest mean output contribution on profiled data, else the first S."""
    if contribution_H is None:
        return list(range(shared_heads))
    return sorted(contribution_H.float().topk(shared_heads).indices.tolist()) if shared_heads else []


def fit_router(x_ND: torch.Tensor, norms_NR: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares (ridge-regularised) of log(head output norm) on the attention input plus a bias:
    returns (weight [R, D], bias [R]) in float32."""
    x = x_ND.float()
    y = norms_NR.float().clamp_min(EPS).log()
    N, D = x.shape
    xa = torch.cat([x, torch.ones(N, 1)], dim=1)
    gram = xa.T @ xa / N
    reg = ridge * gram.diagonal()[:D].mean() * torch.eye(D + 1)
    reg[D, D] = 0.0  # the bias is not shrunk
    sol = torch.linalg.solve(gram.double() + reg.double(), (xa.T @ y / N).double()).float()  # [D + 1, R]
    return sol[:D].T.contiguous(), sol[D].contiguous()
