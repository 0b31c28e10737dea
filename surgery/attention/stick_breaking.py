"""Stick-breaking attention (ModuleFormer's attention function), PyTorch reference.

Shape legend: B batch, H query heads, G key/value heads, T query tokens, S key positions (cache included),
d head dim.

For query i and key j <= i (the current token included, so the first token has something to attend to):
    beta_ij = sigmoid(s_ij),  s_ij = q_i . k_j * scaling
    A_ij    = beta_ij * prod_{j < k <= i} (1 - beta_ik)
i.e. the query walks back from the most recent key, each key taking a fraction beta of the stick that is left.
The weights sum to at most 1 (the rest of the stick is dropped) and favour recent keys by construction, so the
heads need no position embedding: HeadExpertAttention applies no RoPE to the queries and keys of a
stick-breaking model. Masked keys (causal or padding) take nothing and leave the stick whole.

In log space, per query row: log A_ij = logsigmoid(s_ij) + sum_{k > j, kept} logsigmoid(-s_ik), a suffix sum
along the keys (float32). O(T S) memory per head, like the masked softmax reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn


def keep_keys(attention_mask: torch.Tensor | None, B: int, T: int, S: int, device) -> torch.Tensor:
    """Which keys each query may see, [B or 1, 1, T, S] bool: plain causal (query t at key position
    S - T + t) when the mask is None, else the model's 4-D mask (bool keep, or additive 0 / large negative)."""
    if attention_mask is None:
        j = torch.arange(S, device=device)
        t = torch.arange(T, device=device) + (S - T)
        return (j[None, :] <= t[:, None])[None, None]
    m = attention_mask
    if m.dim() == 2:  # [B, S] padding mask (1 keep): combine with causal
        return keep_keys(None, B, T, S, device) & m.bool()[:, None, None, :]
    m = m[..., -S:]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def stick_breaking_weights(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Attention weights A [..., T, S] (float32) from logits s [..., T, S] and a broadcastable keep mask."""
    s = scores.float()
    keep = keep.expand_as(s)
    log_beta = Fn.logsigmoid(s)
    log_rest = Fn.logsigmoid(-s).masked_fill(~keep, 0.0)  # log(1 - beta); masked keys leave the stick whole
    after = log_rest.flip(-1).cumsum(-1).flip(-1) - log_rest  # sum over kept keys k > j
    return torch.exp(log_beta + after).masked_fill(~keep, 0.0)


def stick_breaking_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, d], k/v [B, G, S, d] (H a multiple of G: grouped-query) -> output [B, T, H, d], the layout
    transformers' attention functions return."""
    B, H, T, d = q.shape
    G, S = k.shape[1], k.shape[2]
    group = H // G
    qg = q.reshape(B, G, group, T, d)
    scores = torch.einsum("bgqtd,bgsd->bgqts", qg.float(), k.float()) * scaling  # [B, G, group, T, S]
    keep = keep_keys(attention_mask, B, T, S, q.device)[:, :, None]  # [B|1, 1, 1, T, S]
    a = stick_breaking_weights(scores, keep)
    out = torch.einsum("bgqts,bgsd->bgqtd", a, v.float()).reshape(B, H, T, d)
    return out.transpose(1, 2).to(q.dtype)
