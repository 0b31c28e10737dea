"""Conversion of the attention side: plan the head experts (HeadConfig) and make their new tensors.

The query, key, value and output projections are copied unchanged (same names); a `learned` router adds
`model.layers.{i}.self_attn.router.weight` [R, D] and `.bias` [R] per layer, fitted on profiled head statistics
when given (least squares onto log head output norms), zeros otherwise. Shared heads: the S heads with the
largest mean squared output contribution on profiled data, else the first S.
"""

from __future__ import annotations

import torch

from surgery.attention.config import HeadConfig
from surgery.attention.router import choose_shared, fit_router
from surgery.errors import SurgeryError
from surgery.safetensors_io import TensorSpec


def default_top_k(heads: int, shared: int) -> int:
    """75% of the query heads active (MoH's setting), at least one routed head."""
    return max(1, min(heads - shared, round(0.75 * heads) - shared))


def plan_heads(base: dict, top_k: int | None, shared_heads: int, router: str, stats: dict | None,
               attention_fn: str = "softmax") -> HeadConfig:
    H = base["num_attention_heads"]
    G = base.get("num_key_value_heads") or H
    layers = base["num_hidden_layers"]
    if top_k is None:
        top_k = default_top_k(H, shared_heads)
    hc = HeadConfig(heads=H, kv_heads=G, top_k=top_k, shared_heads=shared_heads, router=router,
                    attention_fn=attention_fn)
    hc.validate()
    if stats:
        missing = [i for i in range(layers) if i not in stats]
        if missing:
            raise SurgeryError(f"head statistics lack layer {missing[0]} (profile of another model?)")
        if stats[0].out_norms.shape[1] != H:
            raise SurgeryError(f"head statistics have {stats[0].out_norms.shape[1]} heads, the model {H}")
        hc.shared = [choose_shared(stats[i].contribution, shared_heads) for i in range(layers)]
        hc.init = "profile"
    else:
        hc.shared = [choose_shared(None, shared_heads) for _ in range(layers)]
        hc.init = "first" if router == "qnorm" else "first+zeros"
    return hc


def router_names(layer: int) -> list[str]:
    return [f"model.layers.{layer}.self_attn.router.weight", f"model.layers.{layer}.self_attn.router.bias"]


def head_specs(hc: HeadConfig, layers: int, hidden: int, dtype: torch.dtype) -> list[TensorSpec]:
    if hc.router != "learned":
        return []
    specs = []
    for i in range(layers):
        w, b = router_names(i)
        specs += [TensorSpec(w, (hc.routable, hidden), dtype), TensorSpec(b, (hc.routable,), dtype)]
    return specs


def router_tensors(hc: HeadConfig, layer: int, hidden: int, stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned router of one layer in float32: fitted on the profiled heads, or zeros."""
    if stats:
        s = stats[layer]
        return fit_router(s.inputs.float(), s.out_norms[:, hc.routed_of(layer)])
    return torch.zeros(hc.routable, hidden), torch.zeros(hc.routable)


def head_makers(hc: HeadConfig, layers: int, hidden: int, stats: dict | None) -> dict:
    """{tensor name: () -> tensor} for the streaming writer."""
    makers = {}
    if hc.router == "learned":
        for i in range(layers):
            w, b = router_names(i)
            cache = {}

            def make(which, i=i, cache=cache):
                if not cache:
                    cache["w"], cache["b"] = router_tensors(hc, i, hidden, stats)
                return cache.pop(which)

            makers[b] = lambda make=make: make("b")  # natural order writes .bias before .weight
            makers[w] = lambda make=make: make("w")
    return makers


def convert_heads(model, hc: HeadConfig, stats: dict | None = None) -> None:
    """In memory: install head experts on `model` (dense attention) and set their routers."""
    from surgery.attention.heads import head_expert_modules, install_head_experts

    install_head_experts(model, hc)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for i, attn in enumerate(head_expert_modules(model)):
            if attn.router is not None:
                w, b = router_tensors(hc, i, hidden, stats)
                attn.router.weight.copy_(w)
                attn.router.bias.copy_(b)


def summary(hc: HeadConfig) -> dict:
    return {"attention_experts": True, "heads": hc.heads, "kv_heads": hc.kv_heads, "attention_top_k": hc.top_k,
            "shared_heads": hc.shared_heads, "head_router": hc.router, "head_init": hc.init,
            "active_head_fraction": round(hc.active_fraction, 6), "attention_fn": hc.attention_fn}
