"""The sparse head-expert path: work only for the (token, head) pairs the router chose.

Shape legend: B batch, T query tokens, S_k key positions (cache included), D hidden, H query heads,
G key/value heads, d head dim, n tokens that chose a head, C rows per chunk, L keys a chunk can see.

Keys and values are dense and shared (computed and cached for every token by the caller); only queries are
sparse. Shared heads run as one dense attention over every token. For each routed head h, the tokens that
chose it are gathered: their query rows of q_proj (unless the qnorm router already computed every query),
their scores against h's key/value group, their weighted values, and their slice of o_proj, added back with
index_add_.
  * Prefill: a batch row's gathered queries are in position order, so each part of them attends only to the
    keys it can see (about half the keys on average, as a causal dense attention skips, instead of all S_k
    for every gathered row). Without a padding mask, on CPU: blocks of rows, the keys before a block's first
    row through the fused flash kernel (no score matrix kept, no mask), the band after it recursively in
    smaller blocks down to a small masked block, merged by log-sum-exp. With a mask: chunks of CHUNK rows
    by masked sdpa over the keys up to the chunk's last row.
  * Decode (T = 1): each selected token's keys are gathered instead, so a batch is one matmul per head.
  * On CUDA with Triton (and no attention mask): one kernel launch attends every selected (token, head) pair
    (surgery_kernels/head_attention.py), with no per-head loop around it: the query rows are gathered from
    the full q projection, and the weighted outputs go through o_proj as one [B*T, H*d] matrix.
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


CHUNK = 256  # gathered query rows per masked sdpa call in prefill (with a padding mask): small enough that a
#              chunk's last row sees few keys more than its first, large enough to keep the kernel busy
CHUNKS = (1024, 128)  # row blocks per level of the CPU flash path (no mask): large blocks keep the flash kernel
#                     efficient on the long prefix, smaller ones cut the band after each block's first row


def _attend(q_nd, k_nSd, v_nSd, keep_nS, scaling):
    """softmax(q k^T * scaling, masked) v, one query per row; k/v [S, d] shared by the rows (the fused sdpa
    kernel, no score matrix kept) or [n, S, d] per row (decode)."""
    if k_nSd.dim() == 2:
        return Fn.scaled_dot_product_attention(q_nd[None], k_nSd[None], v_nSd[None], attn_mask=keep_nS[None],
                                               scale=scaling)[0]
    scores = torch.bmm(k_nSd, q_nd.unsqueeze(-1)).squeeze(-1) * scaling
    scores = scores.float().masked_fill(~keep_nS, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v_nSd.dtype)
    return torch.bmm(probs.unsqueeze(1), v_nSd).squeeze(1)


def prefix_keep(attention_mask, b: int, t_C: torch.Tensor, T: int, S_k: int, device) -> torch.Tensor:
    """keep_mask for the queries t_C (ascending) of batch row b, cut after the last key any of them keeps:
    [C, L] bool. A row that keeps no key at all (a padding query) keeps them all instead, so that it stays
    finite (its output is never used, but NaN would reach other rows through later layers' values)."""
    if attention_mask is None:
        L = S_k - T + int(t_C[-1]) + 1
        return torch.arange(L, device=device)[None, :] <= (S_k - T + t_C)[:, None]
    keep = keep_mask(attention_mask, b, t_C, T, S_k, device)
    cols = keep.any(0).nonzero()
    keep = keep[:, :int(cols[-1]) + 1 if cols.numel() else 1]
    empty = ~keep.any(-1)
    return keep | empty[:, None] if empty.any() else keep


# The CPU flash kernel behind sdpa, called directly because it also returns each row's log-sum-exp (sdpa with a
# mask falls back to the unfused math path on CPU: scores materialised, several passes; twice the time here).
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _leaf(q_Cd, pos_C, k_Sd, v_Sd, lo, scaling):
    """(output float32 [C, d], log-sum-exp [C]) of rows at positions pos_C over keys lo..pos (one masked score
    block); a row with no such key gives output 0 and lse -inf."""
    hi = int(pos_C[-1]) + 1
    s = (q_Cd.float() @ k_Sd[lo:hi].float().T) * scaling
    s.masked_fill_(torch.arange(lo, hi, device=s.device)[None, :] > pos_C[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = (s - torch.where(torch.isfinite(lse), lse, 0.0)[:, None]).exp()
    return p @ v_Sd[lo:hi].float(), lse


def _causal_rows(q_Cd, pos_C, k_Sd, v_Sd, lo, scaling, sizes):
    """(output float32, lse) of rows at positions pos_C (ascending, distinct) attending causally to keys lo..pos.
    Rows are cut into blocks of sizes[0]: the keys lo..(block's first position), seen by all its rows, go
    through the fused flash kernel (no mask, no score matrix kept); the band after them, up to the block's
    last position, recurses with the next size, down to a small masked block. Parts merge by log-sum-exp."""
    if not sizes:
        return _leaf(q_Cd, pos_C, k_Sd, v_Sd, lo, scaling)
    outs, lses = [], []
    for i in range(0, len(pos_C), sizes[0]):
        q, pos = q_Cd[i:i + sizes[0]], pos_C[i:i + sizes[0]]
        p0, p1 = int(pos[0]), int(pos[-1])
        o = lse = None
        if p0 >= lo:
            o, lse = _flash(q[None, None], k_Sd[None, None, lo:p0 + 1], v_Sd[None, None, lo:p0 + 1], 0.0, False,
                            scale=scaling)
            o, lse = o[0, 0].float(), lse[0, 0]
        if p1 > p0:
            ob, lb = _causal_rows(q, pos, k_Sd, v_Sd, max(lo, p0 + 1), scaling, sizes[1:])
            if o is None:
                o, lse = ob, lb
            else:
                total = torch.logaddexp(lse, lb)
                o = o * (lse - total).exp()[:, None] + ob * (lb - total).exp()[:, None]
                lse = total
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _attend_prefill(q_nd, k_Sd, v_Sd, attention_mask, b, t_n, T, scaling):
    """One head's gathered queries of one batch row (positions t_n ascending) against that row's keys, each
    part against only the keys it can see: by flash blocks and bands on CPU without a mask, else CHUNK rows at
    a time by masked sdpa over the chunk's keys."""
    S_k = k_Sd.shape[0]
    if attention_mask is None and _flash is not None and q_nd.device.type == "cpu":
        return _causal_rows(q_nd, S_k - T + t_n, k_Sd, v_Sd, 0, scaling, CHUNKS)[0].to(q_nd.dtype)
    o = torch.empty_like(q_nd)
    for i in range(0, len(t_n), CHUNK):
        keep = prefix_keep(attention_mask, b, t_n[i:i + CHUNK], T, S_k, q_nd.device)
        L = keep.shape[1]
        o[i:i + CHUNK] = _attend(q_nd[i:i + CHUNK], k_Sd[:L], v_Sd[:L], keep, scaling)
    return o


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

    if attention_mask is None and _use_kernel(attn, x_BTD):
        y_TD = y_TD + _routed_by_kernel(attn, x_TD, q_full, cos_Td, sin_Td, k_BGSd, v_BGSd, weights_TK, ids_TK, T)
        routed = []
    else:
        routed = attn.routed
    # Routed heads: per head, only the tokens that chose it.
    for r, h in enumerate(routed):
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
        else:  # tok is ascending, so each batch row's tokens are one contiguous run of rows, in position order
            o = torch.empty(len(tok), d, dtype=q.dtype, device=q.device)
            start = 0
            for b, count in enumerate(torch.bincount(b_n, minlength=B).tolist()):
                if count:
                    rows = slice(start, start + count)
                    o[rows] = _attend_prefill(q[rows], k_BGSd[b, g], v_BGSd[b, g], attention_mask, b, t_n[rows],
                                              T, attn.scaling)
                start += count
        o = o * w.to(o.dtype)[:, None]
        y_TD.index_add_(0, tok, Fn.linear(o, Wo[:, h * d:(h + 1) * d]))
    if attn.o_proj.bias is not None:
        y_TD = y_TD + attn.o_proj.bias
    return y_TD.view(B, T, D)


def _use_kernel(attn, x) -> bool:
    """The Triton pair-attention kernel: `attn.sparse_kernel` "auto" (CUDA with triton), "triton" (always; on
    CPU only under TRITON_INTERPRET=1, for tests) or "torch" (never)."""
    kernel = getattr(attn, "sparse_kernel", "auto")
    if kernel == "auto":
        from surgery_kernels.ops import triton_available

        return x.is_cuda and triton_available()
    return kernel == "triton"


def _routed_by_kernel(attn, x_TD, q_full, cos_Td, sin_Td, k_BGSd, v_BGSd, weights_TK, ids_TK, T):
    """Every routed head's selected tokens attended in one kernel launch, with no loop over heads and no host
    sync: a token selects K distinct routed heads, so the pairs are exactly (t, ids[t, k]) for every t and k.
    The kernel reads their queries in place from the full (un-rotated) q projection, made here when the router
    did not need it (on a GPU one dense projection costs less than a launch per head), rotates them, and
    writes each weighted output into a [B*T, H*d] matrix, zeros for the heads a token skipped, that goes
    through o_proj once. Returns [B*T, D]."""
    from surgery_kernels.head_attention import routed_attention

    H, d, group, S_k = attn.heads, attn.head_dim, attn.heads // attn.kv_heads, k_BGSd.shape[2]
    BT, K = ids_TK.shape
    if q_full is None:
        q_full = attn.q_proj(x_TD).view(BT, H, d)
    tok_N = torch.arange(BT, device=x_TD.device).repeat_interleave(K)
    routed = getattr(attn, "_routed_heads", None)  # the routed heads' ids, made once per device (no copy a call)
    if routed is None or routed.device != x_TD.device:
        routed = attn._routed_heads = torch.as_tensor(attn.routed, device=x_TD.device)
    h_N = routed[ids_TK.reshape(-1)]
    o_BTHd = q_full.new_zeros(BT, H, d)
    routed_attention(q_full, cos_Td.to(q_full.dtype), sin_Td.to(q_full.dtype), tok_N, h_N, weights_TK.reshape(-1),
                     tok_N // T, h_N // group, S_k - T + tok_N % T, k_BGSd, v_BGSd, attn.scaling, o_BTHd)
    return Fn.linear(o_BTHd.view(BT, H * d), attn.o_proj.weight)
