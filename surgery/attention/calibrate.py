"""Calibration of head experts, the attention half of `surgery calibrate` (surgery/calibrate.py calls these).

Shape legend: W windows, T window length, D hidden, R routable heads.

What trains (`head_train`, layer-wise and end-to-end alike):
  * router  the learned head router (nothing for qnorm, which has no parameters);
  * qo      the router and every head's query and output projections (q_proj, o_proj): the routed heads learn
            to work at their routing weights, the shared ones to cover for the heads a token skips;
  * attn    all of the attention layer (k_proj and v_proj too): what stick-breaking heads need, whose scores
            must be relearnt without RoPE;
  * none    nothing (the FFN side calibrates alone).
Layer-wise: on the student's own inputs (after input_layernorm), each layer's head-expert attention is fitted
to the dense teacher attention's output on the same inputs (losses.block_error), Adam on random batches of
windows, with ModuleFormer's balance and concentration losses over the head router's logits if weighted.
"""

from __future__ import annotations

import torch

from surgery import losses
from surgery.errors import SurgeryError

HEAD_TRAIN = ("router", "qo", "attn", "none")


def check_head_train(value: str) -> None:
    if value not in HEAD_TRAIN:
        raise SurgeryError(f"--head-train {value!r}: choose from {', '.join(HEAD_TRAIN)}")


def head_parameters(attn, which: str) -> list[torch.nn.Parameter]:
    """The parameters of one HeadExpertAttention that `which` trains."""
    check_head_train(which)
    params = list(attn.router.parameters()) if attn.router is not None and which != "none" else []
    if which == "qo":
        params += list(attn.q_proj.parameters()) + list(attn.o_proj.parameters())
    elif which == "attn":
        params += [p for n, p in attn.named_parameters() if not n.startswith("router.")]
    return params


def head_aux(modules, balance: float, concentration: float) -> torch.Tensor:
    """ModuleFormer's router losses over the head experts' last routing logits (averaged over layers)."""
    return losses.router_aux([m.last_router_logits for m in modules if m.last_router_logits is not None],
                             balance, concentration)


def clear_logits(modules) -> None:
    for m in modules:
        m.last_router_logits = None
        m.last_head_weights = None


@torch.no_grad()
def _attend(attn, x_WTD, pos_emb, mask, chunk: int) -> torch.Tensor:
    outs = [attn(hidden_states=x_WTD[a:a + chunk], position_embeddings=pos_emb, attention_mask=mask)[0]
            for a in range(0, x_WTD.shape[0], chunk)]
    return torch.cat(outs).float()


def fit_head_block(attn, teacher_attn, x_WTD: torch.Tensor, pos_emb, mask, steps: int, lr: float,
                   batch_tokens: int, train: str = "router", balance: float = 0.0, concentration: float = 0.0,
                   seed: int = 0) -> dict:
    """Fit `attn` (a HeadExpertAttention) to the dense `teacher_attn`'s output on inputs x (both given the same
    normalised hidden states, rotary embeddings and causal mask). Returns {"before", "after"} block errors."""
    W, T, _ = x_WTD.shape
    chunk = max(1, 4096 // T)
    x = x_WTD.detach()
    target = _attend(teacher_attn, x, pos_emb, mask, chunk)
    stats = {"before": losses.block_error(_attend(attn, x, pos_emb, mask, chunk), target).item()}
    params = head_parameters(attn, train) if steps > 0 else []
    start = [p.detach().clone() for p in params]
    if params:
        impl = attn.impl
        attn.impl = "masked"  # the reference path: every head computed, weights differentiable
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        per_batch = min(W, max(1, batch_tokens // T))
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    idx = torch.randperm(W, generator=g)[:per_batch]
                    y = attn(hidden_states=x[idx], position_embeddings=pos_emb, attention_mask=mask)[0]
                    loss = losses.block_error(y.float(), target[idx]) + head_aux([attn], balance, concentration)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            for p in params:
                p.requires_grad_(False)
            attn.impl = impl
            clear_logits([attn])
        stats["steps"] = steps
    stats["after"] = losses.block_error(_attend(attn, x, pos_emb, mask, chunk), target).item()
    if stats["after"] > stats["before"]:  # a step size too large for this layer: keep what we had
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        stats["kept_start"] = True
        stats["after"] = stats["before"]
    clear_logits([attn])
    return stats
