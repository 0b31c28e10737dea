"""Run: the MoE block that replaces a Llama FFN.

Shape legend: T tokens, D hidden, E routed experts, F expert width (padded to the largest expert),
S shared width, K top-k.

Experts are stored stacked, as the kernels and the stock MoE formats want them:
    experts.gate_proj [E, F, D], experts.up_proj [E, F, D], experts.down_proj [E, D, F]
An expert narrower than F is padded with zero neurons (zero gate and up rows, zero down column), which add
exactly nothing and receive zero gradient. The optional shared expert is one always-on SwiGLU of width S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from surgery.precision import full_precision
from surgery.router import RoutingConfig, expert_output_sq_norms


def _float32_logits(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """Router logits in float32, autocast or not: which experts run is decided at full precision."""
    with full_precision(x_TD):
        return Fn.linear(x_TD.float(), w_ED.float())


class SwiGLU(nn.Module):
    """A Llama FFN: down(silu(gate(x)) * up(x)). Used for the shared expert."""

    def __init__(self, hidden: int, width: int, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, width, **kw)
        self.up_proj = nn.Linear(hidden, width, **kw)
        self.down_proj = nn.Linear(width, hidden, **kw)

    def forward(self, x):
        return self.down_proj(Fn.silu(self.gate_proj(x)) * self.up_proj(x))

    def weights(self):
        return self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight


class Experts(nn.Module):
    def __init__(self, num_experts: int, width: int, hidden: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, width, hidden, **kw))
        self.up_proj = nn.Parameter(torch.empty(num_experts, width, hidden, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width, **kw))


class ExpertPool(nn.Module):
    """Experts added to a converted block after conversion (`surgery extend`): their own router rows and top-k,
    added to the block's output. Sigmoid scores without renormalisation by default, so a pool can learn to
    switch itself off on text it does not help; with a zero down-projection it adds exactly nothing."""

    def __init__(self, hidden: int, num_experts: int, width: int, routing: RoutingConfig, dtype=None, device=None):
        super().__init__()
        self.hidden, self.num_experts, self.routing = hidden, num_experts, routing
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype, device=device)
        self.experts = Experts(num_experts, width, hidden, dtype, device)
        self.last_router_logits: torch.Tensor | None = None

    def forward(self, x_TD: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        from surgery_kernels import ops

        logits_TE = _float32_logits(x_TD, self.router.weight)
        self.last_router_logits = logits_TE
        r = self.routing
        weights_TK, ids_TK = ops.route(logits_TE, r.top_k, r.score_func, r.renormalize, r.scale)
        e = self.experts
        return ops.moe_ffn(x_TD, e.gate_proj, e.up_proj, e.down_proj, weights_TK, ids_TK, impl=impl)


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, num_experts: int, expert_width: int, shared_width: int,
                 routing: RoutingConfig, dtype=None, device=None):
        super().__init__()
        self.hidden, self.num_experts, self.expert_width = hidden, num_experts, expert_width
        self.routing = routing
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype, device=device)
        self.experts = Experts(num_experts, expert_width, hidden, dtype, device)
        self.shared_expert = SwiGLU(hidden, shared_width, dtype, device) if shared_width else None
        # Every expert on with weight 1: computes exactly the dense FFN it was cut from (the core invariant).
        self.dense_routing = False
        self.impl = "auto"  # "auto" (Triton on GPU when available), "triton", "reference", "masked" or "sorted"
        self.last_router_logits: torch.Tensor | None = None  # [T, E] float32, for the calibration losses
        # Calibration's prior-approximate loss (EndToEndConfig.prior_weight): while on, a differentiable forward
        # also keeps every routed expert's squared output norm on each token [T, E] (no gradient; the full
        # routed width's gate and up projections once more).
        self.oracle_on = False
        self.last_oracle_scores: torch.Tensor | None = None
        # Calibration's straight-through routing signal (EndToEndConfig.router_ste): with softmax scores renormalised
        # over the top-k, the weights carry no gradient for how much mass the chosen experts hold (at top-1 the
        # weight is always 1: the router gets no gradient at all). While on, the weights are multiplied by
        # 1 + log P(chosen) - stop_gradient(log P(chosen)): the same value, and the gradient of log P(chosen)
        # times the loss's sensitivity to the chosen experts' weighted output.
        self.router_ste = False
        # Calibration's transition schedule: routing weights w become (1 - m) w + m (m = 1 with every expert
        # selected is the dense model exactly); 0 outside calibration.
        self.unit_mix = 0.0
        # Pools of experts added by `surgery extend`; off under dense routing (they are not part of the dense
        # model) and while `extensions_on` is False (the base model, e.g. as a distillation teacher).
        self.extensions = nn.ModuleList()
        self.extensions_on = True

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return _float32_logits(x_TD, self.router.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.hidden)
        if self.dense_routing:
            y_TD = self._dense(x_TD)
        elif self._cpu_inference(x_TD):
            from surgery_kernels import cpu_moe

            r, e = self.routing, self.experts
            shared = self.shared_expert.weights() if self.shared_expert is not None else None
            y_TD, self.last_router_logits = cpu_moe.moe_block(
                x_TD, self.router.weight, e.gate_proj, e.up_proj, e.down_proj, shared, r.top_k, r.score_func,
                r.renormalize, r.scale)
        else:
            from surgery_kernels import ops

            logits_TE = self.router_logits(x_TD)
            self.last_router_logits = logits_TE
            if self.oracle_on and torch.is_grad_enabled():
                with torch.no_grad():
                    e = self.experts
                    self.last_oracle_scores = expert_output_sq_norms(x_TD.detach(), e.gate_proj, e.up_proj,
                                                                     e.down_proj)
            r = self.routing
            weights_TK, ids_TK = ops.route(logits_TE, r.top_k, r.score_func, r.renormalize, r.scale)
            if self.router_ste and r.renormalize and r.score_func == "softmax" and torch.is_grad_enabled():
                logp_T = torch.logsumexp(logits_TE.gather(1, ids_TK), -1) - torch.logsumexp(logits_TE, -1)
                weights_TK = weights_TK * (1 + logp_T - logp_T.detach()).to(weights_TK.dtype)[:, None]
            if self.unit_mix:
                weights_TK = (1 - self.unit_mix) * weights_TK + self.unit_mix
            shared = self.shared_expert.weights() if self.shared_expert is not None else None
            e = self.experts
            y_TD = ops.moe_ffn(x_TD, e.gate_proj, e.up_proj, e.down_proj, weights_TK, ids_TK,
                               shared=shared, impl=self.impl)
            if self.extensions_on:
                for pool in self.extensions:
                    y_TD = y_TD + pool(x_TD, self.impl)
        return y_TD.reshape(shape)

    def _cpu_inference(self, x_TD: torch.Tensor) -> bool:
        """Inference on CPU, eager, autocast off, nothing but the block's own routing: routing and FFN in one
        call to the CPU path (what ops.route + ops.moe_ffn would choose, without their dispatch)."""
        return (not torch.is_grad_enabled() and x_TD.device.type == "cpu" and self.impl in ("auto", "cpu")
                and not self.unit_mix and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and not (self.extensions_on and len(self.extensions)))

    def _dense(self, x_TD: torch.Tensor) -> torch.Tensor:
        """All experts as one dense SwiGLU: concatenating the experts undoes the split."""
        E, F, D = self.experts.gate_proj.shape
        gate = self.experts.gate_proj.reshape(E * F, D)
        up = self.experts.up_proj.reshape(E * F, D)
        down = self.experts.down_proj.permute(1, 0, 2).reshape(D, E * F)
        y = Fn.linear(Fn.silu(Fn.linear(x_TD, gate)) * Fn.linear(x_TD, up), down)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x_TD)
        return y


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def set_dense_routing(model: nn.Module, on: bool = True) -> None:
    """Switch every MoE block, and every head-expert attention (surgery/attention/), to dense routing (all
    experts / heads, unit weights: the dense model) or back to top-k routing."""
    for block in moe_blocks(model):
        block.dense_routing = on
    for m in model.modules():
        if getattr(m, "is_head_experts", False):
            m.dense_routing = on


def set_impl(model: nn.Module, impl: str) -> None:
    for block in moe_blocks(model):
        block.impl = impl


def training_impl(block: MoEBlock, bf16: bool = False) -> str:
    """The faster differentiable CPU path for this block's shape (both compute the same function): "sorted"
    (only the selected experts' work, one gather and one scatter) when experts are wide and few are chosen,
    else "masked" (every expert on every token as three large matmuls). Measured for one block's forward +
    backward on 512 tokens, 2 cores (ms, masked / sorted): E10 K2 of 96 wide 54 / 37, E13 K1 of 96 wide
    51 / 30, E40 K8 of 24 wide 51 / 67, E48 K16 of 24 wide 51 / 94: small experts lose to per-expert overhead.
    `bf16`: the student trains under bfloat16 autocast on a CPU with AMX, where the masked path's large
    matmuls run ~4x faster but the sorted path's routed experts stay float32 (see moe_ffn_sorted): masked then
    wins up to E = 8K (whole student forward + backward, 512 tokens, 2-core Xeon, medians of 3: E10 K2 masked
    bf16 1.46 s, sorted 1.68 s with float32 experts, 2.07 s all float32; E13 K1 1.70 / 1.49 / 1.60 s)."""
    E, F, _ = block.experts.gate_proj.shape
    return "sorted" if F >= 64 and block.routing.top_k * (8 if bf16 else 4) <= E else "masked"


def set_training_impl(model: nn.Module, bf16: bool = False) -> None:
    for block in moe_blocks(model):
        block.impl = training_impl(block, bf16)
