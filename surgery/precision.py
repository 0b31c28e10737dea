"""Precision: where calibration and sampling run in bfloat16, decided from the device and one setting.

A bfloat16 matmul is ~2x float32 on GPUs and on CPUs with AMX or AVX-512 BF16, and ~8x slower on CPUs that
emulate it; what pays off under bf16 then differs by model part (Precision says which).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import SurgeryError


@functools.cache
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls beat float32 here: on GPUs, and on CPUs with AMX or AVX-512 BF16 (~2x). On a
    CPU without them (AMD EPYC without AVX-512, say) oneDNN emulates bf16 and a matmul runs ~8x slower."""
    if device.type == "cuda":
        return True
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_on(setting, device: torch.device) -> bool:
    if setting in (True, "on"):
        return True
    if setting in (False, "off", None):
        return False
    if setting == "auto":
        return fast_bf16(device)
    raise SurgeryError(f"autocast {setting!r}: choose auto, on or off")


@dataclass
class Precision:
    """Where calibration uses bfloat16. A GPU, or autocast "on": autocast for both models (and the lm_head) and
    for layer-wise block training. A CPU where bf16 matmuls are fast (AMX / AVX-512 BF16), under "auto": the
    teacher as a bfloat16 copy (its forward 3x faster than float32 on 2 Sapphire-Rapids-class cores), the
    lm_head matmuls of the chunked KD in bfloat16 (2.6x), and the student under autocast with the MoE path
    chosen for it (moe.training_impl(bf16=True): the masked path's large matmuls, or the sorted path with its
    routed experts in float32; a student forward + backward of E10 K2 1.46 s against 2.07 s float32); its
    weights and AdamW states stay float32. Layer-wise block training stays float32 there (4,096 tokens of
    E10 K2: 92.7 s under autocast, 69.9 s float32). "off", or a CPU without fast bf16: float32 throughout."""
    student_autocast: bool
    teacher_autocast: bool
    teacher_dtype: torch.dtype | None  # run a copy of the teacher in this dtype (None: the teacher as given)
    head_dtype: torch.dtype
    layerwise_autocast: bool


def precision_plan(setting, device: torch.device, sharded: bool = False) -> Precision:
    """`sharded`: the models are FSDP2-sharded under torchrun, where a CPU under "auto" stays float32 (no bf16
    teacher copy is made of sharded weights, and the student's bf16 path is untested there)."""
    on = autocast_on(setting, device)
    if on and (setting in (True, "on") or device.type != "cpu"):
        return Precision(True, True, None, torch.bfloat16, True)
    if on and not sharded:
        return Precision(True, False, torch.bfloat16, torch.bfloat16, False)
    return Precision(False, False, None, torch.float32, False)


def full_precision(t: torch.Tensor):
    """A context where autocast is off for t's device, if it was on (routing is decided in float32); a no-op
    elsewhere (on meta tensors torch.autocast itself raises)."""
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
