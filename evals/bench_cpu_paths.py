"""Each CPU inference path (kernels/cpu_moe.py) on a converted model's real FFN inputs and routing, every layer
in turn (so the weights stream from memory as in a forward pass; a one-layer loop keeps them in cache and
flatters small token counts), against the dense model's FFNs on the same inputs. For fitting `choose_path`'s
thresholds on a machine; `surgery bench model` measures whole models.

    python -m surgery_evals.bench_cpu_paths --converted runs/smollm2-50pct/model [--dense runs/smollm2]
        [--tokens 8,16,32,64,128,512,4096] [--paths masked,sorted,grouped] [--rounds 7] [--data TEXT]
        [--json OUT]

Inputs: the first T tokens' hidden states entering each layer's MLP, captured from the converted model run
on WikiText-2 validation text (so each router routes as it does in use). Per T, the milliseconds for all
layers' FFNs (median of interleaved rounds: drift hits every path alike), the path "auto" takes, each path
against dense, and each path's largest difference from the PyTorch reference's output on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _capture(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's MLP input for `ids` [1, T], as [T, D]."""
    seen = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
             for layer in model.model.layers]
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def bench(converted: str, dense: str, tokens: list[int], paths: list[str], rounds: int = 7, data=None) -> dict:
    from surgery.data import resolve_data, tokenize_file
    from surgery.modeling import load_model, load_tokenizer
    from surgery.moe import MoEBlock
    from surgery_evals.report import machine
    from surgery_kernels import cpu_moe, reference

    conv, dense_m = load_model(converted), load_model(dense)
    blocks = [layer.mlp for layer in conv.model.layers]
    if not all(isinstance(b, MoEBlock) for b in blocks):
        raise ValueError(f"{converted}: not a converted model (an MLP is not an MoE block)")
    text = tokenize_file(load_tokenizer(dense), resolve_data(data), max(tokens))
    if text.numel() < max(tokens):
        raise ValueError(f"{resolve_data(data)}: {text.numel()} tokens, fewer than --tokens asks ({max(tokens)})")
    rows = {}
    with torch.inference_mode():
        for T in tokens:
            xs = _capture(conv, text[:T][None])
            calls, refs = [], []  # per layer: the path's arguments; the reference's output on them
            for b, x in zip(blocks, xs):
                w, ids = cpu_moe.route(b.router_logits(x), b.routing.top_k, b.routing.score_func,
                                       b.routing.renormalize, b.routing.scale)
                e = b.experts
                shared = b.shared_expert.weights() if b.shared_expert is not None else None
                calls.append((x, cpu_moe.pack(e.gate_proj, e.up_proj, e.down_proj, shared), w, ids))
                refs.append(reference.moe_ffn(x, e.gate_proj, e.up_proj, e.down_proj, w, ids, shared))
            E, K = calls[0][1].num_experts, calls[0][3].shape[1]
            pieces = {"dense": lambda: [layer.mlp(x) for layer, (x, *_) in zip(dense_m.model.layers, calls)]}
            for path in paths:
                pieces[path] = (lambda path=path: [cpu_moe._ffn(x, p, w, ids, path) for x, p, w, ids in calls])
            # Each path's outputs against the reference's, every layer, before timing.
            err = {path: max((y - ref).abs().max().item() for y, ref in zip(pieces[path](), refs))
                   for path in paths}
            reps = max(1, int(2048 // T))  # enough calls per timing at small T
            times = {k: [] for k in pieces}
            for fn in pieces.values():
                fn()  # warm-up (packing, allocator)
            for _ in range(rounds):
                for k, fn in pieces.items():
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    times[k].append((time.perf_counter() - t0) / reps * 1e3)
            ms = {k: round(statistics.median(v), 3) for k, v in times.items()}
            auto = cpu_moe.choose_path(T, E, K, calls[0][1].width)
            loads = [torch.bincount(ids.reshape(-1), minlength=E) for _, _, _, ids in calls]
            rows[T] = {"ms_all_layers": ms, "auto": auto,
                       "vs_dense": {k: round(ms["dense"] / v, 3) for k, v in ms.items() if k != "dense"},
                       "max_abs_diff_vs_reference": {k: float(f"{v:.3g}") for k, v in err.items()},
                       "busiest_expert_over_mean": round(statistics.mean(
                           float(c.max() * E / c.sum()) for c in loads), 2)}
            print(T, rows[T], flush=True)
    return {"converted": converted, "dense": dense, "layers": len(blocks), "threads": torch.get_num_threads(),
            "rounds": rounds, "unit": "milliseconds for every layer's FFN (median of interleaved rounds)",
            "tokens": rows, "machine": machine()}


def main(argv=None) -> dict:
    from surgery.atomic import write_json
    from surgery_kernels import cpu_moe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--converted", required=True)
    ap.add_argument("--dense", default="runs/smollm2")
    ap.add_argument("--tokens", default="8,16,32,64,128,512,4096")
    ap.add_argument("--paths", default="masked,sorted,grouped")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--data", default=None, help="text the inputs come from (default: WikiText-2 validation)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    paths = a.paths.split(",")
    bad = [p for p in paths if p not in cpu_moe.PATHS or p == "auto"]
    if bad:
        ap.error(f"--paths: {bad[0]!r} is not one of {', '.join(p for p in cpu_moe.PATHS if p != 'auto')}")
    try:
        tokens = [int(t) for t in a.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens: {a.tokens!r} is not a comma-separated list of integers")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        r = bench(a.converted, a.dense, tokens, paths, a.rounds, a.data)
    except ValueError as e:
        ap.error(str(e))
    r["command"] = "python -m surgery_evals.bench_cpu_paths " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.json:
        write_json(a.json, r)
    return r


if __name__ == "__main__":
    main()
