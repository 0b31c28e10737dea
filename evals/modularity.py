"""The modularity experiments of issue 12 on one converted model, stage by stage, resumable.

    python -m surgery_evals.modularity --base runs/smollm2-50pct/model --dense runs/smollm2 \
        --work runs/modularity --results results/modularity [--stages eval,stats,prune,extend,finetune]

Old domain: WikiText-2 (test for evaluation, valid for statistics and the replay memory). New domain: Python
stdlib source split by module (`stdlib-train` for statistics and training, `stdlib-eval` for evaluation;
surgery/data.py). Every stage appends its rows to RESULTS/modularity-cpu.json (perplexities, tokens,
minutes, machine) and skips what is already there; plots at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from surgery.data import resolve_data, tokenize_file
from surgery.experts.commands import checkpoint_bytes
from surgery.modeling import load_model, load_tokenizer, save_converted
from surgery.moe import set_impl
from surgery_evals.perplexity import perplexity
from surgery_evals.report import machine

DOMAINS = {"wikitext": "wikitext-test", "stdlib": "stdlib-eval"}


class Results:
    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"meta": meta, "rows": []}

    def has(self, name: str) -> bool:
        return any(r["name"] == name for r in self.data["rows"])

    def get(self, name: str) -> dict:
        return next(r for r in self.data["rows"] if r["name"] == name)

    def add(self, row: dict) -> None:
        self.data["rows"] = [r for r in self.data["rows"] if r["name"] != row["name"]] + [row]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("history", "kept")}), flush=True)


def evaluate(model, tok, tokens: int) -> dict:
    if hasattr(model, "surgery_config"):
        set_impl(model, "masked")  # CPU: the routed MoE as three masked matmuls (equal to the reference)
    out = {}
    for name, data in DOMAINS.items():
        r = perplexity(model, tok, resolve_data(data), tokens, 1024, 1, progress=False)
        out[name] = round(r["perplexity"], 4)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/smollm2-50pct/model")
    ap.add_argument("--dense", default="runs/smollm2")
    ap.add_argument("--work", default="runs/modularity")
    ap.add_argument("--results", default="results/modularity")
    ap.add_argument("--stages", default="eval,stats,prune,extend,finetune")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--stats-tokens", type=int, default=16384)
    ap.add_argument("--keep-fraction", type=float, default=0.5)
    ap.add_argument("--criteria", default="frequency,weighted-norm,reconstruction")
    ap.add_argument("--prune-calibrate-tokens", type=int, default=8192)
    ap.add_argument("--new-experts-fraction", type=float, default=0.25)
    ap.add_argument("--extend-tokens", type=int, default=24576)
    ap.add_argument("--memory-tokens", type=int, default=4096)
    ap.add_argument("--extend-lr", type=float, default=1e-3)
    ap.add_argument("--ft-lr", default="1e-4,3e-5")
    ap.add_argument("--variants", default="zero,zero-l2r,copy-most-used-l2r",
                    help="extension variants: INIT or INIT-l2r (with the replay-memory router stage)")
    ap.add_argument("--conc-weights", default="0,0.1", help="concentration stage: loss weights (0: control)")
    ap.add_argument("--conc-tokens", type=int, default=8192)
    ap.add_argument("--table", action="store_true", help="only print RESULTS as a Markdown table")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads((Path(args.results) / "modularity-cpu.json").read_text())))
        return
    torch.manual_seed(0)
    work, res_dir = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    res = Results(res_dir / "modularity-cpu.json",
                  {"base": args.base, "dense": args.dense, "eval_tokens": args.eval_tokens, "ctx": 1024,
                   "domains": DOMAINS, "machine": machine(), "args": vars(args)})
    stages = args.stages.split(",")
    tok = load_tokenizer(args.base)
    base = load_model(args.base)
    moe = base.surgery_config

    if "eval" in stages:
        for name, path in (("dense", args.dense), ("base", args.base)):
            if not res.has(name):
                m = load_model(path)
                res.add({"name": name, "kind": "reference", "ppl": evaluate(m, tok, args.eval_tokens),
                         "bytes": checkpoint_bytes(path)})

    if "stats" in stages and not (res_dir / "stats.json").is_file():
        from surgery.experts.commands import run_stats

        t0 = time.time()
        st = run_stats(args.base, ["wikitext-valid", "stdlib-train"], args.stats_tokens, 512,
                       res_dir / "stats.png")
        st["seconds"] = round(time.time() - t0, 1)
        (res_dir / "stats.json").write_text(json.dumps(st) + "\n")

    if "prune" in stages:
        from surgery.experts.prune import PruneConfig, choose_experts, prune_model

        keep = round(args.keep_fraction * moe.num_experts)
        ids = tokenize_file(tok, resolve_data("stdlib-train"), args.stats_tokens)
        criteria = args.criteria.split(",")
        for criterion in criteria:
            name = f"prune-{criterion}"
            if res.has(name):
                continue
            t0 = time.time()
            m = load_model(args.base)
            kept, _ = choose_experts(m, ids, PruneConfig(keep=keep, criterion=criterion))
            prune_model(m, kept, record={"op": "prune", "criterion": criterion, "data": "stdlib-train", "kept": kept})
            out = work / name
            save_converted(m, out, tokenizer_from=args.base, overwrite=True)
            res.add({"name": name, "kind": "prune", "criterion": criterion, "keep": keep,
                     "seconds": round(time.time() - t0, 1), "ppl": evaluate(m, tok, args.eval_tokens),
                     "bytes": checkpoint_bytes(out), "kept": kept})
        best = min(criteria,
                   key=lambda c: res.get(f"prune-{c}")["ppl"]["stdlib"])
        name = f"prune-{best}-calibrated"
        if args.prune_calibrate_tokens and not res.has(name):
            from surgery.calibrate import EndToEndConfig, run_end_to_end

            m = load_model(work / f"prune-{best}")
            teacher = load_model(args.base)
            set_impl(m, "masked")
            set_impl(teacher, "masked")
            t0 = time.time()
            cal = run_end_to_end(m, teacher, ids, EndToEndConfig(tokens=args.prune_calibrate_tokens, ctx=256,
                                                                 batch_size=2, lr=1e-4, train="moe"))
            res.add({"name": name, "kind": "prune", "criterion": best, "keep": keep,
                     "calibrate_tokens": cal["tokens"], "seconds": round(time.time() - t0, 1),
                     "ppl": evaluate(m, tok, args.eval_tokens), "bytes": checkpoint_bytes(work / f"prune-{best}")})

    total_tokens = args.extend_tokens + 2 * args.memory_tokens  # all tokens it trains on
    if "extend" in stages:
        from surgery.experts.extend import ExtendConfig, extend_model, tune_routers

        M = max(1, round(args.new_experts_fraction * moe.num_experts))
        new_ids = tokenize_file(tok, resolve_data("stdlib-train"), args.extend_tokens)
        mem_ids = tokenize_file(tok, resolve_data("wikitext-valid"), args.memory_tokens)
        for variant in args.variants.split(","):
            mem = variant.endswith("-l2r")
            init = variant.removesuffix("-l2r")
            if True:
                name = f"extend-{variant}"
                if res.has(name):
                    continue
                cfg = ExtendConfig(new_experts=M, init=init, tokens=args.extend_tokens, lr=args.extend_lr,
                                   memory_tokens=args.memory_tokens if mem else 0)
                stage1 = f"extend-{init}"
                if mem and res.has(stage1) and (work / stage1).is_dir():
                    # the same first stage was run already: add only the L2R router stage to its model
                    m = load_model(work / stage1)
                    set_impl(m, "masked")
                    t0 = time.time()
                    rec = {"pool_top_k": res.get(stage1)["pool_top_k"],
                           "train": {"tokens": res.get(stage1)["tokens"], "history": []},
                           "router_tuning": tune_routers(m, new_ids, mem_ids, cfg)}
                    secs = time.time() - t0 + 60 * res.get(stage1)["minutes"]
                    m.surgery_config.modules[-1]["router_tuning"] = {
                        k: v for k, v in rec["router_tuning"].items() if k != "history"}
                else:
                    m = load_model(args.base)
                    set_impl(m, "masked")
                    t0 = time.time()
                    rec = extend_model(m, new_ids, cfg, mem_ids if mem else None)
                    secs = time.time() - t0
                save_converted(m, work / name, tokenizer_from=args.base, overwrite=True)
                res.add({"name": name, "kind": "extend", "init": init, "new_experts": M,
                         "pool_top_k": rec["pool_top_k"], "l2r": mem,
                         "tokens": rec["train"]["tokens"] + (rec.get("router_tuning") or {}).get("tokens", 0),
                         "minutes": round(secs / 60, 2), "ppl": evaluate(m, tok, args.eval_tokens),
                         "bytes": checkpoint_bytes(work / name),
                         "history": {k: rec[k]["history"] for k in ("train", "router_tuning") if k in rec}})

    if "finetune" in stages:
        from surgery.experts.extend import TrainConfig, train_lm

        ids = tokenize_file(tok, resolve_data("stdlib-train"), total_tokens)
        for lr in [float(x) for x in args.ft_lr.split(",")]:
            for which, path in (("moe", args.base), ("dense", args.dense)):
                name = f"finetune-{which}-lr{lr:g}"
                if res.has(name):
                    continue
                m = load_model(path)
                if which == "moe":
                    set_impl(m, "masked")
                params = [p for layer in m.model.layers for p in layer.parameters()]  # not the embeddings
                t0 = time.time()
                rec = train_lm(m, params, [("new", ids)], TrainConfig(tokens=total_tokens, lr=lr),
                               desc=f"fine-tune {which}")
                res.add({"name": name, "kind": "finetune", "model": which, "lr": lr, "tokens": rec["tokens"],
                         "minutes": round((time.time() - t0) / 60, 2), "ppl": evaluate(m, tok, args.eval_tokens),
                         "history": rec["history"]})
    if "concentration" in stages:
        concentration_study(args, res, tok, work)
    plot(res.data, res_dir / "forgetting.png")


def concentration_study(args, res: Results, tok, work: Path) -> None:
    """Issue 12, item 4: does ModuleFormer's load-concentration loss make domains use distinct experts?

    The base model is distilled from itself (so quality is anchored) on text that alternates WikiText-2
    valid and stdlib-train in 512-token blocks, with the concentration loss at each weight (0 is the control:
    the same training without it); then the domains' routing entropy and overlap are measured, and the model
    is pruned to half its routed experts with stdlib statistics, as in the prune stage."""
    from surgery.calibrate import EndToEndConfig, run_end_to_end
    from surgery.data import interleave
    from surgery.experts.prune import PruneConfig, choose_experts, prune_model
    from surgery.experts.stats import domain_stats, overlap, summarize

    wiki = tokenize_file(tok, resolve_data("wikitext-valid"), args.conc_tokens)
    code = tokenize_file(tok, resolve_data("stdlib-train"), args.conc_tokens)
    mixed = interleave(wiki, code, 512)
    wiki_s = tokenize_file(tok, resolve_data("wikitext-valid"), args.stats_tokens // 2)
    code_s = tokenize_file(tok, resolve_data("stdlib-train"), args.stats_tokens // 2)
    for c in [float(x) for x in args.conc_weights.split(",")]:
        name = f"concentration-{c:g}"
        if res.has(name):
            continue
        m, teacher = load_model(args.base), load_model(args.base)
        set_impl(m, "masked")
        set_impl(teacher, "masked")
        t0 = time.time()
        cal = run_end_to_end(m, teacher, mixed, EndToEndConfig(tokens=args.conc_tokens, ctx=256, batch_size=2,
                                                               lr=1e-4, train="moe", concentration=c))
        del teacher
        sw, sc = domain_stats(m, wiki_s, 512), domain_stats(m, code_s, 512)
        row = {"name": name, "kind": "concentration", "weight": c, "tokens": cal["tokens"],
               "minutes": round((time.time() - t0) / 60, 2), "ppl": evaluate(m, tok, args.eval_tokens),
               "wikitext_entropy": summarize(sw), "stdlib_entropy": summarize(sc),
               "overlap": {k: v for k, v in overlap(sw, sc).items() if k.startswith("mean")}}
        keep = round(args.keep_fraction * m.surgery_config.num_experts)
        kept, _ = choose_experts(m, code_s, PruneConfig(keep=keep, criterion="weighted-norm"))
        prune_model(m, kept)
        row["pruned_ppl"] = evaluate(m, tok, args.eval_tokens)
        res.add(row)


def table(data: dict) -> str:
    """The rows as a Markdown table, each perplexity with its ratio to the row's own starting model."""
    rows = {r["name"]: r for r in data["rows"]}
    out = ["| run | WikiText-2 test ppl (x start) | stdlib-eval ppl (x start) | checkpoint MB | training tokens | minutes |",
           "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        start = rows.get("dense" if r.get("model") == "dense" or r["name"] == "dense" else "base")
        cells = []
        for d in ("wikitext", "stdlib"):
            v = r["ppl"][d]
            cells.append(f"{v:.2f}" + (f" ({v / start['ppl'][d]:.3f}x)" if start and r is not start else ""))
        mb = f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else "-"
        toks = r.get("tokens") or r.get("calibrate_tokens") or "-"
        mins = r.get("minutes") or (round(r["seconds"] / 60, 2) if r.get("seconds") else "-")
        out.append(f"| {r['name']} | {cells[0]} | {cells[1]} | {mb} | {toks} | {mins} |")
    return "\n".join(out)


def plot(data: dict, path: Path) -> None:
    """Stdlib gain against WikiText-2 forgetting, relative to each row's own starting model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["name"]: r for r in data["rows"]}
    if "base" not in rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in data["rows"]:
        if r["kind"] not in ("extend", "finetune", "prune"):
            continue
        ref = rows["dense" if r.get("model") == "dense" else "base"]["ppl"]
        x = 100 * (r["ppl"]["wikitext"] / ref["wikitext"] - 1)
        y = 100 * (1 - r["ppl"]["stdlib"] / ref["stdlib"])
        marker = {"extend": "o", "finetune": "s", "prune": "^"}[r["kind"]]
        ax.scatter(x, y, marker=marker)
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(2, color="grey", ls=":", lw=1)
    ax.axhline(20, color="grey", ls=":", lw=1)
    ax.set_xlabel("WikiText-2 perplexity change vs. start (%)  (lower is better)")
    ax.set_ylabel("stdlib-eval perplexity reduction vs. start (%)")
    ax.set_title("new domain gained vs. old domain forgotten", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
