"""Grouping: which (token, k) pairs each expert serves, computed on the device without a host sync.

Shape legend: T tokens, E experts, K top-k, N = T*K (token, k) pairs, flat pair index n = t*K + k,
C chunks of BLOCK_N pairs.

The result is a stable counting sort of the pairs by expert (ties keep token order, so the result is
deterministic): chunk histograms, a prefix sum in torch (device-side, tiny), then each chunk places its
pairs at base + rank-within-chunk. No atomics, no .item(): the expert GEMMs read the counts from device
memory and size their grids by an upper bound instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Groups(NamedTuple):
    counts_E: torch.Tensor     # int32 [E]: pairs routed to each expert
    offsets_E1: torch.Tensor   # int32 [E+1]: expert e owns sorted rows offsets[e] : offsets[e+1]
    sorted_N: torch.Tensor     # int32 [N]: flat pair index n of each sorted row (expert-major, then token)


@triton.jit
def _onehot(ids_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + n, mask=n < N, other=-1).to(tl.int32)  # padding matches no expert
    e = tl.arange(0, BLOCK_E)
    return n, e, (ids[:, None] == e[None, :]).to(tl.int32)


@triton.jit
def _count_kernel(ids_ptr, chunk_counts_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    n, e, hot = _onehot(ids_ptr, N, E, BLOCK_N, BLOCK_E)
    tl.store(chunk_counts_ptr + tl.program_id(0) * E + e, tl.sum(hot, axis=0), mask=e < E)


@triton.jit
def _place_kernel(ids_ptr, chunk_base_ptr, sorted_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    n, e, hot = _onehot(ids_ptr, N, E, BLOCK_N, BLOCK_E)
    base = tl.load(chunk_base_ptr + tl.program_id(0) * E + e, mask=e < E, other=0)
    rank = tl.cumsum(hot, axis=0) - hot  # earlier pairs of the same expert within this chunk
    pos = tl.sum(hot * (rank + base[None, :]), axis=1)
    tl.store(sorted_ptr + pos, n.to(tl.int32), mask=n < N)


def group_by_expert(ids_TK: torch.Tensor, num_experts: int) -> Groups:
    E = num_experts
    flat = ids_TK.reshape(-1)
    N = flat.numel()
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_N = max(16, min(1024, 8192 // BLOCK_E))  # keep the [BLOCK_N, BLOCK_E] one-hot tile small
    C = max(1, triton.cdiv(N, BLOCK_N))
    chunk_counts_CE = torch.empty(C, E, dtype=torch.int32, device=flat.device)
    sorted_N = torch.empty(N, dtype=torch.int32, device=flat.device)
    if N == 0:
        chunk_counts_CE.zero_()
    else:
        _count_kernel[(C,)](flat, chunk_counts_CE, N, E, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E)
    counts_E = chunk_counts_CE.sum(0, dtype=torch.int32)
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int32, device=flat.device)
    offsets_E1[1:] = counts_E.cumsum(0)
    # Where chunk c starts writing expert e: the expert's offset plus what earlier chunks gave it.
    chunk_base_CE = (chunk_counts_CE.cumsum(0, dtype=torch.int32) - chunk_counts_CE + offsets_E1[:-1]).contiguous()
    if N:
        _place_kernel[(C,)](flat, chunk_base_CE, sorted_N, N, E, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E)
    return Groups(counts_E, offsets_E1, sorted_N)
