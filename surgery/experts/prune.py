"""Prune a converted model to the routed experts a domain uses: a lean specialist.

Per layer, the routed experts are scored on the domain and the best `keep` kept (the same number in every
layer, so the experts stay stacked); the experts and router rows are sliced, shared experts stay. Routing
over the kept experts is then exactly the old routing with the pruned experts' logits at -inf (softmax,
top-k and renormalisation are unchanged by removing experts that were not chosen).

Criteria:
  frequency       fraction of the domain's tokens routed to the expert
  weighted-norm   mean over tokens of routing weight x output norm when routed (how much it contributes)
  reconstruction  the subset whose routed output (re-routed among the kept) is closest to the unpruned
                  block's output on the domain: exact search when C(E, keep) is small, else greedy backward
                  elimination (each round drops the quarter of the experts still to go whose single
                  removal hurts least)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from surgery.errors import SurgeryError
from surgery.experts.stats import domain_stats, expert_outputs, route
from surgery.moe import MoEBlock, moe_blocks

CRITERIA = ("frequency", "weighted-norm", "reconstruction")
EXACT_SEARCH_LIMIT = 5000  # subsets evaluated per layer before falling back to greedy elimination


@dataclass
class PruneConfig:
    keep: int  # routed experts kept per layer
    criterion: str = "weighted-norm"
    tokens: int = 16384  # domain tokens for the statistics
    recon_tokens: int = 1024  # tokens per layer for the reconstruction criterion
    top_k: int | None = None  # a new top-k (must be <= keep); default: unchanged
    ctx: int = 512


def keep_count(num_experts: int, top_k: int, keep_experts: int | None, keep_fraction: float | None,
               new_top_k: int | None = None) -> int:
    """Resolve --keep-experts / --keep-fraction into a count, with one-line errors naming the flag."""
    if (keep_experts is None) == (keep_fraction is None):
        raise SurgeryError("give exactly one of --keep-experts and --keep-fraction")
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise SurgeryError(f"--keep-fraction {keep_fraction}: must be in (0, 1]")
        keep = max(1, round(keep_fraction * num_experts))
        flag = f"--keep-fraction {keep_fraction} ({keep} experts)"
    else:
        keep, flag = keep_experts, f"--keep-experts {keep_experts}"
        if keep < 1 or keep > num_experts:
            raise SurgeryError(f"{flag}: must be between 1 and the model's {num_experts} routed experts")
    k = new_top_k or top_k
    if new_top_k is not None and new_top_k < 1:
        raise SurgeryError(f"--top-k {new_top_k}: must be at least 1")
    if keep < k:
        raise SurgeryError(f"{flag}: fewer than top-k = {k}; keep at least {k} experts or lower --top-k")
    return keep


def _capture_inputs(model, ids: torch.Tensor, ctx: int, tokens_per_layer: int, seed: int = 0) -> list[torch.Tensor]:
    """A random sample of `tokens_per_layer` inputs of every MoE block on the domain: [N, D] per layer."""
    blocks = moe_blocks(model)
    seen = [[] for _ in blocks]
    handles = [b.register_forward_pre_hook(lambda blk, args, i=i: seen[i].append(args[0].reshape(-1, blk.hidden).float()))
               for i, b in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, ids.numel(), ctx):
                model(input_ids=ids[i:i + ctx][None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    out = []
    for xs in seen:
        x = torch.cat(xs)
        if x.shape[0] > tokens_per_layer:
            x = x[torch.randperm(x.shape[0], generator=g)[:tokens_per_layer]]
        out.append(x)
    return out


@torch.no_grad()
def _routed_error(block: MoEBlock, y_TED: torch.Tensor, x_TD: torch.Tensor, target_TD: torch.Tensor,
                  keep_E: torch.Tensor) -> float:
    """Relative squared error (pooled plus mean per token, as losses.block_error) of the routed output with
    routing restricted to `keep_E`, against the unpruned routed output."""
    w, ids = route(block, x_TD, keep_E)
    y = (y_TED.gather(1, ids[..., None].expand(-1, -1, y_TED.shape[-1])) * w[..., None]).sum(1)
    err = (y - target_TD).pow(2).sum(-1)
    ref = target_TD.pow(2).sum(-1)
    return float(err.sum() / ref.sum().clamp_min(1e-12) + (err / ref.clamp_min(1e-12)).mean())


@torch.no_grad()
def reconstruction_keep(block: MoEBlock, x_TD: torch.Tensor, keep: int) -> list[int]:
    """The kept experts minimising the routed output's error to the unpruned block's on x."""
    import itertools

    E = block.num_experts
    y_TED = expert_outputs(block, x_TD)
    w, ids = route(block, x_TD)
    target = (y_TED.gather(1, ids[..., None].expand(-1, -1, y_TED.shape[-1])) * w[..., None]).sum(1)
    if math.comb(E, keep) <= EXACT_SEARCH_LIMIT:
        best, best_err = None, float("inf")
        for subset in itertools.combinations(range(E), keep):
            m = torch.zeros(E, dtype=torch.bool)
            m[list(subset)] = True
            err = _routed_error(block, y_TED, x_TD, target, m)
            if err < best_err:
                best, best_err = list(subset), err
        return best
    alive = torch.ones(E, dtype=torch.bool)
    while (left := int(alive.sum()) - keep) > 0:
        errs = {}
        for e in alive.nonzero().flatten().tolist():
            m = alive.clone()
            m[e] = False
            errs[e] = _routed_error(block, y_TED, x_TD, target, m)
        # Drop the quarter of what is still to go whose single removal hurts least (one at a time is ~2.5x
        # the evaluations for E = 48, keep = 24: 70 s a layer on one core at 2,048 tokens).
        for e in sorted(errs, key=errs.get)[:max(1, math.ceil(left / 4))]:
            alive[e] = False
    return alive.nonzero().flatten().tolist()


def choose_experts(model, ids: torch.Tensor, cfg: PruneConfig, progress: bool = True) -> tuple[list[list[int]], dict]:
    """Per layer, the sorted routed experts to keep, and the domain statistics they came from."""
    if cfg.criterion not in CRITERIA:
        raise SurgeryError(f"--criterion {cfg.criterion!r}: choose one of {', '.join(CRITERIA)}")
    stats = domain_stats(model, ids, cfg.ctx, progress, desc="domain statistics")
    blocks = moe_blocks(model)
    if cfg.criterion == "reconstruction":
        xs = _capture_inputs(model, ids, cfg.ctx, cfg.recon_tokens)
        kept = [sorted(reconstruction_keep(b, x, cfg.keep))
                for b, x in tqdm(list(zip(blocks, xs)), desc="reconstruction search", unit="layer", disable=not progress)]
    else:
        key = "fraction" if cfg.criterion == "frequency" else "contribution"
        kept = [sorted(torch.tensor(l[key]).topk(cfg.keep).indices.tolist()) for l in stats["layers"]]
    return kept, stats


def slice_block(block: MoEBlock, keep: list[int], top_k: int | None = None) -> None:
    """Keep only the listed routed experts (and their router rows) in place; shared experts and extension
    pools are untouched."""
    from dataclasses import replace

    idx = torch.tensor(keep, dtype=torch.long)
    e = block.experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(e, name, torch.nn.Parameter(getattr(e, name).data[idx].clone(), requires_grad=False))
    block.router.weight = torch.nn.Parameter(block.router.weight.data[idx].clone(), requires_grad=False)
    block.router.out_features = len(keep)
    block.num_experts = len(keep)
    if top_k is not None:
        block.routing = replace(block.routing, top_k=top_k,
                                scale=top_k if block.routing.scale == block.routing.top_k else block.routing.scale)


def prune_model(model, kept: list[list[int]], top_k: int | None = None, record: dict | None = None) -> None:
    """Slice every block to its kept experts and update the model's `surgery` config to match."""
    from dataclasses import replace

    moe = model.surgery_config
    blocks = moe_blocks(model)
    if len(kept) != len(blocks) or len({len(k) for k in kept}) != 1:
        raise SurgeryError("prune: need the same number of kept experts for every layer")
    # Per-layer budgets (--layer-budgets) survive a prune that keeps the top-k; a new --top-k is uniform.
    layer_top_k = moe.layer_top_k if top_k is None else []
    if max(layer_top_k, default=0) > len(kept[0]):
        raise SurgeryError(f"prune: a layer routes to {max(layer_top_k)} experts, more than the {len(kept[0])} "
                           f"kept; keep more experts or give --top-k")
    for b, k in zip(blocks, kept):
        slice_block(b, k, top_k)
    keep = len(kept[0])
    # The experts' sizes must be the same in every layer for the stacked tensors; a layer's real sizes are
    # those of its kept experts (they agree across layers when the recipe cut equal groups, as ours do).
    sizes = [[moe.expert_sizes[e] for e in k] for k in kept]
    new_sizes = [max(col) for col in zip(*sizes)]
    perms = []
    for layer, k in enumerate(kept):
        if not moe.permutations or not moe.permutations[layer]:
            perms.append([])
            continue
        perm = moe.permutations[layer]
        starts = [moe.shared_width]
        for n in moe.expert_sizes:
            starts.append(starts[-1] + n)
        perms.append(perm[:moe.shared_width] + [i for e in k for i in perm[starts[e]:starts[e + 1]]])
    routing = blocks[0].routing if not layer_top_k else moe.routing
    model.surgery_config = replace(moe, num_experts=keep, expert_sizes=new_sizes, permutations=perms,
                                   routing=routing, layer_top_k=layer_top_k,
                                   modules=moe.modules + ([record] if record else []))
