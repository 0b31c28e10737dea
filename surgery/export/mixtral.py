"""mixtral: MixtralForCausalLM, loadable by stock transformers with no custom code.

Name map (the per-expert layout Mixtral checkpoints have always used; transformers 5 fuses the experts in
memory when it loads them, 4.x uses them as they are):
    mlp.router.weight [E, D]              -> block_sparse_moe.gate.weight
    mlp.experts.gate_proj[j] [F, D]       -> block_sparse_moe.experts.{j}.w1.weight
    mlp.experts.up_proj[j]   [F, D]       -> block_sparse_moe.experts.{j}.w3.weight
    mlp.experts.down_proj[j] [D, F]       -> block_sparse_moe.experts.{j}.w2.weight   (times the routing scale)
    everything else                       -> same name

Mixtral's router is fixed: softmax over all experts, top-k, renormalised to sum 1. Our `scale` multiplies
every routing weight, so it is folded into w2. No sigmoid scoring.

Unequal expert widths: our stacked experts are already zero-padded to the widest (zero w1/w3 rows, zero w2
columns add exactly nothing); the written width is rounded up to a multiple of 8 with more zero neurons
(common.EXPERT_ALIGN, for stock transformers' grouped matmul; load_exported trims them again).

Shared experts (Mixtral has no slot for them): the shared MLP (several shared experts are one MLP of their summed
width) is appended to every routed expert, w1/w3 rows [F, F+S) and w2 columns [F, F+S), unscaled. Exact because
the renormalised top-k weights sum to 1: sum_j w_j (scale d_j h_j + d_s h_s) = scale sum_j w_j d_j h_j + d_s h_s.
The price is compute: each token runs the shared MLP top_k times; --format qwen2_moe keeps it separate.
"""

from __future__ import annotations

import torch

from surgery.config import MoEConfig
from surgery.errors import SurgeryError
from surgery.export.common import (Planned, aligned, check_common, decoder_checks, decoder_fields, pad_neurons,
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


def card_note(moe: MoEConfig) -> str | None:
    if not moe.shared_width:
        return None
    return (f"Mixtral has no shared expert: this model's shared MLP (width {moe.shared_width}) is appended to every "
            f"routed expert (experts of width {moe.expert_width} + {moe.shared_width}). Exact, since the top-k "
            f"routing weights sum to 1, but each token computes the shared MLP {moe.top_k} times; the qwen2_moe "
            "export keeps it separate and is faster.")


def _width(moe: MoEConfig) -> int:
    return aligned(moe.expert_width + moe.shared_width)


def fold_scale(moe: MoEConfig) -> float:
    return moe.routing.scale


def config(model, moe: MoEConfig, base: dict, dtype: torch.dtype) -> dict:
    return {
        **decoder_fields(base, ARCHITECTURE, MODEL_TYPE),
        "intermediate_size": _width(moe),  # Mixtral's experts are `intermediate_size` wide (shared MLP appended)
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
            "num_experts_per_tok": moe.top_k, "intermediate_size": _width(moe), "hidden_act": "silu"}


def tensors(model, moe: MoEConfig, dtype: torch.dtype) -> list[Planned]:
    plan = non_moe_tensors(model, dtype)
    E, F, D = moe.num_experts, _width(moe), model.config.hidden_size
    scale = fold_scale(moe)

    def expert(b, j, proj):  # in float32, one cast at the end: a folded factor rounds once
        t = getattr(b.experts, proj)[j].detach().float()
        if proj == "down_proj":
            t = scaled(t, scale, torch.float32)
        if b.shared_expert is not None:
            t = torch.cat([t, getattr(b.shared_expert, proj).weight.detach().float()], dim=1 if proj == "down_proj" else 0)
        return pad_neurons(t, F, 1 if proj == "down_proj" else 0).to(dtype)

    for i, layer in enumerate(model.model.layers):
        b, p = layer.mlp, f"model.layers.{i}.block_sparse_moe"
        plan.append(Planned(f"{p}.gate.weight", (E, D), dtype, lambda b=b: b.router.weight.detach().to(dtype)))
        for j in range(E):
            e = f"{p}.experts.{j}"
            plan += [
                Planned(f"{e}.w1.weight", (F, D), dtype, lambda b=b, j=j: expert(b, j, "gate_proj")),
                Planned(f"{e}.w3.weight", (F, D), dtype, lambda b=b, j=j: expert(b, j, "up_proj")),
                Planned(f"{e}.w2.weight", (D, F), dtype, lambda b=b, j=j: expert(b, j, "down_proj")),
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
