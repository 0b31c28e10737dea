"""Per-layer budgets from the end-to-end KL: how much each layer's top-k moves the model's output distribution.

The budget rule in surgery/budgets.py (`--layer-budgets sensitivity`) scores a layer by its own block error,
which cannot see how that error compounds through the layers above it: round 3 found it starving the first and
last layers and losing. This measures what matters instead: at the converted model's operating point (every
layer at the mean top-k), the KL from the dense teacher's next-token distribution when ONE layer moves to k,
for each layer and each candidate k, on calibration text (WikiText-2 valid, never the test set). A greedy
allocation then spends the same total of experts where one more expert lowers that KL most, assuming the
layers' effects add (a first-order picture, checked by the KL of the allocation itself, measured at the end).

    python -m surgery_evals.layer_kl '{"experts": 10, "shared_experts": 6, "top_k": 2, "method": "coactivation",
        "router_init": "fitted"}' --tokens 2048 --json results/quality/layer-kl-e10s6k2.json

The conversion comes from runs/ablation-cache (surgery_evals.quick_ablation's); the JSON holds every layer's
KL curve, the allocation and the KL of uniform and allocated budgets; pass its "layer_top_k" to a quick
ablation. Budgets that differ between layers are native-only (stock MoE formats have one top-k).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as Fn
from tqdm import tqdm

from surgery.atomic import write_json


@torch.no_grad()
def log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [ctx, V] (float32) of one window."""
    return torch.log_softmax(model(input_ids=window[None], use_cache=False).logits[0].float(), -1)


def mean_kl(model, windows: torch.Tensor, teacher_logp: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(teacher || model) on `windows` [W, ctx], teacher log-probs given per window."""
    total = sum(Fn.kl_div(log_probs(model, w), t, log_target=True, reduction="sum").item()
                for w, t in zip(windows, teacher_logp))
    return total / windows.numel()


def allocate(curves: list[dict[int, float]], base_k: int, floor: int = 1) -> list[int]:
    """Greedy: every layer starts at `floor`; each remaining expert of the total (layers * base_k) goes to the
    layer whose KL drops most from one more. Curves are KL at each k with the other layers at base_k."""
    layers = len(curves)
    ks = [floor] * layers
    for _ in range(layers * base_k - sum(ks)):
        gains = [curves[l][ks[l]] - curves[l][ks[l] + 1] if ks[l] + 1 in curves[l] else -float("inf")
                 for l in range(layers)]
        best = max(range(layers), key=gains.__getitem__)
        if gains[best] == -float("inf"):
            raise ValueError("no layer can take another expert: the candidate ks are too few for the total")
        ks[best] += 1
    return ks


def main(argv=None) -> dict:
    from surgery.config import routing_at_k
    from surgery.data import resolve_data, tokenize_file, windows_of
    from surgery.modeling import load_model, load_tokenizer, set_layer_routing
    from surgery.moe import moe_blocks, set_impl
    from surgery_evals.quick_ablation import converted_student
    from surgery_evals.report import machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("convert", help="ConvertConfig fields as JSON (the structure, as in a quick ablation's spec)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens the KL is measured on")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ks", default="", help="candidate ks, comma-separated (default 1 .. 2 * top_k)")
    ap.add_argument("--source", default="runs/smollm2")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    spec = json.loads(a.convert)
    t0 = time.time()
    teacher = load_model(a.source)
    student = converted_student(spec, source=a.source)
    set_impl(student, "masked")  # the same function as the grouped path, faster on a CPU for whole windows
    cfg = student.surgery_config
    blocks = moe_blocks(student)
    base_k = cfg.top_k
    ks = [int(k) for k in a.ks.split(",")] if a.ks else list(range(1, min(cfg.num_experts, 2 * base_k) + 1))
    tok = load_tokenizer(a.source)
    wins = windows_of(tokenize_file(tok, resolve_data("wikitext-valid"), a.tokens), a.ctx)
    t_logp = [log_probs(teacher, w) for w in wins]
    base = mean_kl(student, wins, t_logp)
    curves = []
    bar = tqdm(total=len(blocks) * (len(ks) - 1), desc="layer KL", unit="eval")
    for l, block in enumerate(blocks):
        curve = {base_k: base}
        for k in ks:
            if k == base_k:
                continue
            block.routing = routing_at_k(cfg.routing, k)
            curve[k] = mean_kl(student, wins, t_logp)
            bar.update(1)
        block.routing = cfg.layer_routing(l)
        curves.append(dict(sorted(curve.items())))
    bar.close()
    alloc = allocate(curves, base_k, floor=min(ks))
    cfg.layer_top_k = alloc
    set_layer_routing(student, cfg)
    alloc_kl = mean_kl(student, wins, t_logp)
    res = {"convert": spec, "tokens": int(wins.numel()), "ctx": a.ctx, "data": "wikitext-valid",
           "ks": ks, "uniform_kl": round(base, 5),
           "layer_kl": [{str(k): round(v, 5) for k, v in c.items()} for c in curves],
           "layer_top_k": alloc, "allocated_kl": round(alloc_kl, 5), "seconds": round(time.time() - t0, 1),
           "machine": machine()["summary"]}
    if a.json:
        write_json(a.json, res, indent=1)
    print(json.dumps({k: res[k] for k in ("uniform_kl", "layer_top_k", "allocated_kl", "seconds")}))
    return res


if __name__ == "__main__":
    main()
