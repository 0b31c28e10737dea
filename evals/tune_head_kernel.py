"""Tile sweep for the head-expert attention kernel (kernels/head_attention.py) on a GPU: every (BLOCK_M, BLOCK_N,
num_warps, num_stages) candidate times one `routed_attention` call (sort, blocks and kernel: what the model
sees, replayed as a CUDA graph so launch latency does not count) over the routed (token, head) pairs of a
batch-1 prefill, checked against the dense reference, beside the dense attention of every head through sdpa
(cuDNN / flash) on the same tensors.

    python -m surgery_evals.tune_head_kernel --json results/attention/head-kernel-tiles-h200.json --best-out best.txt

Shapes: each --shape HEADS:KV_HEADS:HEAD_DIM (default Llama-2-7B's 32:32:128 and Llama-3.2-1B's 32:8:64) at
each --tokens, with --active of the heads per token (0.75: top-24 of 32). The reference: sdpa over every head
in float32 on the rotated queries, kept for the selected pairs and weighted; a candidate whose output is off
by more than 2e-2 of the output's scale (bf16) is reported and never chosen. --best-out writes, per head dim,
"d=BLOCK_M,BLOCK_N,warps,stages" (the fastest correct candidate summed over the shapes of that head dim),
the format SURGERY_HEAD_TILES takes. Runs on CPU under TRITON_INTERPRET=1 with --smoke (tiny shapes, float32,
two candidates), which is how the test suite checks it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as Fn

from surgery.attention.heads import rope
from surgery_evals.throughput import machine, versions

GRID = [(bm, bn, w, s) for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
        if not (bm == 128 and bn == 128 and s == 3)]  # the largest tiles at three stages overflow shared memory


def make_case(H: int, G: int, d: int, T: int, K: int, dtype, device, seed: int = 0) -> dict:
    """A batch-1 prefill's routed pairs: each token keeps K distinct random heads with random weights."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, d, generator=g)
    k = torch.randn(1, G, T, d, generator=g)
    v = torch.randn(1, G, T, d, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(T).float()[:, None] * inv[None, :]
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    ids = torch.rand(T, H, generator=g).argsort(-1)[:, :K]
    w = torch.rand(T, K, generator=g)
    tok = torch.arange(T).repeat_interleave(K)
    h = ids.reshape(-1)
    to = dict(device=device)
    case = dict(q=q.to(dtype=dtype, **to), k=k.to(dtype=dtype, **to), v=v.to(dtype=dtype, **to),
                cos=cos.to(dtype=dtype, **to), sin=sin.to(dtype=dtype, **to), tok=tok.to(**to), h=h.to(**to),
                w=w.reshape(-1).to(**to), b=torch.zeros_like(tok).to(**to), g=(h // (H // G)).to(**to),
                pos=tok.to(**to), scaling=d ** -0.5)
    # Reference in float32: dense causal attention of every head on the rotated queries, then the kept pairs.
    qr = rope(q, cos[:, None], sin[:, None]).transpose(0, 1)[None].to(device)
    full = Fn.scaled_dot_product_attention(qr, k.to(device), v.to(device), is_causal=True, scale=d ** -0.5,
                                           enable_gqa=True)[0].transpose(0, 1)  # [T, H, d]
    ref = torch.zeros(T, H, d, device=device)
    ref[tok.to(device), h.to(device)] = full[tok.to(device), h.to(device)] * w.reshape(-1, 1).to(device)
    case["ref"] = ref
    return case


def run_kernel(case: dict, tiles) -> torch.Tensor:
    from surgery_kernels.head_attention import routed_attention

    out = torch.zeros_like(case["q"])
    routed_attention(case["q"], case["cos"], case["sin"], case["tok"], case["h"], case["w"], case["b"], case["g"],
                     case["pos"], case["k"], case["v"], case["scaling"], out, tiles=tiles)
    return out


def time_ms(fn, device) -> float:
    """Device time of one call. On CUDA replayed from a CUDA graph: the sort and block glue around the kernel is
    a dozen small launches, and timed eagerly one call at a time their launch latency (not the GPU) sets the
    figure and hides the tiles' differences (a first H200 sweep timed that way was all noise)."""
    if device.type == "cuda":
        import triton.testing

        fn()  # compile outside the capture
        return float(triton.testing.do_bench_cudagraph(fn, rep=50))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help="HEADS:KV_HEADS:HEAD_DIM (repeatable)")
    p.add_argument("--tokens", default="2048,4096", help="comma-separated prefill lengths")
    p.add_argument("--active", type=float, default=0.75, help="fraction of the heads each token keeps")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, float32, two candidates (CPU interpreter)")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--best-out", help="write the best tiles per head dim here (SURGERY_HEAD_TILES format)")
    a = p.parse_args(argv)
    from surgery_kernels.head_attention import tiles_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype)
    shapes = a.shape or ["32:32:128", "32:8:64"]
    try:
        tokens = [int(t) for t in a.tokens.split(",") if t]
    except ValueError:
        p.error(f"--tokens {a.tokens!r}: expected comma-separated integers, e.g. 2048,4096")
    grid = GRID
    if a.smoke:
        shapes, tokens, dtype, grid = ["4:2:16"], [40], torch.float32, [(16, 16, 1, 1), (32, 16, 1, 1)]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    rows = []
    for shape in shapes:
        try:
            H, G, d = (int(x) for x in shape.split(":"))
        except ValueError:
            p.error(f"--shape {shape!r}: expected HEADS:KV_HEADS:HEAD_DIM, e.g. 32:8:64")
        if H % G or d % 2:
            p.error(f"--shape {shape!r}: heads must be a multiple of kv heads and the head dim even")
        K = max(1, round(a.active * H))
        for T in tokens:
            case = make_case(H, G, d, T, K, dtype, device)
            q4 = rope(case["q"], case["cos"][:, None], case["sin"][:, None]).transpose(0, 1)[None].contiguous()
            dense_ms = time_ms(lambda: Fn.scaled_dot_product_attention(q4, case["k"], case["v"], is_causal=True,
                                                                         enable_gqa=True), device)
            scale = float(case["ref"].abs().max())
            label = dict(heads=H, kv_heads=G, head_dim=d, tokens=T, top_k=K)
            print(f"== {shape} T={T} K={K}: dense sdpa over all heads {dense_ms:.3f} ms "
                  f"(current tiles {tiles_for(d)})", flush=True)
            for tiles in grid:
                row = dict(label, tiles=list(tiles), dense_sdpa_ms=round(dense_ms, 4))
                try:
                    err = float((run_kernel(case, tiles).float() - case["ref"]).abs().max()) / scale
                    row["rel_error"] = round(err, 6)
                    row["ok"] = err <= tol
                    row["ms"] = round(time_ms(lambda: run_kernel(case, tiles), device), 4)
                    # the kernel's work is K/H of dense attention's: 1.0 means as efficient per pair as sdpa
                    row["efficiency_vs_sdpa"] = round(dense_ms * K / H / row["ms"], 3)
                except Exception as e:  # out of shared memory, register pressure: recorded, never chosen
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                print(f"  {tiles}: " + (f"{row['ms']:.3f} ms, eff {row['efficiency_vs_sdpa']}, err {row['rel_error']:.1e}"
                                        if "ms" in row else row["error"]) + ("" if row["ok"] else "  REJECTED"),
                      flush=True)
    best = {}
    for d in sorted({r["head_dim"] for r in rows}):
        totals = {}
        for r in (r for r in rows if r["head_dim"] == d):  # a candidate wrong or failing on any shape is out
            t = tuple(r["tiles"])
            if not r["ok"]:
                totals[t] = None
            elif totals.get(t, 0.0) is not None:
                totals[t] = totals.get(t, 0.0) + r["ms"]
        good = {t: ms for t, ms in totals.items() if ms is not None}
        if good:
            t = min(good, key=good.get)
            cur = good.get(tuple(tiles_for(d)))
            best[d] = dict(tiles=list(t), total_ms=round(good[t], 4),
                           current_tiles=list(tiles_for(d)), current_total_ms=None if cur is None else round(cur, 4))
    out = {"what": "routed_attention tile sweep: batch-1 prefill, routed pairs only, vs dense sdpa of every head",
           "dtype": str(dtype).removeprefix("torch."), "active": a.active, "device": str(device),
           "machine": machine(), "versions": versions(),
           "command": "python -m surgery_evals.tune_head_kernel " + " ".join(argv if argv is not None else sys.argv[1:]),
           "best": {str(d): b for d, b in best.items()}, "rows": rows}
    for d, b in best.items():
        print(f"best for d={d}: {b['tiles']} ({b['total_ms']} ms summed; current {b['current_tiles']}: "
              f"{b['current_total_ms']} ms)")
    if a.json_path:
        with open(a.json_path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    if a.best_out:
        with open(a.best_out, "w", encoding="utf-8") as f:
            f.write(";".join(f"{d}={','.join(map(str, b['tiles']))}" for d, b in best.items()) + "\n")
    return out


if __name__ == "__main__":
    main()
