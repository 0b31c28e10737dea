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
        active_parameters=int(total - padding - idle_per_layer * len(moe_blocks(model))),
        active_ffn_fraction=round(moe.active_ffn_fraction, 6),  # mean over layers
        max_active_ffn_fraction=round(moe.max_active_ffn_fraction, 6),  # the densest layer
        routing=moe.routing.to_dict(),
        method=moe.method,
        source=moe.source,
        source_hash=moe.source_hash,
    )
    return info
