"""Calibrate: low-rank adapters (peft's LoRA) on a converted model's non-MoE weights, for e2e.train=lora.

Training every decoder weight (e2e.train=all) keeps an AdamW state twice the size of the attention weights;
for a model near the memory limit that is what does not fit. With `lora` the MoE blocks train in full as
with `moe`, and each attention projection (q, k, v, o) gets a rank-r adapter instead, which costs
2 r (in + out) parameters per projection. The adapters are merged into the projection weights when the stage
ends, so the saved model is an ordinary converted model: same files, no peft needed to load or export it.
"""

from __future__ import annotations

import torch.nn as nn

from surgery.errors import SurgeryError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
KEY = "lora_"  # in the state-dict names of the adapters' weights (checkpoints keep them)


def attach(model: nn.Module, rank: int, alpha: float):
    """Inject rank-`rank` adapters (scale alpha / rank, B initialised to zero: the model is unchanged) into
    every attention projection of `model`, in place. Returns the handle that `merge` takes."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError:
        raise SurgeryError("e2e.train lora needs peft: pip install 'surgery[lora]' (or pip install peft)") from None
    if rank < 1:
        raise SurgeryError(f"e2e.lora_rank {rank}: must be at least 1")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=TARGETS)
    return LoraModel(model, cfg, "default")


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if KEY in n]


def merge(handle) -> nn.Module:
    """Fold every adapter into its projection's weight and put the plain nn.Linear back (in place)."""
    return handle.merge_and_unload()


def merged_weights(state: dict, rank: int, alpha: float) -> dict:
    """From a state dict holding adapters (`....q_proj.base_layer.weight`, `lora_A.default`, `lora_B.default`):
    each adapted projection's merged weight under its plain name (`....q_proj.weight`), W + alpha/rank B A, as
    `merge` would leave it. For snapshots taken mid-run, which load into a model without adapters."""
    out = {}
    for key, w in state.items():
        if not key.endswith(".base_layer.weight"):
            continue
        stem = key[: -len(".base_layer.weight")]
        a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
        out[f"{stem}.weight"] = (w.float() + (alpha / rank) * (b.float() @ a.float())).to(w.dtype)
    return out
