"""Calibration losses. Shape legend: T tokens, E experts, K top-k, D hidden, V vocabulary.

Router losses take router logits [T, E] (float32, as MoEBlock.last_router_logits holds them):
  * load_balance      ModuleFormer's usage balance, the marginal half of its mutual-information loss:
                      log E - H(mean_t p(e|t)); 0 when experts are used equally on average.
  * load_concentration ModuleFormer's sharp per-token routing, the conditional half: mean_t H(p(e|t)) / log E;
                      0 when every token puts all its mass on one expert.
  * switch_balance    Switch/Mixtral's E * sum_e f_e P_e over the top-k assignment (1 when balanced).
  * prior_approx      FactorLLM's prior-approximate loss: cross-entropy of p(e|t) against a prior over experts
                      (e.g. the oracle top-k of which experts' outputs matter); 0 at the prior's entropy.
Output losses:
  * relative_mse      ||y - target||^2 / ||target||^2 averaged over tokens' squared norms (layer-wise).
  * token_relative_mse the mean over tokens of each token's own ||y - t||^2 / ||t||^2.
  * block_error       their sum, the layer-wise objective: the pooled error alone is ruled by a few
                      "massive activation" tokens (the first position: in SmolLM2 one token holds 95-100% of
                      the squared FFN output in layers 11 and 28), the per-token error alone lets those drift.
  * hidden_distill    block_error between student and teacher hidden states, averaged over layers (e2e).
  * kd                KL(teacher || student) on logits at temperature tau, times tau^2 (end-to-end).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn


def load_balance(logits_TE: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits_TE.float(), -1).mean(0)
    return math.log(logits_TE.shape[-1]) + (p * torch.log(p.clamp_min(1e-12))).sum()


def load_concentration(logits_TE: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits_TE.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return entropy / math.log(max(logits_TE.shape[-1], 2))


def switch_balance(logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    E = logits_TE.shape[-1]
    f = torch.bincount(ids_TK.reshape(-1), minlength=E).float() / ids_TK.numel()
    P = torch.softmax(logits_TE.float(), -1).mean(0)
    return E * (f * P).sum()


def prior_approx(logits_TE: torch.Tensor, prior_TE: torch.Tensor) -> torch.Tensor:
    return -(prior_TE * torch.log_softmax(logits_TE.float(), -1)).sum(-1).mean()


def topk_prior(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """A prior with mass 1/k on each token's k highest-scoring experts."""
    idx = scores_TE.topk(k, -1).indices
    return torch.zeros_like(scores_TE, dtype=torch.float32).scatter_(1, idx, 1.0 / k)


def relative_mse(y_TD: torch.Tensor, target_TD: torch.Tensor) -> torch.Tensor:
    return (y_TD.float() - target_TD.float()).pow(2).sum(-1).mean() / target_TD.float().pow(2).sum(-1).mean().clamp_min(1e-12)


def token_relative_mse(y_TD: torch.Tensor, target_TD: torch.Tensor) -> torch.Tensor:
    t = target_TD.float()
    return ((y_TD.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()


def block_error(y_TD: torch.Tensor, target_TD: torch.Tensor) -> torch.Tensor:
    return relative_mse(y_TD, target_TD) + token_relative_mse(y_TD, target_TD)


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/tau) || softmax(student/tau)) * tau^2."""
    V = student_logits.shape[-1]
    s = torch.log_softmax(student_logits.float().reshape(-1, V) / temperature, -1)
    t = torch.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, -1)
    return Fn.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_distill(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over layers of block_error(student [B, T, D], teacher [B, T, D]): the residual stream after each
    decoder layer pulled towards the teacher's (pooled and per-token, as the layer-wise objective)."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden_distill: {len(student_hidden)} student vs {len(teacher_hidden)} teacher layers")
    D = student_hidden[0].shape[-1]
    errs = [block_error(s.reshape(-1, D), t.reshape(-1, D)) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(errs).mean()


def router_aux(logits_list: list[torch.Tensor], balance: float = 0.0, concentration: float = 0.0) -> torch.Tensor:
    """Weighted ModuleFormer router losses, averaged over layers (0 when both weights are 0)."""
    if not logits_list or (balance == 0 and concentration == 0):
        return torch.zeros(())
    total = 0.0
    for lg in logits_list:
        if balance:
            total = total + balance * load_balance(lg)
        if concentration:
            total = total + concentration * load_concentration(lg)
    return total / len(logits_list)
