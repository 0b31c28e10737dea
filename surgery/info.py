"""Parameter accounting: total and per-token active parameters, experts per layer and their sizes."""

from __future__ import annotations

from surgery.moe import moe_blocks


def model_info(model) -> dict:
    cfg = model.config
    seen, total = set(), 0
    for p in model.parameters():  # tied weights counted once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    moe = getattr(model, "surgery_config", None)
    info = {
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_width": cfg.intermediate_size,
        "total_parameters": total,
        "active_parameters": total,
        "active_ffn_fraction": 1.0,
        "max_active_ffn_fraction": 1.0,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    info.update(attention_info(model, moe))
    if moe is None:
        return info
    D = cfg.hidden_size
    # Per token, a layer uses K of E routed experts (padding neurons excluded: they do no work); with per-layer
    # budgets K is the mean over layers, which is what the total over layers needs.
    idle_per_layer = 3 * D * sum(moe.expert_sizes) * (1 - moe.top_k / moe.num_experts)
    padding = sum(3 * D * (moe.expert_width - n) for n in moe.expert_sizes) * len(moe_blocks(model))
    for ext in moe.extensions:  # pools added by `surgery extend`: top-k of their experts run per token
        idle_per_layer += 3 * D * ext["expert_width"] * (ext["num_experts"] - ext["routing"]["top_k"])
    info.update(
        extensions=[{k: ext[k] for k in ("num_experts", "expert_width")} | {"top_k": ext["routing"]["top_k"]}
                    for ext in moe.extensions],
        modules=[{k: v for k, v in m.items() if k != "kept"} for m in moe.modules],
        experts=moe.num_experts,
        top_k=moe.top_k,
        **({"layer_top_k": moe.layer_top_k} if not moe.uniform_top_k else {}),
        shared_experts=moe.shared_experts,
        shared_width=moe.shared_width,
        expert_sizes=moe.expert_sizes,
        padding_parameters=padding,
        active_parameters=int(total - padding - idle_per_layer * len(moe_blocks(model))
                              - (info["attention_parameters"] - info["active_attention_parameters"])),
        active_ffn_fraction=round(moe.active_ffn_fraction, 6),  # mean over layers
        max_active_ffn_fraction=round(moe.max_active_ffn_fraction, 6),  # the densest layer
        routing=moe.routing.to_dict(),
        method=moe.method,
        source=moe.source,
        source_hash=moe.source_hash,
    )
    return info


def attention_info(model, moe=None) -> dict:
    """Attention parameters and FLOPs per token, dense or with head experts (surgery/attention/).

    Active per layer: k/v projections (dense), q rows and o columns of the S + K active heads (qnorm routing
    computes every routable head's query to score it, so all q rows count there), the learned router. FLOPs per
    token: 2 x active projection parameters, plus 4 d x active heads per key position (scores and values) for
    each layer; the FFN's: 2 x active FFN parameters (routers included)."""
    cfg = model.config
    L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    H = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or D // H
    attn = model.model.layers[0].self_attn
    n = {p: getattr(attn, p).weight.numel() for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    per_layer = sum(n.values())
    active_heads, router, q_heads = H, 0, H
    heads = (moe.attention if moe is not None else None) or {}
    if heads:
        active_heads = heads["shared_heads"] + heads["top_k"]
        R = heads["heads"] - heads["shared_heads"]
        router = (R * D + R) if heads["router"] == "learned" else 0
        q_heads = H if heads["router"] == "qnorm" else active_heads
    active_layer = n["k_proj"] + n["v_proj"] + (n["q_proj"] * q_heads + n["o_proj"] * active_heads) // H + router
    if moe is None:
        ffn_active = 3 * D * F
    else:
        ffn_active = 3 * D * F * moe.active_ffn_fraction + moe.num_experts * D
        for ext in moe.extensions:
            ffn_active += 3 * D * ext["expert_width"] * ext["routing"]["top_k"] + ext["num_experts"] * D
    out = {
        "attention_parameters": (per_layer + router) * L,
        "active_attention_parameters": int(active_layer * L),
        "active_heads": active_heads,
        "active_head_fraction": round(active_heads / H, 6),
        "attention_flops_per_token": int(2 * active_layer * L),
        "attention_score_flops_per_token_per_position": 4 * d * active_heads * L,
        "ffn_flops_per_token": int(2 * ffn_active * L),
    }
    if heads:
        out["attention"] = {k: heads[k] for k in ("heads", "kv_heads", "shared_heads", "top_k", "router", "init")
                            if k in heads}
    return out
