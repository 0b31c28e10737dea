"""Entry points the model calls: the Triton path on CUDA when available, else the PyTorch reference.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, S shared width.

Triton is imported lazily, so importing this module never needs it (CPU installs have no triton).
impl: "auto"      Triton when the input is on CUDA and triton imports; on CPU the inference path
                  (cpu_moe) when no gradient is wanted, else the reference
      "triton"    always Triton (on CPU this needs TRITON_INTERPRET=1, set before triton is imported)
      "reference" always the PyTorch reference
      "masked"    the reference's function computed densely with a routing mask (CPU calibration, small experts)
      "sorted"    the reference's function, pairs sorted by expert, one gather and one scatter-add (CPU
                  calibration, wide experts; surgery.moe.training_impl chooses between the two)
      "cpu"       kernels/cpu_moe.py: forward only, no autograd (speed on CPU; any device works)
Under torch.compile on CPU, "auto" and "cpu" take the masked function (one graph, no host syncs), or for one
token the gathered one (only its experts' weights read).
The Triton, reference, masked and sorted paths are differentiable (the Triton path's backward recomputes through the
reference).
"""

from __future__ import annotations

import functools

import torch

from . import reference

IMPLS = ("auto", "triton", "reference", "masked", "sorted", "cpu")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    if impl == "auto":
        return t.is_cuda and triton_available()
    if impl == "triton" and not triton_available():
        raise RuntimeError("impl='triton' needs the triton package (pip install 'surgery[gpu]')")
    return impl == "triton"


def _wants_grad(x_TD, gate_EFD, up_EFD, down_EDF, shared, weights_TK=None) -> bool:
    """True when autograd would record this call (so it must take a differentiable path). The routing
    weights count: training only router rows (surgery extend's L2R stage) needs their gradient."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in (x_TD, gate_EFD, up_EFD, down_EDF, *(shared or ()))
               if t is not None) or (weights_TK is not None and weights_TK.requires_grad)


def route(logits_TE: torch.Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
          scale: float = 1.0, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK float32, ids_TK int64): top-k of softmax/sigmoid scores, optionally renormalised, scaled."""
    if _use_triton(logits_TE, impl):
        from . import triton_moe

        return triton_moe.route(logits_TE, top_k, score_func, renormalize, scale)
    if impl in ("auto", "cpu") and not logits_TE.is_cuda and not (torch.is_grad_enabled() and logits_TE.requires_grad):
        from . import cpu_moe

        return cpu_moe.route(logits_TE, top_k, score_func, renormalize, scale)
    return reference.route(logits_TE, top_k, score_func, renormalize, scale)


def moe_ffn(x_TD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor,
            weights_TK: torch.Tensor, ids_TK: torch.Tensor, shared=None, impl: str = "auto") -> torch.Tensor:
    """y[t] = sum_k weights[t,k] * expert_{ids[t,k]}(x[t]) (+ shared SwiGLU(x[t])), in x's dtype."""
    if not x_TD.is_cuda and impl in ("auto", "cpu") and torch.compiler.is_compiling():
        # Under torch.compile on CPU: the masked function, plain tensor ops the compiler fuses into one graph.
        # The CPU path's cached weight packing and host syncs would break the graph at every layer (and its
        # per-layer recompiles hit the compiler's limit, leaving the model eager). One token reads only its
        # experts (the shapes are static under compile, so this is decided at trace time).
        fn = reference.moe_ffn_one_token if x_TD.shape[0] == 1 else reference.moe_ffn_masked
        return fn(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared)
    if _use_triton(x_TD, impl):
        from . import triton_moe

        return triton_moe.moe_ffn(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared)
    if impl == "cpu" or (impl == "auto" and not x_TD.is_cuda and not _wants_grad(x_TD, gate_EFD, up_EFD,
                                                                                down_EDF, shared, weights_TK)):
        from . import cpu_moe

        return cpu_moe.moe_ffn(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared)
    if impl == "masked":
        return reference.moe_ffn_masked(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared)
    if impl == "sorted":
        return reference.moe_ffn_sorted(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared)
    return reference.moe_ffn(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared)
