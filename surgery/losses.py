"""Calibration losses. Shape legend: T tokens, E experts, K top-k, D hidden, V vocabulary.

Router losses take router logits [T, E] (float32, as MoEBlock.last_router_logits holds them):
  * load_balance      ModuleFormer's usage balance, the marginal half of its mutual-information loss:
                      log E - H(mean_t p(e|t)); 0 when experts are used equally on average.
  * load_concentration ModuleFormer's sharp per-token routing, the conditional half: mean_t H(p(e|t)) / log E;
                      0 when every token puts all its mass on one expert.
  * switch_balance    Switch/Mixtral's E * sum_e f_e P_e over the top-k assignment (1 when balanced).
  * prior_approx      FactorLLM's prior-approximate loss: cross-entropy of p(e|t) against a prior over experts
                      (e.g. the oracle top-k of which experts' outputs matter); 0 at the prior's entropy.
  * oracle_prior      prior_approx against each token's top-k experts by a score (their output norms), over blocks.
Output losses:
  * relative_mse      ||y - target||^2 / ||target||^2 averaged over tokens' squared norms (layer-wise).
  * token_relative_mse the mean over tokens of each token's own ||y - t||^2 / ||t||^2.
  * block_error       their sum, the layer-wise objective: the pooled error alone is ruled by a few
                      "massive activation" tokens (the first position: in SmolLM2 one token holds 95-100% of
                      the squared FFN output in layers 11 and 28), the per-token error alone lets those drift.
  * hidden_distill    block_error between student and teacher hidden states, averaged over layers (e2e).
  * kd                KL(teacher || student) on logits at temperature tau, times tau^2 (end-to-end).
  * kd_from_hidden    the same KL (and the student's next-token cross-entropy, optionally differentiable) from
                      the final hidden states and frozen lm_head weights, in row chunks, never holding [T, V]
                      logits for autograd.
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


def oracle_prior(logits: list[torch.Tensor], scores: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
    """prior_approx of each block's router logits [T, E] against its top-k oracle experts (scores [T, E], e.g.
    router.expert_output_sq_norms), averaged over blocks: the end-to-end stage's prior-approximate loss."""
    if not (len(logits) == len(scores) == len(ks)) or not logits:
        raise ValueError(f"oracle_prior: {len(logits)} logits, {len(scores)} scores, {len(ks)} top-ks")
    return torch.stack([prior_approx(lg, topk_prior(sc, k)) for lg, sc, k in zip(logits, scores, ks)]).mean()


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


class _ChunkedVocabKD(torch.autograd.Function):
    """KL(teacher || student) over the vocabulary, row chunk by row chunk: each chunk's logits are made, used
    and dropped while they are still in cache, and the gradient for the student's hidden states is computed
    in the same pass ((softmax(s / tau) - softmax(t / tau)) * tau / N, times the frozen lm_head), so backward
    is a multiply. On a 2-core CPU the whole-vocabulary path (49k-token lm_head, log-softmaxes, KL and their
    autograd) was a third of an end-to-end step."""

    @staticmethod
    def forward(ctx, h_s, h_t, ws, wt, labels, temperature, chunk, ce_grad):
        N, mm_dtype = h_s.shape[0], ws.dtype
        grad = torch.empty(h_s.shape, dtype=torch.float32, device=h_s.device)
        # ce_grad: the cross-entropy's gradient too ((softmax(s) - onehot) / n_valid, times lm_head), for a
        # loss that mixes it in; otherwise ce is a metric
        grad_ce = torch.zeros_like(grad) if ce_grad else None
        n_labelled = int((labels >= 0).sum())
        kd_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        ce_n = 0
        for i in range(0, N, chunk):
            s = Fn.linear(h_s[i:i + chunk].to(mm_dtype), ws).float()
            t = Fn.linear(h_t[i:i + chunk].to(mm_dtype), wt).float()
            lab = labels[i:i + chunk]
            valid = lab >= 0
            n_valid = int(valid.sum())
            raw = torch.log_softmax(s, -1)  # the cross-entropy metric is of the raw logits
            if n_valid:
                ce_sum -= raw[valid].gather(1, lab[valid, None]).sum()
                ce_n += n_valid
            if ce_grad and n_valid:
                gc = raw[valid].exp().sub_(Fn.one_hot(lab[valid], raw.shape[-1]).to(raw.dtype))
                grad_ce[i:i + chunk][valid] = Fn.linear(gc.to(mm_dtype), ws.t()).float() / n_labelled
            ls = raw if temperature == 1 else torch.log_softmax(s.div_(temperature), -1)
            lt = torch.log_softmax(t if temperature == 1 else t.div_(temperature), -1)
            pt = lt.exp()
            kd_sum += (pt * (lt - ls)).sum()
            g = ls.exp_().sub_(pt)  # softmax(s / tau) - softmax(t / tau), in place of ls
            grad[i:i + chunk] = Fn.linear(g.to(mm_dtype), ws.t()).float()
        grad.mul_(temperature / N)
        ctx.save_for_backward(grad, grad_ce)
        ctx.h_dtype = h_s.dtype
        kd = (kd_sum * temperature ** 2 / N).float()
        ce = (ce_sum / max(ce_n, 1)).float()
        if not ce_grad:
            ctx.mark_non_differentiable(ce)
        return kd, ce

    @staticmethod
    def backward(ctx, g_kd, g_ce):
        grad, grad_ce = ctx.saved_tensors
        g = grad * g_kd
        if grad_ce is not None and g_ce is not None:
            g = g + grad_ce * g_ce
        return g.to(ctx.h_dtype), None, None, None, None, None, None, None


def kd_from_hidden(h_s: torch.Tensor, h_t: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor,
                   labels: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 128, ce_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd, ce) for final hidden states h_s (student, differentiable) and h_t (teacher) [N, D] and their frozen
    lm_head weights [V, D] (no bias, no logit scaling: a Llama-family head). kd is `kd` of the two models'
    logits; ce the student's cross-entropy against labels [N] (-100: ignored), a metric without gradient
    unless ce_grad (then both are differentiable: a loss may mix them).
    The lm_head matmuls run in the weights' dtype (pass bfloat16 copies where that is fast: cast once, they
    are frozen); the softmaxes and the KL in float32."""
    if w_s.requires_grad or w_t.requires_grad:
        raise ValueError("kd_from_hidden: the lm_head weights must be frozen")
    return _ChunkedVocabKD.apply(h_s, h_t.detach(), w_s, w_t.to(w_s.dtype), labels, float(temperature), int(chunk),
                                 bool(ce_grad))


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
