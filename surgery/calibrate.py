"""Calibrate: distil a converted model back towards its dense teacher.

Two stages, each optional:
  1. layer-wise, sequentially on the STUDENT's own inputs: the calibration windows flow through the converted
     model one layer at a time; at layer l the MoE block's input x is what the (already calibrated) student
     gives it, and its target is the dense FFN of layer l on that same x. So each layer learns to reproduce
     the dense FFN on the inputs it will really see, and errors of earlier layers do not compound unseen.
     Per layer: the router is fitted on cached expert outputs (cheap, many steps), then optionally the
     router and experts are trained together on the real block.
  2. end-to-end: KL from the teacher's logits to the student's on calibration windows, MoE parameters only
     (routers, experts, shared experts), AdamW with warm-up and cosine decay, plus ModuleFormer's router
     losses (load balance, load concentration) weighted by flags.
A model with head experts (surgery/attention/) also calibrates its attention (surgery/attention/calibrate.py):
layer-wise, each layer's attention block is fitted to the dense teacher attention's output on the student's
own inputs before its FFN is; end-to-end, the head parameters `head_train` names train with the rest, with
their own balance and concentration weights. A model without head experts calibrates exactly as before.
Budgets are in tokens; bars show the loss and a running perplexity; checkpoints after every layer and every
`checkpoint_every` steps make `resume` pick up where a run stopped; everything is seeded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from surgery import compiled, lora, losses
from surgery.attention import head_expert_modules
from surgery.attention import calibrate as head_cal
from surgery.atomic import atomic_file
from surgery.compensate import refit_down
from surgery.data import windows_of
from surgery.errors import SurgeryError
from surgery.moe import MoEBlock, moe_blocks, set_impl, set_training_impl, training_impl
from surgery.precision import precision_plan
from surgery.router import RoutingConfig, fit_router, oracle_scores


@dataclass
class LayerwiseConfig:
    tokens: int = 8192  # calibration tokens pushed through the student, layer by layer
    ctx: int = 256
    router_steps: int = 300  # router fitting steps on cached expert outputs
    router_lr: float = 1e-2
    prior_weight: float = 1.0  # FactorLLM prior-approximate loss against the oracle top-k
    expert_epochs: float = 0.0  # passes of joint router + expert training on the real block (0: router only)
    expert_lr: float = 1e-4
    expert_prior_weight: float = 0.0  # prior-approx loss while training experts (costs a pass over all experts)
    batch_tokens: int = 1024
    balance: float = 0.0
    concentration: float = 0.0
    router_tokens: int = 8192  # router fitting caches [N, E, D] expert outputs: cap N (fine-grained E is large)
    autocast: str = "auto"  # bfloat16 autocast: "auto" (GPUs; CPUs stay float32: precision.Precision), "on", "off"
    # Closed-form refit of the down-projections under the routing (surgery/compensate.py), after the router
    # fit and again after expert training; refit_damp is its ridge towards the current weights.
    refit_down: bool = False
    refit_damp: float = 1e-2
    # Head experts (ignored without them): Adam steps fitting each layer's attention block on random batches of
    # batch_tokens, what trains (surgery/attention/calibrate.py: router, qo, attn or none), router losses.
    head_steps: int = 100
    head_lr: float = 1e-3
    head_train: str = "router"
    head_balance: float = 0.0
    head_concentration: float = 0.0


@dataclass
class EndToEndConfig:
    tokens: int = 32768  # token budget (student forward+backward and teacher forward on each)
    ctx: int = 256
    batch_size: int = 4
    lr: float = 1e-4
    # the MoE blocks' routers learn at lr times this (a router is a few thousand weights that decide which
    # experts a token gets; they may want larger steps than the experts they choose between; round 13: x10
    # was level with x1). Head routers and `surgery extend` pools keep lr.
    router_lr_scale: float = 1.0
    # the MoE blocks' routed experts learn at lr times this (each sees only the tokens routed to it: 1/13 of them
    # in the 25% recipe, against every token for the shared expert and the rest of the layer)
    expert_lr_scale: float = 1.0
    warmup: float = 0.05  # fraction of steps
    temperature: float = 1.0
    # the student's next-token cross-entropy on the calibration text, added to the KD loss with this weight
    # (0: distillation only)
    ce_weight: float = 0.0
    # Tail averaging: the weights the stage ends with are the uniform mean of those after each of the last
    # `average_tail` fraction of steps (0: the last step's). Single process; a resumed run restarts the mean.
    average_tail: float = 0.0
    train: str = "moe"  # "moe": routers + experts + shared experts; "router": routers only;
    # "all": every decoder-layer weight (attention and norms too), never the embeddings; "lora": as "moe",
    # plus peft LoRA adapters on the attention projections (surgery/lora.py), merged in when the stage ends
    lora_rank: int = 16
    lora_alpha: float = 32.0
    balance: float = 0.0
    concentration: float = 0.0
    # FactorLLM's prior-approximate loss, end to end: this weight times the cross-entropy of each router's
    # softmax against the token's top-k routed experts by output norm (the oracle of `surgery_evals.
    # routing_probe`, -14% perplexity at 25% there), averaged over blocks. The KD loss alone never tells a
    # router that an expert it did not choose would have served better. Costs every routed expert's gate and up
    # projections once more per step (no gradient). 0: off. Measured worse (README round 20: at 25%, 0.1 level on
    # WikiText-2 and +6% on stdlib, 1.0 +16% / +87%).
    prior_weight: float = 0.0
    # Straight-through routing gradient (MoEBlock.router_ste): the routing weights' value unchanged, their
    # gradient that of log P(chosen experts). Renormalised softmax top-k routing otherwise gives the router no
    # gradient for the mass on the chosen experts, and at top-1 none at all (the 25% recipe's routers never moved
    # end to end). Measured worse (round 20: +1% WikiText-2, +2-9% stdlib at 50% and 25%).
    router_ste: bool = False
    # Hidden-state distillation: this weight times the mean over decoder layers of losses.block_error between
    # the student's and the teacher's residual stream after that layer (both forwards compute them anyway), so
    # that every layer is pulled back onto the teacher's trajectory, not only the logits. 0: logits only.
    hidden: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 50  # steps
    # End the stage within this many seconds (None: run every token of `tokens`). The step count is planned
    # from this process's measured step time once PLAN_WARMUP + PLAN_STEPS steps have run, and planned again
    # every PLAN_EVERY steps; it never exceeds `tokens`' steps, and the learning-rate schedule, snapshots and
    # tail average follow the plan. A recipe sets it from its time_budget_s. Single process only.
    time_limit_s: float | None = None
    autocast: str = "auto"  # bfloat16: "auto" (where it is fast; what runs in it: precision.Precision), "on", "off"
    # KD from the final hidden states in row chunks (losses.kd_from_hidden) where the models allow it; False:
    # the whole-vocabulary logits path (the same loss, slower; kept for comparison and for torchrun)
    chunked_kd: bool = True
    # torch.compile of every decoder layer for the stage (surgery/compiled.py): "auto" (single-process CPU with a
    # C++ compiler, stages of 64 steps or more, plain converted models, no transition schedule), "on", "off"
    compile: str = "auto"
    # Transition schedule (Mixture-of-Tokens' transition tuning, for conversion): start at top-k = k_start
    # with unit routing weights (k_start = every expert: exactly the dense model) and move linearly to the
    # model's top-k and its own routing weights over the first `transition` fraction of steps.
    k_start: int | None = None
    transition: float = 0.0
    # Save the trained weights at these fractions of the run (with the seconds spent so far), so that a
    # recipe can draw perplexity against calibration time from one run.
    snapshots: list = field(default_factory=list)
    # Head experts (ignored without them): which head parameters train beside `train`'s (router, qo, attn or
    # none; surgery/attention/calibrate.py), and ModuleFormer's losses over the head routers' logits.
    head_train: str = "router"
    head_balance: float = 0.0
    head_concentration: float = 0.0

    def __post_init__(self):  # checked before any stage runs or writes
        if not 0 <= self.average_tail <= 1:
            raise SurgeryError(f"e2e.average_tail {self.average_tail}: a fraction of the steps, in [0, 1]")
        if self.ce_weight < 0:
            raise SurgeryError(f"e2e.ce_weight {self.ce_weight}: a loss weight, >= 0")
        if self.prior_weight < 0:
            raise SurgeryError(f"e2e.prior_weight {self.prior_weight}: a loss weight, >= 0")
        if self.compile not in compiled.SETTINGS:
            raise SurgeryError(f"e2e.compile {self.compile!r}: choose auto, on or off")
        if self.time_limit_s is not None and self.time_limit_s < 0:
            raise SurgeryError(f"e2e.time_limit_s {self.time_limit_s}: seconds, >= 0 (null: no limit)")


@dataclass
class CalibrateConfig:
    layerwise: LayerwiseConfig | None = field(default_factory=LayerwiseConfig)
    e2e: EndToEndConfig | None = field(default_factory=EndToEndConfig)
    seed: int = 0
    data: str | None = None  # text/JSONL path, "sample" (from the teacher), or None: WikiText-2 valid

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrateConfig":
        d = dict(d or {})
        try:
            lw = d.pop("layerwise", {})
            e2e = d.pop("e2e", {})
            return cls(layerwise=LayerwiseConfig(**lw) if lw is not None and lw is not False else None,
                       e2e=EndToEndConfig(**e2e) if e2e is not None and e2e is not False else None, **d)
        except TypeError as e:
            raise SurgeryError(f"calibration config: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def _frozen_lm_heads(student, teacher, dtype: torch.dtype):
    """(student's, teacher's) lm_head weights in `dtype` when both models are plain Llama-family causal LMs
    whose heads are linear maps (no bias, no logit scaling or soft-capping), the student's frozen: then the
    chunked KD (losses.kd_from_hidden) computes the same loss from the final hidden states. Else None."""
    scaling = ("final_logit_softcapping", "logit_scale", "logits_scaling")
    heads = []
    for m in (student, teacher):
        head, cfg = getattr(m, "lm_head", None), getattr(m, "config", None)
        if not isinstance(head, torch.nn.Linear) or head.bias is not None or getattr(m, "model", None) is None:
            return None
        if (m is student and head.weight.requires_grad) or any(getattr(cfg, a, None) not in (None, 1, 1.0)
                                                               for a in scaling):
            return None
        heads.append(head.weight.detach().to(dtype))
    return tuple(heads)


# ---- the student's layers, one at a time ----------------------------------------------------------------

class _Capture(torch.nn.Module):
    """Stands in for an mlp: records its input and adds nothing, so a decoder layer returns h + attn(h)."""

    def forward(self, x):
        self.x = x
        return torch.zeros_like(x)


def _causal_mask(T: int, device, dtype=torch.float32) -> torch.Tensor:
    m = torch.full((T, T), float("-inf"), device=device, dtype=dtype).triu(1)
    return m[None, None]


def _layer_parts(layer, h, pos_emb, mask, position_ids):
    """(h after attention, the mlp input x) for one decoder layer, without running its mlp."""
    mlp, cap = layer.mlp, _Capture()
    layer.mlp = cap
    try:
        out = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb,
                    use_cache=False)
    finally:
        layer.mlp = mlp
    h_mid = out[0] if isinstance(out, tuple) else out
    return h_mid, cap.x


def _chunks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def _expert_outputs(block: MoEBlock, x_ND: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    e = block.experts
    outs = []
    for a, b in _chunks(x_ND.shape[0], chunk):
        x = x_ND[a:b].float()
        h = torch.nn.functional.silu(torch.einsum("nd,efd->nef", x, e.gate_proj.float())) * \
            torch.einsum("nd,efd->nef", x, e.up_proj.float())
        outs.append(torch.einsum("nef,edf->ned", h, e.down_proj.float()))
    return torch.cat(outs)


def calibrate_block(block: MoEBlock, x_ND: torch.Tensor, target_ND: torch.Tensor, cfg: LayerwiseConfig,
                    seed: int = 0) -> dict:
    """Fit one MoE block to reproduce `target` (the dense FFN output) on inputs x. Returns loss numbers."""
    x = x_ND.detach().float()
    target = target_ND.detach().float()
    with torch.no_grad():
        shared = block.shared_expert(x.to(block.router.weight.dtype)).float() if block.shared_expert is not None else 0.0
        before = losses.block_error(block(x.to(block.router.weight.dtype)).float(), target).item()
    stats = {"before": before}
    if cfg.router_steps > 0:
        n = min(x.shape[0], cfg.router_tokens or x.shape[0])
        sub = slice(None) if n == x.shape[0] else \
            torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        y = _expert_outputs(block, x[sub])
        t_sub = (target - shared)[sub] if torch.is_tensor(shared) else target[sub]
        w = fit_router(x[sub], y, t_sub, block.routing, w0_ED=block.router.weight.detach().float(),
                       steps=cfg.router_steps, lr=cfg.router_lr, prior_weight=cfg.prior_weight, seed=seed)
        with torch.no_grad():
            block.router.weight.copy_(w.to(block.router.weight.dtype))
        del y
    if cfg.refit_down:
        stats.update(refit_down(block, x, target, cfg.refit_damp))
    if cfg.expert_epochs > 0:
        params = [p for p in block.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.expert_lr)
        # autocast on GPUs and under "on"; float32 on CPUs (precision.Precision)
        autocast = precision_plan(cfg.autocast, x.device).layerwise_autocast
        g = torch.Generator().manual_seed(seed)
        N = x.shape[0]
        steps = max(1, int(cfg.expert_epochs * N / cfg.batch_tokens))
        for _ in range(steps):
            idx = torch.randint(0, N, (min(cfg.batch_tokens, N),), generator=g)
            xb = x[idx].to(block.router.weight.dtype)
            with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=autocast):
                yb = block(xb)
            loss = losses.block_error(yb.float(), target[idx])
            lg = block.last_router_logits
            if cfg.expert_prior_weight:
                with torch.no_grad():
                    scores = oracle_scores(_expert_outputs(block, xb), target[idx] - (
                        block.shared_expert(xb).float() if block.shared_expert is not None else 0.0))
                loss = loss + cfg.expert_prior_weight * losses.prior_approx(lg, losses.topk_prior(scores, block.routing.top_k))
            loss = loss + losses.router_aux([lg], cfg.balance, cfg.concentration)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
        block.last_router_logits = None
        if cfg.refit_down:  # the optimum for the down-projections given the trained gates, ups and router
            stats["refit_final"] = refit_down(block, x, target, cfg.refit_damp)["refit_after"]
    with torch.no_grad():
        stats["after"] = losses.block_error(block(x.to(block.router.weight.dtype)).float(), target).item()
    block.last_router_logits = None
    return stats


def _teacher_ffn(teacher, l):
    return teacher.model.layers[l].mlp


# ---- checkpoints ----------------------------------------------------------------------------------------

def trained_keys(model, state: dict, all_layers: bool = False) -> dict:
    """The entries of `state` (the model's state dict, whole or gathered or sharded) that calibration changes:
    the MoE blocks (and head-expert attention, when the model has it), or with e2e.train=all every decoder
    layer; plus e2e.train=lora's adapters. Checkpoints, snapshots and distributed checkpoints all keep these."""
    keep = ("model.layers.",) if all_layers else (".mlp.", ".self_attn.") if head_expert_modules(model) else (".mlp.",)
    keep += (lora.KEY,)
    return {k: v for k, v in state.items() if any(p in k for p in keep)}


def _moe_state(model, all_layers: bool = False) -> dict:
    return {k: v.detach().cpu().clone() for k, v in trained_keys(model, model.state_dict(), all_layers).items()}


def _save_ckpt(folder: Path, state: dict, model, optimizer=None, all_layers: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    blob = {"state": state, "params": _moe_state(model, all_layers), "rng": torch.get_rng_state()}
    if optimizer is not None:
        blob["optimizer"] = optimizer.state_dict()
    with atomic_file(folder / "ckpt.pt") as tmp:
        torch.save(blob, tmp)
    (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def load_checkpoint(folder: Path):
    p = Path(folder) / "ckpt.pt"
    if not p.is_file():
        return None
    return torch.load(p, map_location="cpu", weights_only=False)


# ---- the two stages -------------------------------------------------------------------------------------

def _windows(ids: torch.Tensor, ctx: int, tokens: int) -> torch.Tensor:
    """The first `tokens` ids as full windows of ctx (at least one window, even for a budget below ctx)."""
    return windows_of(ids[:max(tokens, ctx)], ctx)


def layerwise_inputs(inner, ids: torch.Tensor, cfg: LayerwiseConfig, device):
    """What layer-wise calibration starts from: the windows' embeddings (float32) and the per-window constants
    (rotary position embeddings, causal mask, position ids) every layer reuses. `inner` is the LlamaModel."""
    wins = _windows(ids, cfg.ctx, cfg.tokens).to(device)
    T = wins.shape[1]
    position_ids = torch.arange(T, device=device)[None]
    h = inner.embed_tokens(wins).float()
    return h, (inner.rotary_emb(h, position_ids), _causal_mask(T, device), position_ids)


@torch.no_grad()
def layerwise_step(layer, teacher_mlp, h: torch.Tensor, consts, cfg: LayerwiseConfig, seed: int, l: int,
                   fit: bool = True):
    """One decoder layer of layer-wise calibration: its MoE block (layer.mlp) is fitted to `teacher_mlp` (the
    dense FFN) on the inputs the student gives it, then the student's hidden states move on through the fitted
    block. Returns (next hidden states, report or None when fit is False: a layer done before a resume)."""
    pos_emb, mask, position_ids = consts
    mids, xs = [], []
    for a, b in _chunks(h.shape[0], max(1, 4096 // h.shape[1])):
        m, x = _layer_parts(layer, h[a:b], pos_emb, mask, position_ids)
        mids.append(m)
        xs.append(x)
    h_mid, x = torch.cat(mids), torch.cat(xs)
    x_ND = x.reshape(-1, x.shape[-1])
    r = None
    if fit:
        target = teacher_mlp(x_ND.to(next(teacher_mlp.parameters()).dtype)).float()
        with torch.enable_grad():
            r = calibrate_block(layer.mlp, x_ND, target, cfg, seed=seed * 1000 + l)
        r["layer"] = l
    return h_mid + layer.mlp(x_ND).reshape(h_mid.shape).float(), r


@torch.no_grad()
def run_layerwise(student, teacher, ids: torch.Tensor, cfg: LayerwiseConfig, seed: int = 0,
                  ckpt: Path | None = None, start_layer: int = 0, progress: bool = True) -> list[dict]:
    device = next(student.parameters()).device
    h, consts = layerwise_inputs(student.model, ids, cfg, device)
    report = []
    layers = student.model.layers
    bar = tqdm(total=len(layers), desc="layer-wise", unit="layer", disable=not progress)
    heads_on = bool(head_expert_modules(student)) and cfg.head_train != "none" and cfg.head_steps > 0
    for l, layer in enumerate(layers):
        r_heads = None
        if heads_on and l >= start_layer:  # the attention block first: the FFN then sees its calibrated output
            pos_emb, mask, _ = consts
            xn = torch.cat([layer.input_layernorm(h[a:b]) for a, b in _chunks(h.shape[0], max(1, 4096 // h.shape[1]))])
            r_heads = head_cal.fit_head_block(layer.self_attn, teacher.model.layers[l].self_attn, xn, pos_emb, mask,
                                              cfg.head_steps, cfg.head_lr, cfg.batch_tokens, cfg.head_train,
                                              cfg.head_balance, cfg.head_concentration, seed * 1000 + l)
            del xn
        h, r = layerwise_step(layer, _teacher_ffn(teacher, l), h, consts, cfg, seed, l, fit=l >= start_layer)
        if r is not None:
            if r_heads is not None:
                r["heads"] = r_heads
            report.append(r)
            bar.set_postfix(err=f"{r['before']:.3f}->{r['after']:.3f}", **({} if r_heads is None else
                            {"attn": f"{r_heads['before']:.3f}->{r_heads['after']:.3f}"}))
            if ckpt is not None:
                _save_ckpt(ckpt, {"stage": "layerwise", "next_layer": l + 1, "report": report}, student)
        bar.update(1)
    bar.close()
    return report


def _lr_at(step: int, steps: int, cfg: EndToEndConfig) -> float:
    warm = max(1, int(cfg.warmup * steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _routing_at(step: int, steps: int, cfg: EndToEndConfig, base: RoutingConfig, num_experts: int):
    """(routing, unit-weight mix) in force at `step` under the transition schedule; (base, 0) when off."""
    if not cfg.k_start or cfg.transition <= 0:
        return base, 0.0
    k0 = min(max(cfg.k_start, base.top_k), num_experts)
    t = min(1.0, step / max(1.0, cfg.transition * steps))
    k = max(base.top_k, round(k0 + (base.top_k - k0) * t))
    return replace(base, top_k=k, scale=base.scale * k / base.top_k), 1.0 - t


# The time limit's plan: made once PLAN_WARMUP + PLAN_STEPS steps have run in this process, from the steps
# after the first PLAN_WARMUP (compilation, first-touch allocations), and made again every PLAN_EVERY steps from
# the last PLAN_WINDOW of them (checkpoints included), so that it follows the machine's speed as it drifts (this
# VM's step time moved by 15% within one 8-minute stage).
PLAN_WARMUP, PLAN_STEPS, PLAN_EVERY, PLAN_WINDOW = 2, 3, 10, 50


def planned_steps(step: int, max_steps: int, marks: list[float], elapsed: float, limit: float,
                  reserve: float = 0.0) -> int:
    """The step count that ends the stage within `limit` seconds: `step` steps done, `elapsed` seconds spent,
    `marks` the times (seconds) at which this process's steps ended, `reserve` seconds kept for the stage's last
    checkpoint. At least one step more, at most max_steps."""
    first = max(PLAN_WARMUP - 1, len(marks) - 1 - PLAN_WINDOW)
    per_step = (marks[-1] - marks[first]) / (len(marks) - 1 - first)
    fit = int(max(0.0, limit - elapsed - reserve) / max(per_step, 1e-9))
    return max(step + 1, min(max_steps, step + fit))


def _epoch_order(n: int, steps: int, batch_size: int, g: torch.Generator) -> torch.Tensor:
    """Window order for `steps` batches: one shuffled pass after another when the budget exceeds the data."""
    need = steps * batch_size
    parts = [torch.randperm(n, generator=g) for _ in range(max(1, -(-need // n)))]
    return torch.cat(parts)[:need]


def run_end_to_end(student, teacher, ids: torch.Tensor, cfg: EndToEndConfig, seed: int = 0,
                   ckpt: Path | None = None, resume_blob: dict | None = None, progress: bool = True,
                   dist=None, on_step=None) -> dict:
    """With `dist` (surgery/distributed.py, under torchrun) student and teacher are sharded here and each
    rank runs its slice of every global batch; without it this is the single-process loop. on_step() is
    called after every optimizer step (benchmarks time the steps with it)."""
    device = next(student.parameters()).device
    wins = windows_of(ids, cfg.ctx)
    if wins.shape[0] == 0:
        raise SurgeryError(f"calibration data has fewer than e2e.ctx = {cfg.ctx} tokens")
    g = torch.Generator().manual_seed(seed + 1)
    steps = max_steps = max(1, cfg.tokens // (cfg.batch_size * cfg.ctx))  # a time limit may plan fewer
    order = _epoch_order(wins.shape[0], steps, cfg.batch_size, g)
    for p in student.parameters():
        p.requires_grad_(False)
    blocks = moe_blocks(student)
    if cfg.train not in ("moe", "router", "all", "lora"):
        raise SurgeryError(f"e2e.train {cfg.train!r}: choose moe, router, all or lora")
    head_cal.check_head_train(cfg.head_train)
    heads = head_expert_modules(student)
    adapters = None
    if cfg.train == "lora":
        if heads:
            raise SurgeryError("e2e.train lora: not with head experts (their query and output projections are "
                               "trained by e2e.head_train); use moe or all")
        adapters = lora.attach(student, cfg.lora_rank, cfg.lora_alpha)  # freezes all else: grads set below
        if resume_blob is not None and "params" in resume_blob:
            student.load_state_dict({k: v for k, v in resume_blob["params"].items() if lora.KEY in k}, strict=False)
    params = lora.adapter_parameters(student) if adapters is not None else []
    owners = student.model.layers if cfg.train == "all" else blocks
    for b in owners:
        ps = [b.router.weight] if cfg.train == "router" else list(b.parameters())
        for p in ps:
            p.requires_grad_(True)
        params += ps
    seen = {id(p) for p in params}
    for m in heads:
        for p in head_cal.head_parameters(m, cfg.head_train):
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                params.append(p)
    if dist is not None:
        if cfg.time_limit_s is not None:
            raise SurgeryError("e2e.time_limit_s: not under torchrun (each process would plan its own steps)")
        if cfg.average_tail:
            raise SurgeryError("e2e.average_tail: not under torchrun (the mean is kept per process)")
        for name in ("router_lr_scale", "expert_lr_scale"):
            if getattr(cfg, name) != 1.0:
                raise SurgeryError(f"e2e.{name}: not under torchrun (the sharded parameters are one group)")
        dist.check_batch(cfg.batch_size)
        dist.shard(student)
        dist.shard(teacher)
        params = [p for p in student.parameters() if p.requires_grad]  # the sharded stand-ins
    trainable = sum(p.numel() for p in params)  # what AdamW keeps two states for (DTensors: global sizes)
    # The fused AdamW: one kernel over all parameters (on 2 CPU cores, 106M parameters: 68 ms a step against
    # 280 for the per-tensor loop). Not for torch.distributed's sharded stand-ins.
    fused = dist is None and device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    router_ids = {id(b.router.weight) for b in blocks} if cfg.router_lr_scale != 1.0 else set()
    expert_ids = ({id(w) for b in blocks for w in b.experts.parameters()} if cfg.expert_lr_scale != 1.0 else set())
    groups = [{"params": [p for p in params if id(p) not in router_ids | expert_ids], "lr_scale": 1.0}]
    if router_ids:
        groups.append({"params": [p for p in params if id(p) in router_ids], "lr_scale": cfg.router_lr_scale})
    if expert_ids:
        groups.append({"params": [p for p in params if id(p) in expert_ids], "lr_scale": cfg.expert_lr_scale})
    groups = [gr for gr in groups if gr["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused or None)
    start, history, snaps = 0, [], []
    elapsed0 = 0.0
    if resume_blob is not None and resume_blob["state"].get("stage") == "e2e":
        if "dcp" in resume_blob:  # written under torchrun: weights and optimizer in torch.distributed.checkpoint
            from surgery.distributed import load_checkpoint as load_dcp

            load_dcp(ckpt, resume_blob, student, opt, cfg.train == "all")
        elif dist is not None:  # its optimizer state is per parameter of the whole model, not per shard
            raise SurgeryError(f"{ckpt}: end-to-end checkpoint written by a single process; resume it without torchrun")
        else:
            opt.load_state_dict(resume_blob["optimizer"])
        start = resume_blob["state"]["step"]
        if cfg.time_limit_s is not None:  # the plan stands (and is re-made as the run goes on)
            steps = min(steps, resume_blob["state"].get("steps", steps))
        history = resume_blob["state"].get("history", [])
        snaps = resume_blob["state"].get("snapshots", [])
        elapsed0 = resume_blob["state"].get("seconds", 0.0)
        torch.set_rng_state(resume_blob["rng"])
    marks, ckpt_s = [], 0.0  # when each of this process's steps ended, the last checkpoint's seconds (the plan)
    base_routing = [b.routing for b in blocks]
    for b in blocks:
        b.oracle_on, b.router_ste = cfg.prior_weight > 0, cfg.router_ste
    head_impls = [m.impl for m in heads]
    for m in heads:
        m.impl = "masked"  # every head computed, routing weights differentiable (sparse is for inference)
    prec = precision_plan(cfg.autocast, device, sharded=dist is not None)
    block_impls = [b.impl for b in blocks]
    if device.type == "cpu" and all(i in ("masked", "sorted") for i in block_impls):
        for b in blocks:  # calibrate() chose the float32 training paths: re-choose for this stage's precision
            b.impl = training_impl(b, bf16=prec.student_autocast)
    # the chunked KD from final hidden states (single process): never [T, V] logits under autograd
    heads_w = _frozen_lm_heads(student, teacher, prec.head_dtype) if dist is None and cfg.chunked_kd else None
    t_model = copy.deepcopy(teacher).to(prec.teacher_dtype) if prec.teacher_dtype is not None else teacher
    comp = compiled.compile_on(cfg.compile, device, steps - start, sharded=dist is not None,
                               transition=bool(cfg.k_start and cfg.transition > 0), lora=adapters is not None,
                               heads=bool(heads))
    compiled_stack = contextlib.ExitStack()  # the layers are eager again when the stage ends, however it ends
    def tail_start(steps):  # the first step of the tail average
        return steps - max(1, round(cfg.average_tail * steps)) if cfg.average_tail else steps

    def snap_due(step, steps):  # a snapshot's fraction of the (planned) steps reached at this step's end
        return snap_next < len(fracs) and step + 1 >= max(1, round(fracs[snap_next] * steps))

    tail_from, tail_mean, tail_n = tail_start(steps), None, 0
    fracs = sorted({f for f in cfg.snapshots if 0 < f < 1})  # taken in order, each once, whatever the plan does
    snap_next = resume_blob["state"].get("snap_next", len(snaps)) if resume_blob is not None else 0
    student.train(False)  # no dropout in Llama; keep eval semantics
    ema_ce, ema_kd = None, None
    bar = tqdm(total=steps, initial=start, desc="end-to-end", unit="step", disable=not progress)
    t0 = time.time() - elapsed0
    try:
        compiled_stack.enter_context(compiled.compiled_layers([student, t_model], comp))
        for step in range(start, max_steps):
            if cfg.time_limit_s is not None and len(marks) >= PLAN_WARMUP + PLAN_STEPS and (
                    (len(marks) - PLAN_WARMUP - PLAN_STEPS) % PLAN_EVERY == 0):
                steps = planned_steps(step, max_steps, marks, time.time() - t0, cfg.time_limit_s, ckpt_s)
                tail_from = tail_start(steps) if tail_n == 0 else tail_from  # an average under way keeps its start
                bar.total = steps
                bar.refresh()
            if step >= steps:
                break
            batch = wins[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]].to(device)
            mine = batch if dist is None else dist.local(batch)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, cfg) * group.get("lr_scale", 1.0)
            for b, r in zip(blocks, base_routing):
                b.routing, b.unit_mix = _routing_at(step, steps, cfg, r, b.num_experts)
            run_t = t_model.model if heads_w is not None else t_model  # the body: final hidden states
            run_s = student.model if heads_w is not None else student
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec.teacher_autocast):
                t_out = run_t(input_ids=mine, use_cache=False, output_hidden_states=bool(cfg.hidden))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec.student_autocast):
                s_out = run_s(input_ids=mine, use_cache=False, output_hidden_states=bool(cfg.hidden))
            if heads_w is not None:
                D = s_out.last_hidden_state.shape[-1]
                labels = torch.cat([mine[:, 1:], torch.full_like(mine[:, :1], -100)], 1).reshape(-1)
                loss, ce_t = losses.kd_from_hidden(s_out.last_hidden_state.reshape(-1, D),
                                                   t_out.last_hidden_state.reshape(-1, D), *heads_w, labels,
                                                   cfg.temperature, ce_grad=bool(cfg.ce_weight))
            else:
                loss = losses.kd(s_out.logits, t_out.logits, cfg.temperature)
                V = s_out.logits.shape[-1]
                with torch.set_grad_enabled(bool(cfg.ce_weight)):  # a loss term, or only the metric
                    ce_t = torch.nn.functional.cross_entropy(s_out.logits[:, :-1].float().reshape(-1, V),
                                                             mine[:, 1:].reshape(-1))
            loss_ce = cfg.ce_weight * ce_t if cfg.ce_weight else 0.0
            if cfg.hidden:  # [1:]: the embeddings are never trained, so index 0 is the same on both sides
                hid = losses.hidden_distill(s_out.hidden_states[1:], t_out.hidden_states[1:])
                loss_h = cfg.hidden * hid
            else:
                hid, loss_h = None, 0.0
            router_logits = [b.last_router_logits for b in blocks if b.last_router_logits is not None]
            aux = losses.router_aux(router_logits, cfg.balance, cfg.concentration)
            if cfg.prior_weight and (scored := [b for b in blocks if b.last_oracle_scores is not None]):
                aux = aux + cfg.prior_weight * losses.oracle_prior([b.last_router_logits for b in scored],
                                                                   [b.last_oracle_scores for b in scored],
                                                                   [b.routing.top_k for b in scored])
            if heads:
                aux = aux + head_cal.head_aux(heads, cfg.head_balance, cfg.head_concentration)
            total = loss + aux + loss_h + loss_ce
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if step >= tail_from:  # running uniform mean of the last steps' weights
                tail_n += 1
                if tail_mean is None:
                    tail_mean = [p.detach().clone() for p in params]
                else:
                    torch._foreach_lerp_(tail_mean, [p.detach() for p in params], 1.0 / tail_n)
                if step + 1 == steps:  # before the last checkpoint, so that it holds the mean
                    with torch.no_grad():
                        torch._foreach_copy_([p.data for p in params], tail_mean)
            if on_step is not None:
                on_step()
            for b in blocks:
                b.last_router_logits = b.last_oracle_scores = None
            head_cal.clear_logits(heads)
            ce = ce_t.item()
            kd, aux_v = loss.item(), float(aux.detach() if torch.is_tensor(aux) else aux)
            hid_v = hid.item() if hid is not None else None
            if dist is not None:  # each rank's numbers are means over equal token counts
                kd, ce, aux_v, hid_v = dist.mean([kd, ce, aux_v, hid_v or 0.0])
            ema_ce = ce if ema_ce is None else 0.9 * ema_ce + 0.1 * ce
            ema_kd = kd if ema_kd is None else 0.9 * ema_kd + 0.1 * kd
            history.append({"step": step + 1, "tokens": (step + 1) * batch.numel(), "kd": float(f"{kd:.6g}"),
                            "ce": float(f"{ce:.6g}"), "aux": float(f"{aux_v:.6g}"),
                            "top_k": blocks[0].routing.top_k if blocks else 0,
                            **({"hidden": float(f"{hid_v:.6g}")} if hid is not None else {})})
            bar.set_postfix(kd=f"{ema_kd:.4f}", ppl=f"{math.exp(ema_ce):.2f}")
            bar.update(1)
            if ckpt is not None and snap_due(step, steps):
                while snap_due(step, steps):  # fractions that fall on one step share its snapshot
                    snap_next += 1
                full = dist.full_state(student) if dist is not None else None
                if dist is None or dist.main:
                    snaps.append(_save_snapshot(ckpt, student, step + 1, steps, time.time() - t0, cfg.train == "all",
                                                full, cfg))
            if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
                state = {"stage": "e2e", "step": step + 1, "steps": steps, "history": history, "snapshots": snaps,
                         "snap_next": snap_next, "seconds": round(time.time() - t0, 2)}
                t_ckpt = time.time()
                if dist is None:
                    _save_ckpt(ckpt, state, student, opt, all_layers=cfg.train == "all")
                else:
                    from surgery.distributed import save_checkpoint as save_dcp

                    save_dcp(ckpt, state, student, opt, cfg.train == "all", dist)
                ckpt_s = time.time() - t_ckpt  # the time limit keeps this much for the last one
            marks.append(time.time())  # the step's end, its checkpoint included
    finally:
        compiled_stack.close()
        for b, r, impl in zip(blocks, base_routing, block_impls):
            b.routing, b.unit_mix, b.impl = r, 0.0, impl
            b.oracle_on, b.last_oracle_scores, b.router_ste = False, None, False
        for m, impl in zip(heads, head_impls):
            m.impl = impl
        head_cal.clear_logits(heads)
        if adapters is not None:
            lora.merge(adapters)  # the student is a plain converted model again, adapters folded in
    bar.close()
    for p in student.parameters():
        p.requires_grad_(False)
    out = {"steps": steps, "tokens": steps * cfg.batch_size * cfg.ctx, "seconds": round(time.time() - t0, 2),
           "trainable_parameters": trainable, "history": history, "snapshots": snaps}
    if cfg.time_limit_s is not None:  # what the plan cut: the tokens asked for against those that fit
        out["time_limit"] = {"limit_s": round(cfg.time_limit_s, 1), "max_steps": max_steps,
                             "max_tokens": max_steps * cfg.batch_size * cfg.ctx, "cut": steps < max_steps}
    return out


def _save_snapshot(ckpt: Path, model, step: int, steps: int, seconds: float, all_layers: bool,
                   full: dict | None = None, cfg: EndToEndConfig | None = None) -> dict:
    """The trained weights at `step`, for a perplexity-against-calibration-time curve (`full`: the gathered
    state of a sharded model). LoRA adapters are saved merged, under the plain weight names."""
    path = Path(ckpt) / f"snapshot-{step:06d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _moe_state(model, all_layers) if full is None else trained_keys(model, full, all_layers)
    if cfg is not None and cfg.train == "lora":
        whole = model.state_dict() if full is None else full
        state = {k: v for k, v in state.items() if lora.KEY not in k}
        state.update({k: v.detach().cpu() for k, v in lora.merged_weights(whole, cfg.lora_rank, cfg.lora_alpha).items()})
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    return {"step": step, "fraction": round(step / steps, 4), "seconds": round(seconds, 2), "path": str(path)}


def calibrate(student, teacher, tokenizer, cfg: CalibrateConfig, ckpt: Path | None = None, resume: bool = False,
              progress: bool = True, ids: torch.Tensor | None = None, dist=None) -> dict:
    """Calibrate `student` (a converted model in memory) against `teacher` (its dense source) in place.
    With `dist` (under torchrun) every rank runs the layer-wise stage in full (it is sequential over layers;
    rank 0's result is then broadcast) and the end-to-end stage on its share of each batch, sharded."""
    from surgery.profile import calibration_ids

    if not moe_blocks(student) and not head_expert_modules(student):
        raise SurgeryError("calibrate needs a converted model (no MoE blocks found)")
    if moe_blocks(teacher) or head_expert_modules(teacher):
        raise SurgeryError("--teacher must be the dense model, not a converted one")
    if cfg.layerwise is not None:
        head_cal.check_head_train(cfg.layerwise.head_train)
    torch.manual_seed(cfg.seed)
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    need = max(cfg.layerwise.tokens if cfg.layerwise else 0, cfg.e2e.tokens if cfg.e2e else 0)
    if ids is None:
        ids = calibration_ids(tokenizer, cfg.data, need, teacher, cfg.seed, progress)
    blob = load_checkpoint(ckpt) if (resume and ckpt is not None) else None
    state = blob["state"] if blob else {}
    if blob and "params" in blob:  # a DCP checkpoint (torchrun) is loaded after sharding, in run_end_to_end
        # (LoRA adapters are loaded once run_end_to_end has attached them)
        missing = student.load_state_dict({k: v for k, v in blob["params"].items() if lora.KEY not in k},
                                          strict=False)
        if missing.unexpected_keys:
            raise SurgeryError(f"{ckpt}: checkpoint does not match this model")
    result = {"config": cfg.to_dict(), "calibration_tokens_available": int(ids.numel())}
    if next(student.parameters()).device.type == "cpu":
        set_training_impl(student)  # same function, faster to train on a CPU than the grouped reference
    t0 = time.time()
    if cfg.layerwise is not None and state.get("stage") != "e2e":
        start = state.get("next_layer", 0) if state.get("stage") == "layerwise" else 0
        prior = state.get("report", []) if start else []
        main = dist is None or dist.main
        rep = run_layerwise(student, teacher, ids, cfg.layerwise, cfg.seed, ckpt if main else None, start, progress)
        if dist is not None:
            dist.broadcast_from_main([t for b in moe_blocks(student) for t in b.parameters()])
        result["layerwise"] = {"layers": prior + rep, "tokens": int(_windows(ids, cfg.layerwise.ctx, cfg.layerwise.tokens).numel()),
                               "seconds": round(time.time() - t0, 2)}
    elif state.get("stage") == "e2e":
        result["layerwise"] = {"resumed": True}
    t1 = time.time()
    if cfg.e2e is not None:
        result["e2e"] = run_end_to_end(student, teacher, ids, cfg.e2e, cfg.seed, ckpt, blob, progress, dist)
    set_impl(student, "auto")
    result["seconds"] = round(time.time() - t0, 2)
    result["e2e_seconds"] = round(time.time() - t1, 2)
    moe = getattr(student, "surgery_config", None)
    if moe is not None:
        summary = {"seed": cfg.seed, "data": str(cfg.data or "wikitext-valid"),
                   "layerwise_tokens": result.get("layerwise", {}).get("tokens", 0),
                   "e2e_tokens": result.get("e2e", {}).get("tokens", 0), "config": cfg.to_dict()}
        moe.calibration = summary
    return result


def run_calibrate(model_path, out, teacher_path, cfg: CalibrateConfig, device="cpu", resume=False,
                  overwrite=False, progress=True) -> dict:
    """`surgery calibrate`: load, calibrate, write the calibrated model to OUT (native format). Under torchrun
    (WORLD_SIZE > 1) the same, across processes (surgery/distributed.py): rank 0 alone logs and writes."""
    from surgery.distributed import from_env
    from surgery.modeling import load_model, load_tokenizer, save_converted

    out = Path(out)
    if out.exists() and not (overwrite or resume):
        raise SurgeryError(f"{out}: already exists (choose another path or pass --overwrite)")
    dist = from_env(device)
    try:
        if dist is not None:
            device = dist.device
        main = dist is None or dist.main
        tokenizer = load_tokenizer(model_path)
        student = load_model(model_path, device=device)
        teacher = load_model(teacher_path, dtype=next(student.parameters()).dtype, device=device)
        ckpt = out.parent / f"{out.name}.ckpt"
        result = calibrate(student, teacher, tokenizer, cfg, ckpt, resume, progress and main, dist=dist)
        # Sharded (the end-to-end stage ran): gather the full weights on rank 0; else every rank holds them.
        state = dist.full_state(student) if dist is not None and cfg.e2e is not None else None
        if main:
            save_converted(student, out, tokenizer_from=model_path, overwrite=True, state=state)
        if dist is not None:
            result["processes"] = dist.world
            dist.barrier()  # OUT is complete before any rank returns
    finally:
        if dist is not None:
            dist.close()
    result["output"] = str(out)
    result["checkpoint"] = str(ckpt)
    hist = result.get("e2e", {}).pop("history", None)
    if hist:
        result["e2e"]["first_kd"] = hist[0]["kd"]
        result["e2e"]["last_kd"] = hist[-1]["kd"]
        if main:
            (ckpt).mkdir(parents=True, exist_ok=True)
            (ckpt / "history.json").write_text(json.dumps(hist) + "\n")
    return result
