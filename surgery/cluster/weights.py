"""`weights`: balanced k-means on each neuron's gate and up rows (data-free; MoEfication's parameter
clustering). Shared experts take the neurons with the largest profiled importance when a profile is given,
else the largest weight norm ||gate_i|| * ||up_i|| * ||down_:,i||."""

from __future__ import annotations

import torch

from surgery.cluster import FFNWeights, register
from surgery.cluster.balanced import balanced_kmeans, split_shared


def weight_importance(ffn: FFNWeights) -> torch.Tensor:
    return ffn.gate.float().norm(dim=1) * ffn.up.float().norm(dim=1) * ffn.down.float().norm(dim=0)


@register("weights")
def weights_partition(ffn: FFNWeights, sizes: list[int], seed: int = 0, stats=None, shared: int = 0):
    score = stats.importance if stats is not None else weight_importance(ffn)
    groups, rest, routed = split_shared(score, sizes, shared)
    feats = torch.cat([ffn.gate[rest].float(), ffn.up[rest].float()], dim=1)
    return groups + [rest[g] for g in balanced_kmeans(feats, routed, seed=seed)]
