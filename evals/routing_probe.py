"""Diagnostic: routing variants tried at inference on a converted model, nothing retrained (issue 10, items 3 and 4).

  topk    the block's own routing (softmax, top-k, renormalised, times k), recomputed here: the control
  cmean   top-k plus, for every routed expert NOT chosen for a token, that expert's mean output over the
          calibration tokens where it was not chosen (the conditional-mean compensation: a per-expert bias
          vector, summed over the unchosen experts)
  dyn     dynamic k: the experts whose softmax probability reaches a per-layer threshold tau, at least 1 and
          at most --kmax, weights renormalised over them times their count (as top-k's are); tau is set on
          the calibration tokens so that the mean k there equals the block's top-k

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

from surgery.calibrate import _expert_outputs
from surgery.moe import MoEBlock, moe_blocks

MODES = ("topk", "cmean", "dyn")


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
        p = torch.softmax(block.router_logits(x_TD), -1)
        Y = _expert_outputs(block, x_TD)  # [T, E, D], every routed expert on every token
        st = self.stats.setdefault(id(block), {"p": [], "ysum": 0.0, "cnt": 0.0, "ks": []})
        if self.mode == "dyn":
            sel = selection(p, K, st["tau"], self.kmax)
            st["ks"].append(sel.sum(1))
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

    def finish_collect(self, blocks: list[MoEBlock]) -> None:
        for b in blocks:
            st = self.stats[id(b)]
            st["mu"] = st["ysum"] / st["cnt"].clamp(min=1)[:, None]
            st["tau"] = threshold_for_mean_k(torch.cat(st["p"]), b.routing.top_k, self.kmax)
            st["p"] = []

    def take_ks(self, blocks: list[MoEBlock]) -> torch.Tensor:
        ks = torch.cat([k for b in blocks for k in self.stats[id(b)]["ks"]])
        for b in blocks:
            self.stats[id(b)]["ks"] = []
        return ks


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
    ap.add_argument("--kmax", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load(args.model), load_tokenizer(args.model)
    model.eval()
    out = {"model": args.model, "tokens": args.tokens, "calib_tokens": args.calib_tokens, "kmax": args.kmax,
           "results": {}, "machine": machine()}
    with probing(model, args.kmax) as (probe, blocks):
        collect(model, probe, blocks, tokenize_file(tok, resolve_data("wikitext-valid"), args.calib_tokens))
        for ds in ("wikitext-test", "stdlib"):
            for mode in MODES:
                probe.mode = mode
                r = perplexity(model, tok, resolve_data(ds), max_tokens=args.tokens, ctx=1024, progress=False)
                row = {"perplexity": round(r["perplexity"], 3)}
                if mode == "dyn":
                    ks = probe.take_ks(blocks)
                    row.update(mean_k=round(ks.mean().item(), 3), max_k=int(ks.max()))
                out["results"].setdefault(ds, {})[mode] = row
                print(ds, mode, row, flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
