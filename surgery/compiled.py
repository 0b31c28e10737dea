"""torch.compile for calibration: each decoder layer of the student and the teacher compiled for the training
step, so that the small element-wise work around the matmuls (norms, rotary, SiLU and products, routing, casts)
runs as fused kernels instead of one thread wake-up per op. On a 2-core CPU that work was more than half of an
end-to-end step (round 10's profile); compiled, the 50% structure's step took ~25% more tokens a second.

Each layer is compiled in place (`nn.Module.compile`: parameter names and checkpoints unchanged) and restored
to eager when the stage ends, so evaluation and inference take their own paths again. The 30 layers share one
compiled graph (same code, same shapes). The sorted MoE path's per-expert loop has data-dependent shapes; it
stays eager inside the compiled layer (kernels/reference.py `sorted_routed`).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
from torch import nn

from surgery.errors import SurgeryError

SETTINGS = ("auto", "on", "off")


def have_compiler() -> bool:
    """Inductor's CPU code needs a C++ compiler (CXX, else g++)."""
    return shutil.which(os.environ.get("CXX") or "g++") is not None


# Compiling the demo model's layers (student and teacher, forward and backward) takes ~20-30 s on 2 cores,
# about ten eager steps: under "auto" a stage shorter than this stays eager.
MIN_STEPS = 64


def compile_on(setting: str, device: torch.device, steps: int, *, sharded: bool = False, transition: bool = False,
               lora: bool = False, heads: bool = False) -> bool:
    """Whether the end-to-end stage compiles its layers. "auto": on a CPU with a C++ compiler, single process,
    for stages of at least MIN_STEPS steps (the compile must pay for itself), for plain converted models (no
    LoRA adapters, no head experts: untested compiled), and not under the transition schedule (its top-k and
    unit-weight mix change every step, and each change recompiles). GPUs stay eager under "auto" (not measured
    there). "on" compiles whatever the model. `setting` is one of SETTINGS (EndToEndConfig checks it)."""
    if setting == "off":
        return False
    if setting == "on":
        if sharded:
            raise SurgeryError("e2e.compile on: not under torchrun (the sharded layers run eager)")
        if device.type == "cpu" and not have_compiler():
            raise SurgeryError("e2e.compile on: torch.compile on CPU needs a C++ compiler (set CXX or install g++)")
        return True
    return (device.type == "cpu" and steps >= MIN_STEPS and not sharded and not transition and not lora
            and not heads and have_compiler())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    return list(getattr(inner, "layers", []))


@contextlib.contextmanager
def compiled_layers(models: list[nn.Module], on: bool = True):
    """Every decoder layer of `models` compiled while the context lasts, eager again after it."""
    layers = [l for m in models for l in decoder_layers(m)] if on else []
    try:
        for l in layers:
            l.compile(dynamic=False)
        yield bool(layers)
    finally:
        for l in layers:
            l._compiled_call_impl = None  # what nn.Module.compile set: the eager forward again
