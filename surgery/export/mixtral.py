"""mixtral: MixtralForCausalLM, loadable by stock transformers with no custom code.

Name map (the per-expert layout Mixtral checkpoints have always used; transformers 5 fuses the experts in
memory when it loads them, 4.x uses them as they are):
    mlp.router.weight [E, D]              -> block_sparse_moe.gate.weight
    mlp.experts.gate_proj[j] [F, D]       -> block_sparse_moe.experts.{j}.w1.weight
    mlp.experts.up_proj[j]   [F, D]       -> block_sparse_moe.experts.{j}.w3.weight
    mlp.experts.down_proj[j] [D, F]       -> block_sparse_moe.experts.{j}.w2.weight   (times the routing scale)
    everything else                       -> same name

Mixtral's router is fixed: softmax over all experts, top-k, renormalised to sum 1. Our `scale` multiplies
every routing weight, so it is folded into w2. No shared experts, no unequal widths, no sigmoid scoring.
"""

from __future__ import annotations

import torch

from surgery.config import MoEConfig
from surgery.errors import SurgeryError
from surgery.export.common import (Planned, check_common, check_equal_experts, decoder_checks, decoder_fields,
                                   llama_config_from, non_moe_tensors,
                                   rope_scaling_field, scaled, stack, take)
from surgery.router import RoutingConfig

FORMAT = "mixtral"
MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"


def architecture(base: dict) -> str:
    return ARCHITECTURE


def check(model, moe: MoEConfig, base: dict) -> None:
    check_common(base, FORMAT)
    if moe.shared_width:
        raise SurgeryError(
            f"--format mixtral: this model has {moe.shared_experts or 1} shared (always-on) expert(s) of width "
            f"{moe.shared_width}, and Mixtral has no shared expert; export it with --format qwen2_moe "
            "(Qwen2-MoE has a shared expert) or --format native")
    check_equal_experts(moe, FORMAT)
    r = moe.routing
    if r.score_func != "softmax":
        raise SurgeryError(
            f"--format mixtral: this model's router scores experts with {r.score_func}, Mixtral (and Qwen2-MoE) "
            "only with a softmax over all experts; export it with --format native")
    if not r.renormalize:
        raise SurgeryError(
            "--format mixtral: Mixtral always renormalises the top-k softmax weights to sum 1, and this model "
            "does not (converted with --no-renormalize); export it with --format qwen2_moe "
            "(norm_topk_prob=false) or --format native")


def fold_scale(moe: MoEConfig) -> float:
    return moe.routing.scale


def config(model, moe: MoEConfig, base: dict, dtype: torch.dtype) -> dict:
    return {
        **decoder_fields(base, ARCHITECTURE, MODEL_TYPE),
        "intermediate_size": moe.expert_width,  # Mixtral's experts are `intermediate_size` wide
        "sliding_window": base.get("sliding_window"),
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        **rope_scaling_field(base),
    }


def config_checks(base: dict, moe: MoEConfig) -> dict:
    """Fields of the loaded MixtralConfig that must come out exactly so (verified before writing)."""
    return {**decoder_checks(base), "sliding_window": base.get("sliding_window"), "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "intermediate_size": moe.expert_width, "hidden_act": "silu"}


def tensors(model, moe: MoEConfig, dtype: torch.dtype) -> list[Planned]:
    plan = non_moe_tensors(model, dtype)
    E, F, D = moe.num_experts, moe.expert_width, model.config.hidden_size
    scale = fold_scale(moe)
    for i, layer in enumerate(model.model.layers):
        b, p = layer.mlp, f"model.layers.{i}.block_sparse_moe"
        plan.append(Planned(f"{p}.gate.weight", (E, D), dtype, lambda b=b: b.router.weight.detach().to(dtype)))
        for j in range(E):
            e = f"{p}.experts.{j}"
            plan += [
                Planned(f"{e}.w1.weight", (F, D), dtype, lambda b=b, j=j: b.experts.gate_proj[j].detach().to(dtype)),
                Planned(f"{e}.w3.weight", (F, D), dtype, lambda b=b, j=j: b.experts.up_proj[j].detach().to(dtype)),
                Planned(f"{e}.w2.weight", (D, F), dtype,
                        lambda b=b, j=j: scaled(b.experts.down_proj[j].detach(), scale, dtype)),
            ]
    return plan


def from_exported(cfg: dict, state: dict, where: str) -> tuple[dict, MoEConfig, dict]:
    """A Mixtral folder's config and tensors -> our llama config, MoEConfig (no block: derived) and state.
    Reads both the per-expert layout above and the fused one (mlp.experts.gate_up_proj / down_proj)."""
    E, K, L = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
    F = cfg["intermediate_size"]
    ours = {}
    for i in range(L):
        p, q = f"model.layers.{i}.block_sparse_moe", f"model.layers.{i}.mlp"
        if f"{q}.experts.gate_up_proj" in state:  # fused (transformers 5 in-memory) layout
            gate_up = take(state, f"{q}.experts.gate_up_proj", where)
            gate, up = gate_up[:, :F], gate_up[:, F:]
            down = take(state, f"{q}.experts.down_proj", where)
            router = take(state, f"{q}.gate.weight", where)
        else:
            base = p if f"{p}.gate.weight" in state else q
            router = take(state, f"{base}.gate.weight", where)
            gate = stack(state, [f"{base}.experts.{j}.w1.weight" for j in range(E)], where)
            up = stack(state, [f"{base}.experts.{j}.w3.weight" for j in range(E)], where)
            down = stack(state, [f"{base}.experts.{j}.w2.weight" for j in range(E)], where)
        ours.update({f"{q}.router.weight": router, f"{q}.experts.gate_proj": gate.contiguous(),
                     f"{q}.experts.up_proj": up.contiguous(), f"{q}.experts.down_proj": down})
    leftover = [k for k in state if ".block_sparse_moe." in k or ".mlp." in k]
    if leftover:
        raise SurgeryError(f"{where}: unexpected tensor {leftover[0]}")
    ours.update(state)
    routing = RoutingConfig(top_k=K, score_func="softmax", renormalize=True, scale=1.0)
    moe = MoEConfig(num_experts=E, routing=routing, expert_sizes=[F] * E, method="imported", source=where)
    return llama_config_from(cfg, E * F), moe, ours
