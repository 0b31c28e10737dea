"""Extend a converted model with new experts for a new domain, without forgetting the old one.

1. Per layer, a pool of M new routed experts (surgery.moe.ExpertPool) is added beside the block's experts,
   with its own router rows and top-k, sigmoid scores (a pool can learn to switch itself off). Initialised
   from the experts the new domain uses most (gate, up and router rows copied); `--init zero` then zeroes
   their down-projections, so the extended model starts exactly equal to the base model, `copy-most-used`
   keeps them (a perturbed start that already knows something).
2. Everything old is frozen (attention, embeddings, norms, old experts, old router rows, shared experts);
   the new experts and their router rows are trained on the new domain's language-modelling loss, with
   ModuleFormer's load-balance and load-concentration losses over the new pool available.
3. L2R-style (Learning to Route): with a replay memory of the old domain, only the new router rows are then
   trained on memory and new-domain windows in turn: on memory windows to match the base model's
   predictions (the pools turned off), on new-domain windows the language-modelling loss.
The old experts' parameters are bit-identical afterwards (tests), so turning the pools off restores the
base model exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as Fn
from tqdm import tqdm

from surgery import losses
from surgery.errors import SurgeryError
from surgery.moe import ExpertPool, moe_blocks
from surgery.router import RoutingConfig

INITS = ("zero", "copy-most-used")


@dataclass
class ExtendConfig:
    new_experts: int
    init: str = "zero"
    top_k: int | None = None  # pool top-k; default round(K * M / E), at least 1 (same active share)
    tokens: int = 32768  # new-domain training tokens
    ctx: int = 256
    batch_size: int = 2
    lr: float = 1e-3
    warmup: float = 0.05
    balance: float = 0.0
    concentration: float = 0.0
    memory_tokens: int = 0  # L2R stage: old-domain memory tokens (as many new-domain tokens go with them)
    router_lr: float = 1e-3
    seed: int = 0


@dataclass
class TrainConfig:
    """A plain training loop's knobs (extension stages and the fine-tuning baselines)."""
    tokens: int
    ctx: int = 256
    batch_size: int = 2
    lr: float = 1e-4
    warmup: float = 0.05
    balance: float = 0.0
    concentration: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


def pool_top_k(num_experts: int, top_k: int, new_experts: int, given: int | None) -> int:
    k = given if given is not None else max(1, round(top_k * new_experts / num_experts))
    if not 1 <= k <= new_experts:
        raise SurgeryError(f"--new-top-k {k}: must be between 1 and --new-experts {new_experts}")
    return k


def add_pools(model, new_experts: int, top_k: int, init: str, most_used: list[list[int]]) -> None:
    """Append one pool of `new_experts` experts to every MoE block, initialised from `most_used[layer]`."""
    if init not in INITS:
        raise SurgeryError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    blocks = moe_blocks(model)
    routing = RoutingConfig(top_k=top_k, score_func="sigmoid", renormalize=False, scale=1.0)
    for block, src in zip(blocks, most_used):
        E, F, D = block.experts.gate_proj.shape
        ref = block.experts.gate_proj
        pool = ExpertPool(D, new_experts, F, routing, dtype=ref.dtype, device=ref.device)
        idx = torch.tensor([src[i % len(src)] for i in range(new_experts)], dtype=torch.long)
        with torch.no_grad():
            pool.router.weight.copy_(block.router.weight[idx])
            pool.experts.gate_proj.copy_(block.experts.gate_proj[idx])
            pool.experts.up_proj.copy_(block.experts.up_proj[idx])
            if init == "zero":
                pool.experts.down_proj.zero_()
            else:
                pool.experts.down_proj.copy_(block.experts.down_proj[idx])
        block.extensions.append(pool)


def pools(model, index: int = -1) -> list[ExpertPool]:
    return [b.extensions[index] for b in moe_blocks(model)]


def set_extensions(model, on: bool) -> None:
    for b in moe_blocks(model):
        b.extensions_on = on


def _lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def train_lm(model, params: list[torch.Tensor], streams: list[tuple[str, torch.Tensor]], cfg: TrainConfig,
             pool_logits=None, desc: str = "train", progress: bool = True) -> dict:
    """Train `params` (everything else frozen) on windows drawn in turn from the named id streams.

    A stream named "memory" is matched to the base model's predictions (KL to the logits with the expert
    pools turned off); any other stream is plain next-token prediction. `pool_logits()` returns the router
    logits for the balance / concentration losses. Returns the loss history and the time spent."""
    from surgery.data import windows_of

    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(cfg.seed)
    wins = {name: windows_of(ids, cfg.ctx) for name, ids in streams}
    steps = max(1, cfg.tokens // (cfg.batch_size * cfg.ctx))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    names = [n for n, _ in streams]
    order = {n: torch.cat([torch.randperm(w.shape[0], generator=g) for _ in range(1 + steps * cfg.batch_size // w.shape[0])])
             for n, w in wins.items()}
    used = {n: 0 for n in names}
    history, t0 = [], time.time()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    model.train(False)
    try:
        for step in range(steps):
            name = names[step % len(names)]
            pick = order[name][used[name]:used[name] + cfg.batch_size]
            used[name] += cfg.batch_size
            batch = wins[name][pick].to(device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, cfg.lr, cfg.warmup)
            if name == "memory":
                with torch.no_grad():
                    set_extensions(model, False)
                    t_logits = model(input_ids=batch, use_cache=False).logits
                    set_extensions(model, True)
                logits = model(input_ids=batch, use_cache=False).logits
                loss = losses.kd(logits, t_logits)
            else:
                logits = model(input_ids=batch, use_cache=False).logits
                V = logits.shape[-1]
                loss = Fn.cross_entropy(logits[:, :-1].float().reshape(-1, V), batch[:, 1:].reshape(-1))
            aux = 0.0
            if pool_logits is not None and (cfg.balance or cfg.concentration):
                aux = losses.router_aux(pool_logits(), cfg.balance, cfg.concentration)
            opt.zero_grad(set_to_none=True)
            (loss + aux).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            history.append({"step": step + 1, "stream": name, "loss": float(f"{loss.item():.6g}")})
            bar.set_postfix(loss=f"{loss.item():.3f}", data=name)
            bar.update(1)
    finally:
        set_extensions(model, True)
        bar.close()
        for p in params:
            p.requires_grad_(False)
    return {"steps": steps, "tokens": steps * cfg.batch_size * cfg.ctx, "seconds": round(time.time() - t0, 2),
            "history": history}


def tune_routers(model, new_ids: torch.Tensor, memory_ids: torch.Tensor, cfg: ExtendConfig, progress: bool = True,
                 pool_index: int = -1) -> dict:
    """The L2R stage alone: train only the router rows of the pool on memory and new-domain windows in turn."""
    routers = [pool.router.weight for pool in pools(model, pool_index)]
    l2r = TrainConfig(tokens=2 * cfg.memory_tokens, ctx=cfg.ctx, batch_size=cfg.batch_size, lr=cfg.router_lr,
                      warmup=cfg.warmup, seed=cfg.seed + 1)
    return train_lm(model, routers, [("memory", memory_ids), ("new", new_ids)], l2r, desc="extend: L2R routers",
                    progress=progress)


def extend_model(model, new_ids: torch.Tensor, cfg: ExtendConfig, memory_ids: torch.Tensor | None = None,
                 progress: bool = True) -> dict:
    """Add a pool of new experts to every block of a converted model and train it (see the module doc).
    Returns a JSON-ready record of what was done."""
    from dataclasses import replace

    from surgery.experts.stats import domain_stats

    blocks = moe_blocks(model)
    if not blocks or not hasattr(model, "surgery_config"):
        raise SurgeryError("extend needs a converted model (MoE blocks); this one is dense: run `surgery convert`")
    if cfg.new_experts < 1:
        raise SurgeryError(f"--new-experts {cfg.new_experts}: must be at least 1")
    moe = model.surgery_config
    k = pool_top_k(moe.num_experts, moe.top_k, cfg.new_experts, cfg.top_k)
    stats = domain_stats(model, new_ids[: 8 * 512], 512, progress, desc="new-domain statistics")
    most_used = [torch.tensor(l["contribution"]).argsort(descending=True).tolist() for l in stats["layers"]]
    add_pools(model, cfg.new_experts, k, cfg.init, most_used)
    new_pools = pools(model)
    record = {"op": "extend", "new_experts": cfg.new_experts, "pool_top_k": k, "config": asdict(cfg)}
    params = [p for pool in new_pools for p in pool.parameters()]
    train = TrainConfig(tokens=cfg.tokens, ctx=cfg.ctx, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup,
                        balance=cfg.balance, concentration=cfg.concentration, seed=cfg.seed)
    record["train"] = train_lm(model, params, [("new", new_ids)], train,
                               pool_logits=lambda: [p.last_router_logits for p in new_pools],
                               desc="extend: new experts", progress=progress)
    if memory_ids is not None and cfg.memory_tokens > 0:
        record["router_tuning"] = tune_routers(model, new_ids, memory_ids, cfg, progress)
    F = blocks[0].experts.gate_proj.shape[1]
    ext = {"num_experts": cfg.new_experts, "expert_width": F, "routing": new_pools[0].routing.to_dict()}
    summary = {k2: v for k2, v in record.items() if k2 not in ("train", "router_tuning")}
    for stage in ("train", "router_tuning"):
        if stage in record:
            summary[stage] = {k2: v for k2, v in record[stage].items() if k2 != "history"}
    model.surgery_config = replace(moe, extensions=moe.extensions + [ext], modules=moe.modules + [summary])
    return record
