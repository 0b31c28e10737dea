"""Benchmark: one MoE FFN layer, our kernels against dense and sparse baselines, written to a JSON file.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k.

Shapes: Llama-2-7B's FFN (D 4096, width 11008) cut into E16 K4 (F 688) and E8 K2 (F 1376), and Mixtral's
(D 4096, experts of width 14336, E8 K2). Implementations, all given the same random uniform top-k routing
(routing itself is not timed):
  dense       the full-width SwiGLU (width E*F) with torch matmuls: what the MoE replaces
  ideal       a dense SwiGLU of the active width K*F: what perfect sparsity would cost
  ours        surgery_kernels.ops.moe_ffn (Triton on GPU; the PyTorch reference on CPU)
  grouped_mm  torch._grouped_mm over expert-sorted tokens, when this torch has it
  loop        a Python loop over experts (the PyTorch reference, as transformers' Mixtral does)
  scattermoe  ScatterMoE's GLU MLP, only when `import scattermoe` works (never vendored)
ratio_to_dense / ratio_to_ideal = ms / ms of that baseline at the same shape and T (< 1: faster).
GPU: CUDA events, warmup then the median of repeats. CPU: the reference path only (rows labelled "ours",
top-level "path": "reference (CPU)"), small T.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn

IMPLS = ("dense", "ideal", "ours", "grouped_mm", "loop", "scattermoe")
# (label, D, dense width E*F, E, K)
SHAPES = [("llama2-7b", 4096, 11008, 16, 4), ("llama2-7b", 4096, 11008, 8, 2), ("mixtral", 4096, 14336 * 8, 8, 2)]
# Granularity: the demo model's FFN (D 576, width 1536) cut into ever smaller experts, half of them active:
# what finer experts cost the kernels (and the CPU reference) at equal active width.
GRANULARITY_SHAPES = [("smollm2", 576, 1536, E, E // 2) for E in (16, 48, 64, 96, 192)]
SHAPE_SETS = {"default": SHAPES, "granularity": GRANULARITY_SHAPES}
CPU_MAX_T = 128  # the reference on CPU: small T only
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _swiglu(x, gate, up, down):
    return Fn.linear(Fn.silu(Fn.linear(x, gate)) * Fn.linear(x, up), down)


def _random_routing(T, E, K, device):
    """Uniform top-k: K distinct experts per token, uniformly at random, weights 1/K."""
    ids = torch.rand(T, E, device=device).argsort(-1)[:, :K]
    return torch.full((T, K), 1.0 / K, device=device), ids


def _grouped_mm_ffn(x, gate_up_EDF2, down_EFD, w, ids):
    """Sort pairs by expert, two torch._grouped_mm calls, weight and scatter back."""
    T, K = ids.shape
    E = gate_up_EDF2.shape[0]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    xs = x[order // K]
    g, u = torch._grouped_mm(xs, gate_up_EDF2, offs=offs).chunk(2, dim=-1)
    ys = torch._grouped_mm(Fn.silu(g) * u, down_EFD, offs=offs)
    ys = ys.float() * w.reshape(-1)[order, None]
    return torch.zeros(T, x.shape[1], device=x.device).index_add_(0, order // K, ys).to(x.dtype)


def _timer(device, warmup, repeats):
    def run(fn):
        if device.type == "cuda":
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


def _available_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _impl_fns(impls, x, dense_w, ideal_w, experts, w, ids, cuda):
    """name -> zero-argument callable for each requested implementation that can run here."""
    from surgery_kernels import ops, reference

    gate, up, down = experts
    fns = {}
    if "dense" in impls:
        fns["dense"] = lambda: _swiglu(x, *dense_w)
    if "ideal" in impls:
        fns["ideal"] = lambda: _swiglu(x, *ideal_w)
    if "ours" in impls:
        impl = "triton" if cuda and ops.triton_available() else "reference"
        fns["ours"] = lambda: ops.moe_ffn(x, gate, up, down, w, ids, impl=impl)
    if not cuda:
        return fns
    if "grouped_mm" in impls and hasattr(torch, "_grouped_mm"):
        gate_up = torch.cat([gate, up], 1).transpose(1, 2)  # [E, D, 2F] as a column-major view
        down_t = down.transpose(1, 2)                       # [E, F, D]
        fns["grouped_mm"] = lambda: _grouped_mm_ffn(x, gate_up, down_t, w, ids)
    if "loop" in impls:
        fns["loop"] = lambda: reference.moe_ffn(x, gate, up, down, w, ids)
    if "scattermoe" in impls:
        try:
            fns["scattermoe"] = _scattermoe_fn(x, experts, w, ids)
        except Exception:  # not installed, or an API this code does not know: no row
            pass
    return fns


def _scattermoe_fn(x, experts, w, ids):
    import scattermoe  # noqa: F401
    from scattermoe.mlp import GLUMLP

    gate, up, down = experts
    E, F, D = gate.shape
    mlp = GLUMLP(input_size=D, hidden_size=F, num_experts=E, top_k=ids.shape[1], activation=torch.nn.SiLU())
    mlp = mlp.to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        mlp.experts.weight.copy_(torch.cat([gate, up], 1))
        mlp.output_experts.weight.copy_(down)
    return lambda: mlp(x, w.to(x.dtype), ids)


def _plan(device, tokens, quick, shapes=SHAPES):
    if device.type != "cuda":
        tokens = [t for t in tokens if t <= CPU_MAX_T]
        if quick and shapes is SHAPES:
            shapes, tokens = SHAPES[:1], [t for t in tokens if t <= 16][:2] or [1]
    elif quick:
        tokens = [t for t in tokens if t <= 1024]
    return shapes, tokens


def bench_kernels(json_path, device=None, tokens=(1, 16, 128, 1024, 8192, 32768), impls=None,
                  quick=False, shape_set: str = "default") -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    impls = tuple(impls or IMPLS)
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    if not cuda:
        impls = ("ours",)  # the reference path only, beside the dense and ideal anchors
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = _timer(device, warmup=2 if quick or not cuda else 5, repeats=3 if quick or not cuda else 20)
    shapes, tokens = _plan(device, list(tokens), quick, SHAPE_SETS[shape_set])
    rows, skipped = [], []
    g = torch.Generator(device=device).manual_seed(0)
    for label, D, width, E, K in shapes:
        F = width // E
        weight_bytes = (3 * D * width + 3 * D * K * F) * torch.finfo(dtype).bits // 8
        if weight_bytes > 0.7 * _available_bytes(device):
            skipped.append({"shape": label, "experts": E, "top_k": K, "reason": "weights do not fit in memory"})
            continue

        def rand(*shape, scale=0.02):
            return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

        experts = (rand(E, F, D), rand(E, F, D), rand(E, D, F))
        dense_w = (experts[0].reshape(E * F, D), experts[1].reshape(E * F, D),
                   experts[2].permute(1, 0, 2).reshape(D, E * F))
        ideal_w = (rand(K * F, D), rand(K * F, D), rand(D, K * F))
        for T in tokens:
            x = rand(T, D, scale=1.0)
            w, ids = _random_routing(T, E, K, device)
            fns = _impl_fns(set(impls) | {"dense", "ideal"}, x, dense_w, ideal_w, experts, w, ids, cuda)
            ms = {}
            for name, fn in fns.items():
                try:
                    with torch.no_grad():
                        ms[name] = timer(fn)
                except _OOM:
                    skipped.append({"shape": label, "experts": E, "top_k": K, "tokens": T, "impl": name,
                                    "reason": "out of memory"})
                    if cuda:
                        torch.cuda.empty_cache()
                except Exception as err:  # a baseline this torch / GPU cannot run: recorded, not fatal
                    if name == "ours":
                        raise
                    skipped.append({"shape": label, "experts": E, "top_k": K, "tokens": T, "impl": name,
                                    "reason": f"{type(err).__name__}: {str(err)[:200]}"})
            # dense and ideal are rows of their own too: the anchors every ratio is taken against
            for name in list(impls) + [a for a in ("dense", "ideal") if a not in impls]:
                if name not in ms:
                    continue
                rows.append({"shape": label, "experts": E, "top_k": K, "tokens": T, "impl": name,
                             "ms": ms[name],
                             "ratio_to_dense": ms[name] / ms["dense"] if "dense" in ms else None,
                             "ratio_to_ideal": ms[name] / ms["ideal"] if "ideal" in ms else None})
        del experts, dense_w, ideal_w
        if cuda:
            torch.cuda.empty_cache()
    from surgery_kernels import ops

    path = ("triton kernels" if ops.triton_available() else "reference (CUDA)") if cuda else "reference (CPU)"
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "versions": versions(),
        "path": path,
        "dtype": str(dtype).removeprefix("torch."),
        "quick": bool(quick),
        "shapes": shape_set,
        "routing": "uniform random top-k, weights 1/K",
        "rows": rows,
        "skipped": skipped,
    }
    from surgery.atomic import write_json

    write_json(json_path, result)
    return result
