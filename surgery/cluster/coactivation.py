"""`coactivation`: neurons that fire on the same tokens go to the same expert (MoEfication, LLaMA-MoE).

Each neuron is described by its activation magnitudes |h_i| over the profiled tokens (recomputed from the
sampled FFN inputs), scaled per neuron; balanced k-means on those patterns (cosine distance) groups
co-activated neurons. Shared experts take the neurons with the largest mean squared contribution to the FFN
output (CMoE's always-on neurons). Needs a profile (`surgery profile`, or the profile step of a recipe)."""

from __future__ import annotations


from surgery.cluster import FFNWeights, register
from surgery.cluster.balanced import balanced_kmeans, split_shared
from surgery.errors import SurgeryError

MAX_TOKENS = 4096  # patterns longer than this add cost, not clusters


@register("coactivation")
def coactivation_partition(ffn: FFNWeights, sizes: list[int], seed: int = 0, stats=None, shared: int = 0):
    if stats is None:
        raise SurgeryError("--method coactivation needs profiling statistics (give --profile PATH)")
    groups, rest, routed = split_shared(stats.importance, sizes, shared)
    h_NF = stats.activations(ffn.gate, ffn.up, limit=MAX_TOKENS)
    # |h| weighted by the neuron's output norm: what the token gets from the neuron, not its raw firing.
    patterns = (h_NF.abs() * ffn.down.float().norm(dim=0)).T[rest]  # [F_rest, N]
    return groups + [rest[g] for g in balanced_kmeans(patterns, routed, seed=seed)]
