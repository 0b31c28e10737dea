"""Diagnostic: routing variants tried at inference on a converted model, nothing retrained (issue 10, items 3 and 4).

  topk    the block's own routing (softmax, top-k, renormalised, times k), recomputed here: the control
  cmean   top-k plus, for every routed expert NOT chosen for a token, that expert's mean output over the
          calibration tokens where it was not chosen (the conditional-mean compensation: a per-expert bias
          vector, summed over the unchosen experts)
  dyn     dynamic k: the experts whose softmax probability reaches a per-layer threshold tau, at least 1 and
          at most --kmax, weights renormalised over them times their count (as top-k's are); tau is set on
          the calibration tokens so that the mean k there equals the block's top-k
  oracle  the k routed experts with the largest output norm on this token (a router that knows each expert's
          contribution, item 2's ceiling at this granularity), weighted by the router's probabilities
          renormalised over them as top-k's are: how much a better router could still give
  refit   the block's own routing with its router's weights refitted, experts frozen, to choose what the oracle
          chooses (cross-entropy of the router's softmax to the oracle's top-k, Adam from the current weights,
          --refit-tokens of WikiText-2 valid): the part of the oracle's gain a linear router can learn. Only
          router weights change, so it would export exactly

Statistics (conditional means, thresholds) come from --calib-tokens of WikiText-2 *validation*; perplexity is
measured on the evaluation sets as everywhere else. Every expert is computed for every token (a reference, not a
fast path). Export: a bias per unchosen expert has no place in Mixtral / Qwen2-MoE / llama.cpp's MoE layouts,
and neither has a per-token k; both would be native-only.

    python -m surgery_evals.routing_probe runs/smollm2-50pct/model --json results/quality/routing-probe-50.json
"""

from __future__ import annotations

import argparse
import json
import types
from contextlib import contextmanager

import torch

from surgery import losses
from surgery.calibrate import _expert_outputs
from surgery.moe import MoEBlock, moe_blocks

MODES = ("topk", "cmean", "dyn", "oracle", "refit")


def selection(p_TE: torch.Tensor, k: int, tau: float | None = None, kmax: int | None = None) -> torch.Tensor:
    """[T, E] 0/1: the top-k experts, or (tau given) those with p >= tau among the top-kmax, at least the top-1."""
    if tau is None:
        return torch.zeros_like(p_TE).scatter(1, p_TE.topk(k, -1).indices, 1.0)
    top = p_TE.topk(kmax, -1)
    keep = top.values >= tau
    keep[:, 0] = True
    return torch.zeros_like(p_TE).scatter(1, top.indices, keep.to(p_TE.dtype))


def threshold_for_mean_k(p_NE: torch.Tensor, k: int, kmax: int, iters: int = 40) -> float:
    """The tau for which the mean of clamp(#{p >= tau}, 1, kmax) over the rows equals k (bisection; the mean
    is non-increasing in tau)."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (p_NE >= mid).sum(1).clamp(1, kmax).float().mean() > k:
            lo = mid
        else:
            hi = mid
    return hi


class Probe:
    """Per-block state: the mode, the calibration statistics, the k's used (dyn)."""

    def __init__(self, kmax: int):
        self.mode, self.kmax = "topk", kmax
        self.stats: dict[int, dict] = {}

    def block_forward(self, block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x_TD = x.reshape(-1, block.hidden).float()
        K = block.routing.top_k
        st = self.stats.setdefault(id(block), {"p": [], "ysum": 0.0, "cnt": 0.0, "ks": [], "agree": [], "x": [],
                                               "norm": []})
        if self.mode == "refit":
            p = torch.softmax(x_TD @ st["W_refit"].T, -1)
        else:
            p = torch.softmax(block.router_logits(x_TD), -1)
        Y = _expert_outputs(block, x_TD)  # [T, E, D], every routed expert on every token
        if self.mode == "gather":  # inputs and expert output norms for the refit
            st["x"].append(x_TD)
            st["norm"].append(Y.norm(dim=-1))
        if self.mode == "dyn":
            sel = selection(p, K, st["tau"], min(self.kmax, p.shape[1]))  # a block may have fewer than kmax experts
            st["ks"].append(sel.sum(1))
        elif self.mode == "oracle":
            sel = selection(Y.norm(dim=-1), K)
            st["agree"].append((sel * selection(p, K)).sum(1) / K)
        else:
            sel = selection(p, K)
        # the block's weights (renormalised over the chosen, times its scale); with dynamic k, times k / top-k,
        # so that each chosen expert keeps the weight it has on average at top-k
        w = p * sel
        w = w / w.sum(1, keepdim=True) * block.routing.scale * sel.sum(1, keepdim=True) / K
        y = (w[:, :, None] * Y).sum(1)
        if block.shared_expert is not None:
            y = y + block.shared_expert(x_TD)
        if self.mode == "collect":
            st["p"].append(p)
            st["ysum"] = st["ysum"] + ((1 - sel)[:, :, None] * Y).sum(0)
            st["cnt"] = st["cnt"] + (1 - sel).sum(0)
        elif self.mode == "cmean":
            y = y + (1 - sel) @ st["mu"]
        return y.reshape(shape).to(dtype)

    def fit_routers(self, blocks: list[MoEBlock], steps: int, lr: float = 1e-3) -> list[dict]:
        """Each block's router weights refitted to the gathered oracle choices (see `refit`); per block the share
        of the oracle's experts chosen before and after, on the fitting tokens."""
        out = []
        for b in blocks:
            st = self.stats[id(b)]
            x, K = torch.cat(st["x"]), b.routing.top_k
            target = losses.topk_prior(torch.cat(st["norm"]), K)
            st["x"], st["norm"] = [], []
            W = b.router.weight.detach().float().clone().requires_grad_()
            opt = torch.optim.Adam([W], lr=lr)
            with torch.enable_grad():
                for _ in range(steps):
                    loss = losses.prior_approx(x @ W.T, target)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            st["W_refit"] = W.detach()
            agree = [round(((selection(x @ w.T, K) * target).sum(1)).mean().item(), 4)
                     for w in (b.router.weight.detach().float(), st["W_refit"])]
            out.append({"agree_before": agree[0], "agree_after": agree[1]})
        return out

    def finish_collect(self, blocks: list[MoEBlock]) -> None:
        for b in blocks:
            st = self.stats[id(b)]
            st["mu"] = st["ysum"] / st["cnt"].clamp(min=1)[:, None]
            p = torch.cat(st["p"])
            st["tau"] = threshold_for_mean_k(p, b.routing.top_k, min(self.kmax, p.shape[1]))
            st["p"] = []

    def take(self, blocks: list[MoEBlock], key: str = "ks") -> torch.Tensor:
        """What `key` gathered over every block since the last take ("ks": dyn's k per token; "agree": the
        share of the oracle's experts that the router chose too), emptied."""
        sts = [self.stats[id(b)] for b in blocks if id(b) in self.stats]  # blocks that ran
        out = torch.cat([v for st in sts for v in st[key]])
        for st in sts:
            st[key] = []
        return out


@contextmanager
def probing(model, kmax: int = 4):
    """Every MoE block of `model` routes through a Probe while inside; restored on exit."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("no MoE blocks: the routing probe needs a converted model")
    for i, b in enumerate(blocks):
        r = b.routing
        if r.score_func != "softmax" or not r.renormalize or len(b.extensions):
            raise ValueError(f"MoE block {i}: the probe handles softmax routing renormalised over the chosen experts "
                             f"and no extension pools (this block: {r.score_func}, renormalize={r.renormalize}, "
                             f"{len(b.extensions)} pools)")
    probe = Probe(kmax)
    for b in blocks:
        b.forward = types.MethodType(lambda self, x: probe.block_forward(self, x), b)
    try:
        yield probe, blocks
    finally:
        for b in blocks:
            del b.forward


@torch.no_grad()
def collect(model, probe: Probe, blocks, ids: torch.Tensor, chunk: int = 512) -> None:
    probe.mode = "collect"
    for i in range(0, ids.numel(), chunk):
        model(input_ids=ids[None, i:i + chunk], use_cache=False)
    probe.finish_collect(blocks)


@torch.no_grad()
def refit(model, probe: Probe, blocks, ids: torch.Tensor, steps: int, chunk: int = 512) -> list[dict]:
    probe.mode = "gather"
    for i in range(0, ids.numel(), chunk):
        model(input_ids=ids[None, i:i + chunk], use_cache=False)
    return probe.fit_routers(blocks, steps)


def main(argv=None) -> dict:
    from surgery import load
    from surgery.data import resolve_data, tokenize_file
    from surgery.modeling import load_tokenizer
    from surgery_evals.perplexity import perplexity
    from surgery_evals.report import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--json", required=True)
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens per set (ctx 1024)")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="WikiText-2 valid tokens for the statistics")
    ap.add_argument("--kmax", type=int, default=4, help="dyn: the most experts a token may take (at most E)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--refit-tokens", type=int, default=16384, help="refit: WikiText-2 valid tokens to fit on")
    ap.add_argument("--refit-steps", type=int, default=300, help="refit: full-batch Adam steps per router")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown {bad or 'empty'}; choose from {', '.join(MODES)}")
    model, tok = load(args.model), load_tokenizer(args.model)
    model.eval()
    out = {"model": args.model, "tokens": args.tokens, "calib_tokens": args.calib_tokens, "kmax": args.kmax,
           "results": {}, "machine": machine()}
    with probing(model, args.kmax) as (probe, blocks):
        collect(model, probe, blocks, tokenize_file(tok, resolve_data("wikitext-valid"), args.calib_tokens))
        if "refit" in modes:
            out["refit"] = {"tokens": args.refit_tokens, "steps": args.refit_steps, "layers": refit(
                model, probe, blocks, tokenize_file(tok, resolve_data("wikitext-valid"), args.refit_tokens),
                args.refit_steps)}
        for ds in ("wikitext-test", "stdlib"):
            for mode in modes:
                probe.mode = mode
                r = perplexity(model, tok, resolve_data(ds), max_tokens=args.tokens, ctx=1024, progress=False)
                row = {"perplexity": round(r["perplexity"], 3)}
                if mode == "dyn":
                    ks = probe.take(blocks)
                    row.update(mean_k=round(ks.mean().item(), 3), max_k=int(ks.max()))
                if mode == "oracle":
                    row["router_agreement"] = round(probe.take(blocks, "agree").mean().item(), 4)
                out["results"].setdefault(ds, {})[mode] = row
                print(ds, mode, row, flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
