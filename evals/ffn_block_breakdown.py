"""Where a converted FFN block's time goes on the CPU inference path, against the dense FFN it came from:
one layer, a few token counts, each piece timed alone (median wall time of 7 rounds of 300 calls, 2 threads).

    python -m surgery_evals.ffn_block_breakdown [--converted runs/smollm2-50pct/model] [--dense runs/smollm2]
        [--layer 10] [--tokens 8,64] [--json OUT]

Pieces: "dense" the dense SwiGLU block; "block" the MoE block as the model calls it (routing included);
"routing+masked" router, top-k and the masked path called directly (no dispatch layers); "masked", "sorted",
"grouped" each path alone with the routing given; "two matmuls" the masked path's gate/up and down products
alone (its floor). A microbenchmark for finding overhead, not a throughput figure (`surgery bench model`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _time(fn, x, calls: int = 300) -> float:
    for _ in range(min(20, calls)):
        fn(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) / calls * 1e6


def breakdown(converted: str, dense: str, layer: int, tokens: list[int], rounds: int = 7, calls: int = 300) -> dict:
    from surgery.modeling import load_model
    from surgery_evals.report import machine
    from surgery_kernels import cpu_moe

    conv_m, dense_m = load_model(converted), load_model(dense)
    b, d = conv_m.model.layers[layer].mlp, dense_m.model.layers[layer].mlp
    E, shared, K = b.experts, b.shared_expert.weights() if b.shared_expert is not None else None, b.routing.top_k
    rows = {}
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(T, d.gate_proj.weight.shape[1], generator=torch.Generator().manual_seed(T))
            w, ids = cpu_moe.route(b.router_logits(x), K)
            p = cpu_moe.pack(E.gate_proj, E.up_proj, E.down_proj, shared)
            F = p.shared_width + p.num_experts * p.width
            pieces = {
                "dense": d,
                "block": b,
                "routing+masked": lambda x: cpu_moe._masked(x, p, *cpu_moe.route(b.router_logits(x), K)),
                "masked": lambda x: cpu_moe._masked(x, p, w, ids),
                "sorted": lambda x: cpu_moe._sorted(x, p, w, ids),
                "grouped": lambda x: cpu_moe._grouped(x, p, w, ids),
                "two matmuls": lambda x: torch.nn.functional.linear(x, p.gate_up_all)[:, :F] @ p.down_all,
            }
            times = {k: [] for k in pieces}
            for _ in range(rounds):  # interleaved, so that drift hits every piece alike
                for k, fn in pieces.items():
                    times[k].append(_time(fn, x, calls))
            rows[T] = {k: round(statistics.median(v), 1) for k, v in times.items()}
            print(T, rows[T], flush=True)
    return {"converted": converted, "dense": dense, "layer": layer, "unit": "microseconds per call (median)",
            "threads": torch.get_num_threads(), "rounds": rounds, "calls": calls, "tokens": rows,
            "machine": machine()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--converted", default="runs/smollm2-50pct/model")
    ap.add_argument("--dense", default="runs/smollm2")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--tokens", default="8,64")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    r = breakdown(a.converted, a.dense, a.layer, [int(t) for t in a.tokens.split(",")], a.rounds, a.calls)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
