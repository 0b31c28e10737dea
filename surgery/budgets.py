"""Per-layer budgets: how many experts each layer routes to, at the same mean top-k (`--layer-budgets`).

Why: layers are not equally hurt by routing. Measured on profiled inputs, some layers' routed output is
nearly the dense FFN's at a small k while others need many experts; giving the sensitive layers more experts
and the easy ones fewer lowers the total error at the same average active width (the same mean compute).

A budget rule is a function (layer error curves or None, layers, top_k, num_experts) -> per-layer ks, where
an empty list means uniform. `data_aware` rules get, per layer, the relative error of the block output at each
candidate k (`layer_errors`), measured once during conversion with the router as initialised.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from surgery.config import routing_at_k
from surgery.errors import SurgeryError
from surgery.router import RoutingConfig, group_outputs, route_weights


def floor_k(top_k: int) -> int:
    """No layer goes below half the mean top-k: the error curves are per layer, on a few thousand profiled
    tokens, and do not see how a starved layer's error compounds through the layers after it."""
    return max(1, top_k // 2)


def candidate_ks(top_k: int, num_experts: int) -> range:
    return range(floor_k(top_k), num_experts + 1)


def layer_errors(ffn, groups: list[torch.Tensor], shared: int, stats, router_ED: torch.Tensor,
                 routing: RoutingConfig, ks) -> dict[int, float]:
    """{k: relative squared error of the block output at top-k = k} on the profiled inputs (stats.inputs):
    sum over tokens of ||routed_k - routed_all||^2 / ||dense FFN output||^2 (the shared part is always on,
    so it cancels in the numerator). Each k routes as the converted layer would (routing_at_k)."""
    if stats is None:
        raise SurgeryError("--layer-budgets sensitivity needs profiling statistics (give --profile PATH)")
    x_ND = stats.inputs.float()
    y_NED = group_outputs(x_ND, ffn.gate, ffn.up, ffn.down, groups[shared:])
    N, E, _ = y_NED.shape
    target_ND = y_NED.sum(1)
    dense_ND = target_ND
    if shared:
        dense_ND = dense_ND + group_outputs(x_ND, ffn.gate, ffn.up, ffn.down, [torch.cat(groups[:shared])])[:, 0]
    denom = dense_ND.pow(2).sum().clamp_min(1e-12)
    # One sort serves every k: top-k are the first k experts by score, so the selected experts' score-weighted
    # sum grows by one term per k (E steps of N x D instead of one N x E x D product per k).
    scores_NE, order_NE = route_weights(x_ND @ router_ED.float().T,
                                        replace(routing, top_k=E, renormalize=False, scale=1.0))
    y_flat = y_NED.reshape(N * E, -1)
    first_N = torch.arange(N) * E  # row of token n's expert 0 in y_flat
    acc_ND, mass_N = torch.zeros_like(target_ND), torch.zeros(N)
    errors, ks = {}, set(ks)
    for j in range(max(ks)):
        acc_ND += scores_NE[:, j, None] * y_flat.index_select(0, first_N + order_NE[:, j])
        mass_N += scores_NE[:, j]
        if j + 1 in ks:
            r = routing_at_k(routing, j + 1)
            w_N = r.scale / mass_N if r.renormalize else torch.full_like(mass_N, r.scale)
            errors[j + 1] = ((w_N[:, None] * acc_ND - target_ND).pow(2).sum() / denom).item()
    return errors


def uniform(errors, layers: int, top_k: int, num_experts: int) -> list[int]:
    return []  # every layer routes to top_k


def sensitivity(errors: list[dict[int, float]], layers: int, top_k: int, num_experts: int) -> list[int]:
    """Greedy: every layer starts at floor_k; each of the remaining layers * (top_k - floor) experts goes to
    the layer whose error drops most from one more expert (capped at num_experts). Sums to layers * top_k."""
    ks = [floor_k(top_k)] * layers
    for _ in range(layers * top_k - sum(ks)):
        gains = [errors[l][ks[l]] - errors[l][ks[l] + 1] if ks[l] < num_experts else -float("inf")
                 for l in range(layers)]
        best = max(range(layers), key=gains.__getitem__)
        ks[best] += 1
    return [] if len(set(ks)) == 1 else ks


sensitivity.data_aware = True
BUDGETS = {"uniform": uniform, "sensitivity": sensitivity}


def get_budget(name: str):
    if name not in BUDGETS:
        raise SurgeryError(f"--layer-budgets {name!r}: choose from {', '.join(BUDGETS)}")
    return BUDGETS[name]
