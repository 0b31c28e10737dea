"""Factorize: a partition of FFN neurons -> stacked expert tensors (a permutation, so nothing is lost).

Expert e takes rows of gate/up and columns of down for the neurons in its group. Groups smaller than the
widest are padded with zero neurons, which contribute exactly zero.
"""

from __future__ import annotations

import torch

from surgery.cluster import FFNWeights


def split_ffn(ffn: FFNWeights, groups: list[torch.Tensor], shared: int, width: int) -> dict[str, torch.Tensor]:
    """groups[:shared] form the shared expert (concatenated); groups[shared:] become routed experts of width
    `width` (padded). Returns gate/up [E, F, D], down [E, D, F], and shared_* when shared > 0."""
    routed = groups[shared:]
    E, D = len(routed), ffn.gate.shape[1]
    gate = ffn.gate.new_zeros(E, width, D)
    up = ffn.up.new_zeros(E, width, D)
    down = ffn.down.new_zeros(E, D, width)
    for e, idx in enumerate(routed):
        n = len(idx)
        gate[e, :n] = ffn.gate[idx]
        up[e, :n] = ffn.up[idx]
        down[e, :, :n] = ffn.down[:, idx]
    out = {"gate": gate, "up": up, "down": down}
    if shared:
        idx = torch.cat(groups[:shared])
        out.update(shared_gate=ffn.gate[idx].clone(), shared_up=ffn.up[idx].clone(), shared_down=ffn.down[:, idx].clone())
    return out


def permutation(groups: list[torch.Tensor]) -> list[int]:
    return torch.cat(groups).tolist()


def merge_experts(gate, up, down, expert_sizes, shared=None, perm=None) -> FFNWeights:
    """Inverse of split_ffn: rebuild the dense FFN (in original neuron order when `perm` is given)."""
    g = [gate[e, :n] for e, n in enumerate(expert_sizes)]
    u = [up[e, :n] for e, n in enumerate(expert_sizes)]
    d = [down[e, :, :n] for e, n in enumerate(expert_sizes)]
    if shared is not None:
        g.insert(0, shared[0]); u.insert(0, shared[1]); d.insert(0, shared[2])
    G, U, Dn = torch.cat(g), torch.cat(u), torch.cat(d, dim=1)
    if perm is not None:
        inv = torch.empty(len(perm), dtype=torch.long)
        inv[torch.as_tensor(perm)] = torch.arange(len(perm))
        G, U, Dn = G[inv], U[inv], Dn[:, inv]
    return FFNWeights(G, U, Dn)
