"""qwen2_moe: Qwen2MoeForCausalLM, loadable by stock transformers with no custom code.

Name map (per-expert, as Qwen2-MoE checkpoints are published; transformers 5 fuses the experts on load):
    mlp.router.weight [E, D]           -> mlp.gate.weight
    mlp.experts.gate_proj[j] [F, D]    -> mlp.experts.{j}.gate_proj.weight
    mlp.experts.up_proj[j]   [F, D]    -> mlp.experts.{j}.up_proj.weight
    mlp.experts.down_proj[j] [D, F]    -> mlp.experts.{j}.down_proj.weight          (times the routing scale)
    mlp.shared_expert.{gate,up}_proj   -> mlp.shared_expert.{gate,up}_proj.weight
    mlp.shared_expert.down_proj        -> mlp.shared_expert.down_proj.weight         (times 2, see below)
    (none)                             -> mlp.shared_expert_gate.weight [1, D]       zeros
    (none)                             -> self_attn.{q,k,v}_proj.bias                zeros
    everything else                    -> same name

Qwen2-MoE multiplies its shared expert by sigmoid(shared_expert_gate(x)); zero gate weights make that 0.5
for every token, and the 2 is folded into the shared down projection (exact: a power of two). Its router is
a softmax over all experts, top-k, renormalised iff norm_topk_prob; our `scale` is folded into the experts'
down projections. Without shared experts the shared expert is written with width 0 (zero-sized tensors).
Several shared experts are our one shared MLP of their summed width. Unequal expert widths: our stacked experts
are zero-padded to the widest (zero gate/up rows and down columns add exactly nothing) and written as they are,
moe_intermediate_size being that width rounded up to a multiple of 8 (common.EXPERT_ALIGN, for stock
transformers' grouped matmul; load_exported trims the zero neurons again).
Qwen2-MoE's attention always has q/k/v biases in transformers 4.x: zeros add nothing.
"""

from __future__ import annotations

import torch

from surgery.config import MoEConfig
from surgery.errors import SurgeryError
from surgery.export.common import (Planned, aligned, check_common, decoder_checks, decoder_fields, pad_neurons,
                                   head_dim, llama_config_from,
                                   non_moe_tensors, rope_scaling_field,
                                   scaled, stack, take)
from surgery.router import RoutingConfig

FORMAT = "qwen2_moe"
MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"
SHARED_FACTOR = 2.0  # 1 / sigmoid(0)


def architecture(base: dict) -> str:
    return ARCHITECTURE


def check(model, moe: MoEConfig, base: dict) -> None:
    check_common(base, FORMAT)
    if moe.routing.score_func != "softmax":
        raise SurgeryError(
            f"--format qwen2_moe: this model's router scores experts with {moe.routing.score_func}, Qwen2-MoE "
            "(and Mixtral) only with a softmax over all experts; export it with --format native")


def fold_scale(moe: MoEConfig) -> float:
    return moe.routing.scale


def _layer_types(base: dict) -> list[str]:
    kind = "sliding_attention" if base.get("sliding_window") else "full_attention"
    return [kind] * base["num_hidden_layers"]


def config(model, moe: MoEConfig, base: dict, dtype: torch.dtype) -> dict:
    window = base.get("sliding_window")
    return {
        **decoder_fields(base, ARCHITECTURE, MODEL_TYPE),
        "intermediate_size": base["intermediate_size"],  # only dense layers would use it: there are none
        "use_sliding_window": bool(window),
        "sliding_window": window or None,
        "max_window_layers": base["num_hidden_layers"],
        "layer_types": _layer_types(base),
        "qkv_bias": True,
        "decoder_sparse_step": 1,  # every layer is an MoE layer
        "mlp_only_layers": [],
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": aligned(moe.expert_width),
        "shared_expert_intermediate_size": moe.shared_width,
        "norm_topk_prob": bool(moe.routing.renormalize),
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        **rope_scaling_field(base),
    }


def config_checks(base: dict, moe: MoEConfig) -> dict:
    window = base.get("sliding_window")
    return {**decoder_checks(base), "layer_types": _layer_types(base), "sliding_window": window or 0,
            "qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "moe_intermediate_size": aligned(moe.expert_width),
            "shared_expert_intermediate_size": moe.shared_width, "norm_topk_prob": bool(moe.routing.renormalize),
            "hidden_act": "silu"}


def tensors(model, moe: MoEConfig, dtype: torch.dtype) -> list[Planned]:
    plan = non_moe_tensors(model, dtype)
    cfg = model.config
    E, F, S, D = moe.num_experts, aligned(moe.expert_width), moe.shared_width, cfg.hidden_size
    hd = head_dim(cfg.to_dict())
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    scale = fold_scale(moe)
    zeros = lambda *shape: (lambda: torch.zeros(shape, dtype=dtype))  # noqa: E731
    for i, layer in enumerate(model.model.layers):
        a = f"model.layers.{i}.self_attn"
        plan += [Planned(f"{a}.q_proj.bias", (cfg.num_attention_heads * hd,), dtype, zeros(cfg.num_attention_heads * hd)),
                 Planned(f"{a}.k_proj.bias", (kv * hd,), dtype, zeros(kv * hd)),
                 Planned(f"{a}.v_proj.bias", (kv * hd,), dtype, zeros(kv * hd))]
        b, p = layer.mlp, f"model.layers.{i}.mlp"
        plan.append(Planned(f"{p}.gate.weight", (E, D), dtype, lambda b=b: b.router.weight.detach().to(dtype)))
        for j in range(E):
            e = f"{p}.experts.{j}"
            plan += [
                Planned(f"{e}.gate_proj.weight", (F, D), dtype,
                        lambda b=b, j=j: pad_neurons(b.experts.gate_proj[j].detach().to(dtype), F, 0)),
                Planned(f"{e}.up_proj.weight", (F, D), dtype,
                        lambda b=b, j=j: pad_neurons(b.experts.up_proj[j].detach().to(dtype), F, 0)),
                Planned(f"{e}.down_proj.weight", (D, F), dtype,
                        lambda b=b, j=j: pad_neurons(scaled(b.experts.down_proj[j].detach(), scale, dtype), F, 1)),
            ]
        s = f"{p}.shared_expert"
        if S:
            se = b.shared_expert
            plan += [
                Planned(f"{s}.gate_proj.weight", (S, D), dtype, lambda se=se: se.gate_proj.weight.detach().to(dtype)),
                Planned(f"{s}.up_proj.weight", (S, D), dtype, lambda se=se: se.up_proj.weight.detach().to(dtype)),
                Planned(f"{s}.down_proj.weight", (D, S), dtype,
                        lambda se=se: scaled(se.down_proj.weight.detach(), SHARED_FACTOR, dtype)),
            ]
        else:  # Qwen2-MoE always builds a shared expert: width 0 computes exactly nothing
            plan += [Planned(f"{s}.gate_proj.weight", (0, D), dtype, zeros(0, D)),
                     Planned(f"{s}.up_proj.weight", (0, D), dtype, zeros(0, D)),
                     Planned(f"{s}.down_proj.weight", (D, 0), dtype, zeros(D, 0))]
        plan.append(Planned(f"{p}.shared_expert_gate.weight", (1, D), dtype, zeros(1, D)))
    return plan


def from_exported(cfg: dict, state: dict, where: str) -> tuple[dict, MoEConfig, dict]:
    """A Qwen2-MoE folder -> our llama config, MoEConfig and state. Refuses what our MoE block cannot
    compute: dense layers, a learned shared-expert gate, non-zero q/k/v biases, mixed sliding layers."""
    L, E, K = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    F, S = cfg["moe_intermediate_size"], cfg.get("shared_expert_intermediate_size", 0)
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise SurgeryError(f"{where}: some layers are dense (decoder_sparse_step / mlp_only_layers); surgery "
                           "loads Qwen2-MoE models whose every layer is an MoE layer")
    types = set(cfg.get("layer_types") or [])
    if len(types) > 1:
        raise SurgeryError(f"{where}: mixes sliding-window and full-attention layers, which surgery cannot load")
    ours = {}
    for i in range(L):
        a = f"model.layers.{i}.self_attn"
        for proj in ("q_proj", "k_proj", "v_proj"):
            bias = state.pop(f"{a}.{proj}.bias", None)
            if bias is not None and bias.count_nonzero():
                raise SurgeryError(f"{where}: {a}.{proj}.bias is not zero; surgery's attention has no biases")
        p = f"model.layers.{i}.mlp"
        if f"{p}.experts.gate_up_proj" in state:  # fused (transformers 5 in-memory) layout
            gate_up = take(state, f"{p}.experts.gate_up_proj", where)
            gate, up = gate_up[:, :F], gate_up[:, F:]
            down = take(state, f"{p}.experts.down_proj", where)
        else:
            gate = stack(state, [f"{p}.experts.{j}.gate_proj.weight" for j in range(E)], where)
            up = stack(state, [f"{p}.experts.{j}.up_proj.weight" for j in range(E)], where)
            down = stack(state, [f"{p}.experts.{j}.down_proj.weight" for j in range(E)], where)
        ours.update({f"{p}.router.weight": take(state, f"{p}.gate.weight", where),
                     f"{p}.experts.gate_proj": gate.contiguous(), f"{p}.experts.up_proj": up.contiguous(),
                     f"{p}.experts.down_proj": down})
        shared_gate = take(state, f"{p}.shared_expert_gate.weight", where)
        if shared_gate.count_nonzero():
            raise SurgeryError(f"{where}: {p}.shared_expert_gate is a learned gate (non-zero weights); surgery's "
                               "shared expert is always on with weight 1 and cannot represent it")
        shared = [take(state, f"{p}.shared_expert.{w}.weight", where) for w in ("gate_proj", "up_proj", "down_proj")]
        if S:
            ours[f"{p}.shared_expert.gate_proj.weight"] = shared[0]
            ours[f"{p}.shared_expert.up_proj.weight"] = shared[1]
            ours[f"{p}.shared_expert.down_proj.weight"] = scaled(shared[2], 1 / SHARED_FACTOR, shared[2].dtype)
    leftover = [k for k in state if ".mlp." in k]
    if leftover:
        raise SurgeryError(f"{where}: unexpected tensor {leftover[0]}")
    ours.update(state)
    routing = RoutingConfig(top_k=K, score_func="softmax", renormalize=bool(cfg.get("norm_topk_prob", False)), scale=1.0)
    moe = MoEConfig(num_experts=E, routing=routing, expert_sizes=[F] * E, shared_experts=1 if S else 0,
                    shared_width=S, method="imported", source=where)
    return llama_config_from(cfg, E * F + S), moe, ours
