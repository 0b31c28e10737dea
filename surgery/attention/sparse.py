"""The sparse head-expert path: work only for the (token, head) pairs the router chose.

Shape legend: B batch, T query tokens, S_k key positions (cache included), D hidden, H query heads,
G key/value heads, d head dim, n tokens that chose a head.

Keys and values are dense and shared (computed and cached for every token by the caller); only queries are
sparse. Shared heads run as one dense attention over every token. For each routed head h, the tokens that
chose it are gathered: their query rows of q_proj (unless the qnorm router already computed every query),
their scores against h's key/value group, their weighted values, and their slice of o_proj, added back with
index_add_. Prefill loops over batch rows (keys of one row, no gather of keys); decode (T = 1) gathers each
selected token's keys instead, so a batch is one matmul per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from surgery.attention.heads import rope


def keep_mask(attention_mask, b: int, t_BT: torch.Tensor, T: int, S_k: int, device) -> torch.Tensor:
    """Which keys the queries at positions t (of batch row b) may attend to: [n, S_k] bool."""
    if attention_mask is None:  # plain causal: query t sits at key position S_k - T + t
        j = torch.arange(S_k, device=device)
        return j[None, :] <= (S_k - T + t_BT)[:, None]
    m = attention_mask[min(b, attention_mask.shape[0] - 1), 0][:, -S_k:] if attention_mask.dim() == 4 \
        else attention_mask
    rows = m[t_BT] if m.shape[0] > 1 else m.expand(len(t_BT), -1)
    if rows.dtype == torch.bool:
        return rows
    return rows > torch.finfo(rows.dtype).min / 2  # additive mask: 0 keep, min(dtype) drop


def _attend(q_nd, k_nSd, v_nSd, keep_nS, scaling):
    """softmax(q k^T * scaling, masked) v, one query per row; k/v [S, d] shared or [n, S, d] per query."""
    if k_nSd.dim() == 2:
        scores = (q_nd @ k_nSd.T) * scaling
    else:
        scores = torch.bmm(k_nSd, q_nd.unsqueeze(-1)).squeeze(-1) * scaling
    scores = scores.float().masked_fill(~keep_nS, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v_nSd.dtype)
    if v_nSd.dim() == 2:
        return probs @ v_nSd
    return torch.bmm(probs.unsqueeze(1), v_nSd).squeeze(1)


def sparse_attention(attn, x_BTD, q_full, k_BGSd, v_BGSd, cos, sin, attention_mask, weights_TK, ids_TK):
    """The attention block's output [B, T, D] (before the residual) computing only what routing selected."""
    B, T, D = x_BTD.shape
    H, G, d = attn.heads, attn.kv_heads, attn.head_dim
    group = H // G
    S_k = k_BGSd.shape[2]
    x_TD = x_BTD.reshape(B * T, D)
    cos_Td, sin_Td = cos.reshape(B * T, d) if cos.shape[0] == B else cos.expand(B, -1, -1).reshape(B * T, d), \
        sin.reshape(B * T, d) if sin.shape[0] == B else sin.expand(B, -1, -1).reshape(B * T, d)
    Wq, Wo = attn.q_proj.weight, attn.o_proj.weight  # [H*d, D], [D, H*d]
    bq = attn.q_proj.bias
    y_TD = torch.zeros(B * T, D, dtype=x_BTD.dtype, device=x_BTD.device)
    t_all = torch.arange(T, device=x_BTD.device)

    def query(h, tok):  # rows of head h for the tokens `tok` (all tokens when None), after RoPE
        if q_full is not None:
            q = q_full[:, h] if tok is None else q_full[tok, h]
        else:
            xs = x_TD if tok is None else x_TD[tok]
            q = Fn.linear(xs, Wq[h * d:(h + 1) * d], None if bq is None else bq[h * d:(h + 1) * d])
        c, s = (cos_Td, sin_Td) if tok is None else (cos_Td[tok], sin_Td[tok])
        return rope(q, c, s)

    # Shared heads: every token, one dense attention (the model's sdpa) over their heads.
    if attn.shared:
        sh = attn.shared
        q = torch.stack([query(h, None) for h in sh], dim=1).view(B, T, len(sh), d).transpose(1, 2)
        kv_idx = torch.tensor([h // group for h in sh], device=x_BTD.device)
        ks, vs = k_BGSd[:, kv_idx], v_BGSd[:, kv_idx]
        mask = None
        if attention_mask is not None or T != S_k:
            mask = torch.stack([keep_mask(attention_mask, b, t_all, T, S_k, x_BTD.device) for b in range(B)])[:, None]
        out = Fn.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, is_causal=mask is None and T > 1,
                                              scale=attn.scaling)  # [B, S, T, d]
        cols = torch.cat([torch.arange(h * d, (h + 1) * d, device=x_BTD.device) for h in sh])
        y_TD = y_TD + Fn.linear(out.transpose(1, 2).reshape(B * T, len(sh) * d), Wo[:, cols])

    # Routed heads: per head, only the tokens that chose it.
    for r, h in enumerate(attn.routed):
        hit = ids_TK == r  # [B*T, K]
        tok = hit.any(-1).nonzero().squeeze(-1)
        if tok.numel() == 0:
            continue
        w = (weights_TK * hit).sum(-1)[tok]  # that head's routing weight for each of its tokens
        q = query(h, tok)
        g = h // group
        b_n, t_n = tok // T, tok % T
        if T == 1:  # decode: each token's own row of keys, one batched matmul
            keep = torch.cat([keep_mask(attention_mask, int(b), t_n[i:i + 1], T, S_k, x_BTD.device)
                              for i, b in enumerate(b_n.tolist())]) if attention_mask is not None else \
                torch.ones(len(tok), S_k, dtype=torch.bool, device=x_BTD.device)
            o = _attend(q, k_BGSd[b_n, g], v_BGSd[b_n, g], keep, attn.scaling)
        else:
            o = torch.empty(len(tok), d, dtype=q.dtype, device=q.device)
            for b in range(B):
                sel = (b_n == b).nonzero().squeeze(-1)
                if sel.numel() == 0:
                    continue
                keep = keep_mask(attention_mask, b, t_n[sel], T, S_k, x_BTD.device)
                o[sel] = _attend(q[sel], k_BGSd[b, g], v_BGSd[b, g], keep, attn.scaling)
        o = o * w.to(o.dtype)[:, None]
        y_TD.index_add_(0, tok, Fn.linear(o, Wo[:, h * d:(h + 1) * d]))
    if attn.o_proj.bias is not None:
        y_TD = y_TD + attn.o_proj.bias
    return y_TD.view(B, T, D)
