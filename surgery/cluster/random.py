"""`random`: a seeded random partition. The baseline every other method must beat."""

from __future__ import annotations

import torch

from surgery.cluster import FFNWeights, register


@register("random")
def random_partition(ffn: FFNWeights, sizes: list[int], seed: int = 0, stats=None, shared: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(ffn.width, generator=g)
    return list(torch.split(perm, sizes))
