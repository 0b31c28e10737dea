"""Balanced k-means: cluster rows into groups of exactly the requested sizes, and the shared-neuron pick
that the data-aware methods share.

Assignment is greedy over all (row, cluster) pairs in order of distance: a row joins the nearest cluster
that still has room. Centroids are then recomputed as the mean of their rows; repeat until the assignment
stops changing. With sizes fixed, every method returns equal-sized experts by construction.
"""

from __future__ import annotations

import torch


def _balanced_assign(dist_NK: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    N, K = dist_NK.shape
    order = torch.argsort(dist_NK.reshape(-1), stable=True)
    rows, cols = (order // K).tolist(), (order % K).tolist()
    room = list(sizes)
    assign = [-1] * N
    left = N
    for r, c in zip(rows, cols):
        if assign[r] < 0 and room[c] > 0:
            assign[r] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assign, dtype=torch.long)


def balanced_kmeans(x_ND: torch.Tensor, sizes: list[int], seed: int = 0, iters: int = 30,
                    cosine: bool = True) -> list[torch.Tensor]:
    """Partition the N rows of x into len(sizes) groups with len(group i) == sizes[i]. Returns sorted index
    tensors. Deterministic for a given seed (k-means++ initialisation)."""
    N, K = x_ND.shape[0], len(sizes)
    assert sum(sizes) == N, (sizes, N)
    x = x_ND.float()
    if cosine:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding
    centers = [x[torch.randint(0, N, (1,), generator=g)].squeeze(0)]
    d2 = torch.cdist(x, centers[0][None]).squeeze(1).pow(2)
    for _ in range(1, K):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / N)
        c = x[torch.multinomial(p, 1, generator=g)].squeeze(0)
        centers.append(c)
        d2 = torch.minimum(d2, (x - c).pow(2).sum(1))
    C = torch.stack(centers)
    assign = None
    for _ in range(iters):
        new = _balanced_assign(torch.cdist(x, C), sizes)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        C = torch.stack([x[assign == k].mean(0) for k in range(K)])
        if cosine:
            C = C / C.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return [torch.nonzero(assign == k).flatten() for k in range(K)]


def split_shared(score_F: torch.Tensor, sizes: list[int], shared: int):
    """The `shared` first groups take the highest-scoring neurons (CMoE's always-on experts: the most
    frequently / strongly active). Returns (shared groups, remaining neuron ids, routed sizes)."""
    n_shared = sum(sizes[:shared])
    order = torch.argsort(score_F.float(), descending=True, stable=True)
    top, rest = order[:n_shared], torch.sort(order[n_shared:]).values
    groups, start = [], 0
    for s in sizes[:shared]:
        groups.append(torch.sort(top[start:start + s]).values)
        start += s
    return groups, rest, list(sizes[shared:])
