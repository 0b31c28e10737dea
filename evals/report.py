"""Report: expert load, machine description, JSON report, plots, and the quality table of results/quality/."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    info = {"platform": platform.platform(), "cpu": platform.machine(), "cpu_cores": os.cpu_count(),
            "torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    info["summary"] = (f"{info['gpu']}" if "gpu" in info else
                       f"CPU ({info.get('cpu_model', '?')}), {info['cpu_cores']} cores, {info.get('memory_gib', '?')} GiB")
    return info


@contextlib.contextmanager
def expert_load(model):
    """Count, per MoE layer, how many (token, slot) routing decisions went to each expert while the block is
    active. Yields a dict that is filled in place: {"counts": [[...E] per layer]}."""
    from surgery.moe import moe_blocks

    blocks = moe_blocks(model)
    result = {"counts": [[0] * b.num_experts for b in blocks]}
    hooks = []

    def make(i, block):
        def hook(module, args, output):
            lg = module.last_router_logits
            if lg is None or module.dense_routing:
                return
            ids = lg.topk(module.routing.top_k, dim=-1).indices
            c = torch.bincount(ids.reshape(-1).cpu(), minlength=module.num_experts).tolist()
            result["counts"][i] = [a + b for a, b in zip(result["counts"][i], c)]
            module.last_router_logits = None
        return hook

    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_hook(make(i, b)))
    try:
        yield result
    finally:
        for h in hooks:
            h.remove()
        counts = result["counts"]
        result["fractions"] = [[round(c / max(sum(row), 1), 5) for c in row] for row in counts]
        # max load / mean load per layer: 1.0 is perfectly balanced
        result["imbalance"] = [round(max(row) * len(row) / max(sum(row), 1), 4) for row in counts]


def plot_expert_load(fractions: list[list[float]], path, title: str = "expert load") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = torch.tensor(fractions).numpy()
    fig, ax = plt.subplots(figsize=(max(4, data.shape[1] * 0.5 + 2), max(3, data.shape[0] * 0.2 + 1)))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of routing decisions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


BASELINE_MARKERS = {"static": ("s", "static pruning"), "gate-sparsity": ("^", "activation sparsity")}


def plot_ppl_vs_active(points: list[dict], path, title: str = "perplexity vs active FFN fraction") -> Path:
    """points: {"label", "active", "dataset", "perplexity"}; one line per dataset (log-scale perplexity). Points
    labelled "static" or "gate-sparsity" (the baselines) are hollow markers off the line, labelled beside them,
    so that a baseline at the converted model's perplexity stays readable."""
    with _log_ppl_figure(path, title, "active FFN fraction", "perplexity") as ax:
        for ds in sorted({p["dataset"] for p in points}):
            pts = sorted((p for p in points if p["dataset"] == ds and p["label"] not in BASELINE_MARKERS),
                         key=lambda p: p["active"])
            line, = ax.plot([p["active"] for p in pts], [p["perplexity"] for p in pts], "o-", label=ds)
            for p in pts:
                ax.annotate(p["label"], (p["active"], p["perplexity"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            for p in (p for p in points if p["dataset"] == ds and p["label"] in BASELINE_MARKERS):
                marker, name = BASELINE_MARKERS[p["label"]]
                ax.plot([p["active"]], [p["perplexity"]], marker, mfc="none", ms=9, color=line.get_color())
                ax.annotate(name, (p["active"], p["perplexity"]), fontsize=7, xytext=(3, -10),
                            textcoords="offset points")
    return Path(path)


@contextlib.contextmanager
def _log_ppl_figure(path, title: str, xlabel: str, ylabel: str):
    """One 6x4 figure with a log-scale perplexity axis; the body draws on the yielded axes; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_curve(points: list[dict], path, title: str, dense: float | None = None) -> Path:
    """Perplexity against calibration minutes (a recipe's e2e snapshots and its final model)."""
    ylabel = f"perplexity ({points[0]['dataset']})" if points else "perplexity"
    with _log_ppl_figure(path, title, "calibration minutes (pipeline, evaluation excluded)", ylabel) as ax:
        ax.plot([p["minutes"] for p in points], [p["perplexity"] for p in points], "o-", label="converted")
        if dense:
            ax.axhline(dense, color="gray", ls="--", label="dense")
    return Path(path)


def quality_rows(folder) -> list[dict]:
    """Every results/quality/*.json written by `surgery run` (report.json copies) as flat table rows."""
    rows = []
    for p in sorted(Path(folder).glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if "evaluations" not in r:
            continue
        dense = {e["dataset"]: e["perplexity"] for e in r["evaluations"] if e["stage"] == "dense"}
        for e in r["evaluations"]:
            if e["stage"] == "dense":
                continue
            # the recipe's baselines (evaluate.static_baseline, evaluate.activation_sparsity)
            baseline = e["stage"] in BASELINE_METHODS
            base = r.get(BASELINE_REPORT_KEYS.get(e["stage"], "")) or {}
            rows.append({"file": p.name, "recipe": r.get("recipe", {}).get("name", p.stem),
                         "method": BASELINE_METHODS.get(e["stage"], r.get("method", "")),
                         "stage": e["stage"], "dataset": e["dataset"], "calibration": _calibration(r, e["stage"]),
                         "active": e.get("active_ffn_fraction"), "perplexity": e["perplexity"],
                         "ratio": e["perplexity"] / dense[e["dataset"]] if e["dataset"] in dense else None,
                         "tokens": base.get("tokens", 0) if baseline
                         else r.get("calibration_tokens", {}).get(e["stage"], 0),
                         "seconds": base.get("seconds") if baseline else r.get("seconds_to_stage", {}).get(e["stage"]),
                         "machine": r.get("machine", {}).get("summary", "")})
    return rows


STAGE_NAMES = {"converted": "none", "layerwise": "layer-wise", "e2e": "layer-wise + end-to-end",
               "static": "end-to-end (the recipe's e2e budget)", "gate-sparsity": "none (training-free)"}
BASELINE_METHODS = {"static": "static pruning, bias-compensated",
                    "gate-sparsity": "gate-decided activation sparsity (gate dense)"}
# where report.json keeps each baseline's budget, and its row in `surgery run`'s printed table
BASELINE_REPORT_KEYS = {"static": "static_baseline", "gate-sparsity": "activation_sparsity"}
BASELINE_ROWS = {"static": "static pruning, same e2e budget", "gate-sparsity": "activation sparsity, no training"}


def _calibration(report: dict, stage: str) -> str:
    """What calibrated the model a row evaluates: an e2e stage is 'end-to-end' alone where the recipe had no
    layer-wise stage (the 25% recipe, the quickstart)."""
    ran_layerwise = "layerwise" in report.get("stages", {}) or "layerwise" in report.get("calibration_tokens", {})
    if stage == "e2e" and not ran_layerwise:
        return "end-to-end"
    return STAGE_NAMES.get(stage, stage)


def quality_table(folder) -> str:
    """Markdown: one row per (run, calibration stage) with WikiText and stdlib perplexities side by side."""
    rows = quality_rows(folder)
    by = {}
    for r in rows:
        key = (r["file"], r["stage"])
        by.setdefault(key, dict(r))[r["dataset"]] = (r["perplexity"], r["ratio"])
    lines = ["| run | method | calibration | active FFN | WikiText-2 ppl (x dense) | stdlib ppl (x dense) | "
             "calibration tokens | time to stage (s) | machine |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(v):
        return f"{v[0]:.2f} ({v[1]:.2f}x)" if v and v[1] is not None else (f"{v[0]:.2f}" if v else "-")

    for (f, stage), r in sorted(by.items(), key=lambda kv: (kv[0][0], list(STAGE_NAMES).index(kv[0][1])
                                                           if kv[0][1] in STAGE_NAMES else 9)):
        lines.append(f"| {r['recipe']} | {r['method']} | {r['calibration']} | "
                     f"{(r['active'] or 0) * 100:.0f}% | {cell(r.get('wikitext'))} | {cell(r.get('stdlib'))} | "
                     f"{r['tokens']:,} | {r['seconds'] if r['seconds'] is not None else '-'} | {r['machine']} |")
    return "\n".join(lines) + "\n"


def run_summary(report: dict) -> str:
    """The table `surgery run` prints at the end: dense against converted, per evaluation dataset, with the
    active FFN fraction, prefill speed on this machine and where the files are."""
    ppl = report.get("perplexity", {})
    final = next((s for s in ("e2e", "layerwise", "converted") if any(k.startswith(s + "/") for k in ppl)), None)
    datasets = [k.split("/", 1)[1] for k in ppl if k.startswith("dense/")]
    rows = [["model", "active FFN", *[f"{d} ppl" for d in datasets], "prefill tok/s (1x512)"]]
    speed = report.get("speed") or {}
    rows.append(["dense", "100%", *[f"{ppl[f'dense/{d}']:.2f}" for d in datasets],
                 f"{speed.get('dense_tokens_per_s', float('nan')):.0f}"])
    if final:
        conv = []
        for d in datasets:
            v = ppl.get(f"{final}/{d}")
            conv.append("-" if v is None else f"{v:.2f} ({v / ppl[f'dense/{d}']:.2f}x)")
        rows.append([f"converted ({final})", f"{100 * report.get('active_ffn_fraction', 0):.0f}%", *conv,
                     f"{speed.get('converted_tokens_per_s', float('nan')):.0f}"])
    for stage, label in BASELINE_ROWS.items():  # what the conversion must beat, and the training-free alternative
        if any(k.startswith(f"{stage}/") for k in ppl):
            base = [f"{ppl[f'{stage}/{d}']:.2f} ({ppl[f'{stage}/{d}'] / ppl[f'dense/{d}']:.2f}x)"
                    if f"{stage}/{d}" in ppl else "-" for d in datasets]
            rows.append([label, f"{100 * report.get('active_ffn_fraction', 0):.0f}%", *base, "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    name = report.get("recipe", {}).get("name", "")
    head = f"{name}: {report.get('method', '')}, pipeline {report.get('pipeline_seconds', 0) / 60:.1f} min " \
           f"(evaluation excluded) on {report.get('machine', {}).get('summary', '?')}"
    tail = []
    budget = report.get("time_budget")
    if budget:
        line = f"time budget: {budget['budget_s'] / 60:.1f} min, " + ("kept" if budget["within"] else "exceeded")
        cut = budget.get("e2e")
        if cut and cut["cut"]:
            line += (f"; end-to-end calibration cut to {report.get('stages', {}).get('e2e', {}).get('tokens', 0):,} "
                     f"of {cut['max_tokens']:,} tokens to fit (surgery run --no-time-budget runs them all)")
        elif not budget["enforced"]:
            line += " (not enforced)"
        for corpus in (budget.get("sampling") or {}).values():
            line += f"; sampled text cut to {corpus['tokens']:,} of {corpus['asked']:,} tokens"
        tail.append(line)
    if speed:
        tail.append(f"speed: {speed.get('impl')} path, {speed.get('speedup', 0):.2f}x dense")
    for fmt, e in (report.get("exports") or {}).items():
        tail.append(f"export {fmt}: {e['path']} (reloaded by {e['reloaded_by']}, max |logit diff| "
                    f"{e['max_abs_logit_diff']:.2e})")
    return "\n".join([head, *lines, *tail])
