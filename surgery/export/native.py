"""native: our own format again (config.json = base config + `surgery` block), optionally in another dtype.

Name map: the identity (the model's state dict, minus a tied lm_head). Config map: the base config, the
`surgery` block unchanged (routing scale included: nothing is folded) and the export block.
"""

from __future__ import annotations

import torch

from surgery.export.common import Planned

FORMAT = "native"
MODEL_TYPE = None  # keeps the source's (llama / mistral)


def check(model, moe, base: dict) -> None:
    """Everything the converted model holds is native: nothing to refuse."""


def fold_scale(moe) -> float:
    return 1.0  # the routing scale stays in the `surgery` block


def architecture(base: dict) -> str:
    return (base.get("architectures") or ["LlamaForCausalLM"])[0]


def config(model, moe, base: dict, dtype: torch.dtype) -> dict:
    cfg = dict(base)
    cfg["surgery"] = moe.to_dict()
    return cfg


def tensors(model, moe, dtype: torch.dtype) -> list[Planned]:
    tied = model.config.tie_word_embeddings
    plan = []
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        out = dtype if t.is_floating_point() else t.dtype
        plan.append(Planned(name, tuple(t.shape), out, lambda t=t, out=out: t.to(out)))
    return plan
