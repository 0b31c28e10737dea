"""Where one converted layer module spends its time: torch.profiler over one layer's attention (head experts)
or FFN (MoE block), dense and converted, on the same inputs: evals/throughput.py's rows taken apart op by op.

    python -m surgery_evals.profile_layer attention --synthetic llama2-7b --tokens 4096 --json OUT.json
    python -m surgery_evals.profile_layer mlp --synthetic llama2-7b -E 16 -K 4 --tokens 64 --json OUT.json

Builds a random-weight model of the named shape with --layers layers (2 by default: one layer is profiled,
the shapes are the real ones) and converts a copy (FFN experts E/K, and head experts keeping --head-top-k of
the heads). Attention gets the hidden states the dense model's first layer sees in a batch-1 prefill of
--tokens tokens; the FFN gets --tokens random hidden states (a batch of decode tokens, or a prefill). For dense
and converted it prints the ops ranked by device time (CUDA) or self CPU time. JSON: the rows and the machine.
A diagnosis tool, not a benchmark: throughput comes from `surgery bench model` and `surgery bench kernels`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from surgery_evals.throughput import SYNTHETIC, attention_inputs, machine, random_dense_model, versions


def _profile(run, device, repeats: int):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(2):  # warm-up: Triton compiles, caches fill
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / repeats
    cuda = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) if cuda else 0
        rows.append({"op": e.key, "calls": e.count // repeats, "cpu_ms": round(e.self_cpu_time_total / 1e3 / repeats, 3),
                     "device_ms": round(dev_us / 1e3 / repeats, 3)})
    key = "device_ms" if cuda else "cpu_ms"
    rows = [r for r in rows if not r["op"].startswith("ProfilerStep")]
    rows.sort(key=lambda r: -r[key])
    return {"wall_ms_per_call": round(wall * 1e3, 3), "ranked_by": key, "ops": rows[:25]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("module", choices=["attention", "mlp"])
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), default="llama2-7b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("-E", "--experts", type=int, default=16)
    p.add_argument("-K", "--top-k", type=int, default=4)
    p.add_argument("--head-top-k", type=int, default=None, help="routed heads a token keeps (default: 75%% of them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    from surgery.convert import ConvertConfig, convert_model
    from surgery.modeling import parse_dtype

    device, dtype = torch.device(a.device), parse_dtype(a.dtype)
    shape = SYNTHETIC[a.synthetic](a.layers)
    dense = random_dense_model(shape, device, dtype)
    heads = dict(attention_experts=True, attention_top_k=a.head_top_k) if a.module == "attention" else {}
    converted = convert_model(random_dense_model(shape, device, dtype),
                              ConvertConfig(experts=a.experts, top_k=a.top_k, **heads))
    if a.module == "attention":
        kw = attention_inputs(dense, a.tokens)[0]
        kw = dict(hidden_states=kw["hidden_states"], position_embeddings=kw["position_embeddings"], attention_mask=None)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, a.tokens, shape.hidden_size, generator=g).to(device, dtype)
    out = {"what": f"one layer's {a.module}, synthetic {a.synthetic}, E{a.experts} K{a.top_k}, batch 1, "
                   f"{a.tokens} tokens, {a.dtype}",
           "machine": machine(), "versions": versions(), "command": "python -m surgery_evals.profile_layer "
           + " ".join(argv if argv is not None else sys.argv[1:])}
    for name, model in (("dense", dense), ("converted", converted)):
        module = getattr(model.model.layers[0], "self_attn" if a.module == "attention" else "mlp")
        out[name] = _profile(lambda: module(**kw) if a.module == "attention" else module(x), device, a.repeats)
        top = out[name]
        print(f"== {name}: {top['wall_ms_per_call']} ms a call (wall); ops by {top['ranked_by']}")
        for r in top["ops"][:15]:
            print(f"  {r[top['ranked_by']]:9.3f} ms  x{r['calls']:<4} {r['op'][:90]}")
    if a.json_path:
        with open(a.json_path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
