"""Which experts a domain uses: per layer and routed expert, the fraction of tokens routed to it, its mean
routing weight and mean output norm when routed, and its mean contribution (weight x output norm, averaged
over all tokens); per domain the routing entropy, and between domains the overlap of the expert sets.

Shape legend: T tokens, D hidden, E routed experts, F expert width, K top-k, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from surgery.errors import SurgeryError
from surgery.moe import MoEBlock, moe_blocks


def expert_outputs(block: MoEBlock, x_TD: torch.Tensor) -> torch.Tensor:
    """Every routed expert's own output on every token, unweighted: [T, E, D] (float32)."""
    e = block.experts
    g, u, d = e.gate_proj.float(), e.up_proj.float(), e.down_proj.float()
    x = x_TD.float()
    h_TEF = torch.nn.functional.silu(torch.einsum("td,efd->tef", x, g)) * torch.einsum("td,efd->tef", x, u)
    return torch.einsum("tef,edf->ted", h_TEF, d)


def route(block: MoEBlock, x_TD: torch.Tensor, keep_E: torch.Tensor | None = None):
    """The block's routing on x (weights [T, K], ids [T, K]); with a boolean `keep_E`, routing restricted to
    the kept experts (what the block does once the others are pruned)."""
    from surgery.router import route_weights

    logits = block.router_logits(x_TD)
    if keep_E is not None:
        logits = logits.masked_fill(~keep_E, float("-inf"))
    return route_weights(logits, block.routing)


@dataclass
class _LayerAcc:
    count: torch.Tensor  # [E] tokens routed to each expert
    weight: torch.Tensor  # [E] sum of routing weights when routed
    norm: torch.Tensor  # [E] sum of output norms when routed
    contribution: torch.Tensor  # [E] sum of weight * output norm when routed
    router_entropy: float = 0.0  # sum over tokens of the router softmax's entropy
    tokens: int = 0


class _Collector:
    """Forward pre-hooks on every MoE block that accumulate routing statistics of what passes through."""

    def __init__(self, model):
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise SurgeryError("the model has no MoE blocks: expert statistics need a converted model "
                               "(run `surgery convert` first)")
        E = self.blocks[0].num_experts
        self.acc = [_LayerAcc(*(torch.zeros(E, dtype=torch.float64) for _ in range(4))) for _ in self.blocks]
        self.handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(self.blocks)]

    def _hook(self, i):
        def hook(block, args):
            from surgery.router import route_weights

            x_TD = args[0].reshape(-1, block.hidden)
            logits_TE = block.router_logits(x_TD)  # once: for the routing and for the router's entropy
            w_TK, ids_TK = route_weights(logits_TE, block.routing)
            norms_TE = expert_outputs(block, x_TD).norm(dim=-1)
            n_TK = norms_TE.gather(1, ids_TK)
            a = self.acc[i]
            E = block.num_experts
            flat = ids_TK.reshape(-1)
            a.count += torch.bincount(flat, minlength=E).double()
            a.weight += torch.zeros(E, dtype=torch.float64).index_add_(0, flat, w_TK.reshape(-1).double())
            a.norm += torch.zeros(E, dtype=torch.float64).index_add_(0, flat, n_TK.reshape(-1).double())
            a.contribution += torch.zeros(E, dtype=torch.float64).index_add_(
                0, flat, (w_TK * n_TK).reshape(-1).double())
            logp = torch.log_softmax(logits_TE, -1)
            a.router_entropy += float(-(logp.exp() * logp).sum(-1).sum())
            a.tokens += x_TD.shape[0]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


@torch.no_grad()
def domain_stats(model, ids: torch.Tensor, ctx: int = 512, progress: bool = True, desc: str = "stats") -> dict:
    """Routing statistics of one domain's token ids (1-D), run in windows of `ctx`."""
    if ids.numel() < 2:
        raise SurgeryError("the domain has fewer than 2 tokens")
    col = _Collector(model)
    device = next(model.parameters()).device
    try:
        windows = [ids[i:i + ctx] for i in range(0, ids.numel(), ctx)]
        for w in tqdm(windows, desc=desc, unit="win", disable=not progress):
            model(input_ids=w[None].to(device), use_cache=False)
    finally:
        col.close()
    K, E = col.blocks[0].routing.top_k, col.blocks[0].num_experts
    layers = []
    for a in col.acc:
        n = a.tokens
        routed = a.count.clamp_min(1)
        usage = a.count / a.count.sum()
        layers.append({
            "fraction": (a.count / n).tolist(),  # sums to K over the experts of a layer
            "mean_weight": (a.weight / routed).tolist(),
            "mean_norm": (a.norm / routed).tolist(),
            "contribution": (a.contribution / n).tolist(),
            "usage_entropy": _entropy(usage) / math.log(E),  # 1 = every expert used equally often
            "router_entropy": a.router_entropy / n / math.log(E),
        })
    return {"tokens": int(ids.numel()), "top_k": K, "num_experts": E, "layers": layers}


def overlap(a: dict, b: dict) -> dict:
    """How much two domains share experts, per layer: the Jaccard index of their K most used experts and the
    histogram intersection sum_e min(p_a(e), p_b(e)) of their usage distributions (1 = identical)."""
    K = a["top_k"]
    jac, inter = [], []
    for la, lb in zip(a["layers"], b["layers"]):
        fa, fb = torch.tensor(la["fraction"]), torch.tensor(lb["fraction"])
        sa, sb = set(fa.topk(K).indices.tolist()), set(fb.topk(K).indices.tolist())
        jac.append(len(sa & sb) / len(sa | sb))
        inter.append(float(torch.minimum(fa / fa.sum(), fb / fb.sum()).sum()))
    return {"jaccard_top_k": jac, "histogram_intersection": inter,
            "mean_jaccard_top_k": sum(jac) / len(jac), "mean_histogram_intersection": sum(inter) / len(inter)}


def summarize(stats: dict) -> dict:
    """Mean entropies of a domain over layers (what a table shows)."""
    L = stats["layers"]
    return {"tokens": stats["tokens"],
            "mean_usage_entropy": sum(l["usage_entropy"] for l in L) / len(L),
            "mean_router_entropy": sum(l["router_entropy"] for l in L) / len(L)}


def collect(model, tokenizer, domains: dict, tokens: int, ctx: int = 512, progress: bool = True) -> dict:
    """Statistics for each named domain (name -> data file), their pairwise overlaps and summaries."""
    from surgery.data import tokenize_file

    out = {"domains": {}, "overlap": {}}
    for name, path in domains.items():
        ids = tokenize_file(tokenizer, path, tokens)
        if ids.numel() < 2:
            raise SurgeryError(f"{path}: fewer than 2 tokens (--data {name})")
        s = domain_stats(model, ids, ctx, progress, desc=f"stats {name}")
        s["data"] = str(path)
        s["summary"] = summarize(s)
        out["domains"][name] = s
    names = list(out["domains"])
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out["overlap"][f"{a}|{b}"] = overlap(out["domains"][a], out["domains"][b])
    return out


def plot(stats: dict, path) -> None:
    """One heatmap per domain (layers x experts, fraction of tokens routed), and for two or more domains the
    difference of the first two."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(stats["domains"])
    maps = [np.array([l["fraction"] for l in stats["domains"][n]["layers"]]) for n in names]
    panels = [(f"{n}: fraction of tokens routed", m, "viridis", None) for n, m in zip(names, maps)]
    if len(maps) >= 2:
        d = maps[0] - maps[1]
        lim = float(np.abs(d).max()) or 1.0
        panels.append((f"{names[0]} minus {names[1]}", d, "coolwarm", (-lim, lim)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, m, cmap, lim) in zip(axes[0], panels):
        im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
