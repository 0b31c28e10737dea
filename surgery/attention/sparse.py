"""The sparse head-expert path: work only for the (token, head) pairs the router chose.

Shape legend: B batch, T query tokens, S_k key positions (cache included), D hidden, H query heads,
G key/value heads, d head dim, n tokens that chose a head, C rows per chunk, L keys a chunk can see.

Keys and values are dense and shared (computed and cached for every token by the caller); only queries are
sparse. Shared heads run as one dense attention over every token. Routed heads attend only the (token, head)
pairs the router chose:
  * Prefill on CPU without a padding mask: the pairs of every routed head, grouped by batch row and key/value
    group and put in position order, go through causal_rows: blocks of BLOCK_ROWS rows, the keys before a
    block's first row through the fused flash kernel unmasked, the band of keys inside the block through one
    masked flash call for all blocks, merged by log-sum-exp; each row reads only the keys it can see, as a
    causal dense attention does. The weighted outputs go through o_proj once.
  * Prefill with a padding mask: per routed head, its tokens' query rows, CHUNK rows at a time by masked sdpa
    over the keys up to the chunk's last row, and its slice of o_proj added back with index_add_.
  * Decode (T = 1): each selected token's keys are gathered instead, so a batch is one matmul per head.
  * On CUDA with Triton (and no attention mask): one kernel launch attends every selected (token, head) pair
    (surgery_kernels/head_attention.py), with no per-head loop around it: the query rows are gathered from
    the full q projection, and the weighted outputs go through o_proj as one [B*T, H*d] matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from surgery.attention.heads import heads_index, rope


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
BLOCK_ROWS = 256  # rows per block of the CPU flash path (no mask): at least four of the flash kernel's 64-row
#                  query tiles (so both cores work), few enough that a block's band of positions stays short


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


# The CPU flash kernel behind sdpa, called directly: it returns each row's log-sum-exp, and it takes an additive
# mask while staying fused (sdpa with a mask falls back to the unfused math path on CPU: twice the time here).
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def causal_rows(q_nd, pos_n, k_Sd, v_Sd, scaling, rows: int | None = None):
    """Rows of queries at positions pos_n (ascending; repeats allowed: several heads' rows of one key/value
    group) attending causally to shared keys: out [n, d] float32. Cut into blocks of `rows` rows; block j spans
    positions first_j..last_j. The keys before first_j, seen by every row of the block, go through the fused
    flash kernel unmasked, one call per block; the band first_j..last_j, where rows see different keys, goes
    through one flash call for all blocks at once (their bands gathered, [blocks, W] keys, additive causal
    mask). Every row sees its band's first key, so no row is empty; the parts merge by log-sum-exp. The flash
    calls run in q's dtype (bfloat16 runs on AMX where the CPU has it, as the dense layer's sdpa does); their
    log-sum-exps are float32 and the merge is float32."""
    C = rows or BLOCK_ROWS
    n, d = q_nd.shape
    nb = -(-n // C)
    pad = nb * C - n
    q = q_nd
    if pad:  # padding rows repeat the last position: finite, dropped at the end
        q = torch.cat([q, q.new_zeros(pad, d)])
        pos_n = torch.cat([pos_n, pos_n[-1:].expand(pad)])
    q_bCd, pos_bC = q.view(nb, C, d), pos_n.view(nb, C)
    first = pos_bC[:, 0]
    W = int((pos_bC[:, -1] - first).max()) + 1
    key_bW = first[:, None] + torch.arange(W, device=q.device)[None, :]
    mask = torch.where(key_bW[:, None, :] > pos_bC[:, :, None], float("-inf"), 0.0).to(q.dtype)
    idx = key_bW.clamp(max=k_Sd.shape[0] - 1)  # keys past the end are masked anyway
    k, v = k_Sd.to(q.dtype), v_Sd.to(q.dtype)
    o_band, lse_band = _flash(q_bCd[:, None], k[idx][:, None], v[idx][:, None], 0.0, False,
                              attn_mask=mask[:, None], scale=scaling)
    o_band, lse_band = o_band[:, 0].float(), lse_band[:, 0]
    o_pre, lse_pre = torch.zeros_like(o_band), torch.full_like(lse_band, float("-inf"))
    for j, f in enumerate(first.tolist()):
        if f:
            o, lse = _flash(q_bCd[j][None, None], k[None, None, :f], v[None, None, :f], 0.0, False, scale=scaling)
            o_pre[j], lse_pre[j] = o[0, 0], lse[0, 0]
    total = torch.logaddexp(lse_pre, lse_band)  # merged in place: large temporaries cost page faults on CPU
    out = o_band.mul_((lse_band - total).exp_()[..., None]).add_(o_pre.mul_((lse_pre - total).exp_()[..., None]))
    return out.view(nb * C, d)[:n]


def _attend_prefill(q_nd, k_Sd, v_Sd, attention_mask, b, t_n, T, scaling):
    """One head's gathered queries of one batch row (positions t_n ascending) against that row's keys, CHUNK
    rows at a time by masked sdpa over the keys up to the chunk's last row (the path with a padding mask, or
    without the CPU flash kernel)."""
    S_k = k_Sd.shape[0]
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
    if attention_mask is None and T > 1 and x_BTD.device.type == "cpu" and _flash is not None \
            and not _use_kernel(attn, x_BTD):
        return _prefill_by_blocks(attn, x_TD, q_full, cos_Td, sin_Td, k_BGSd, v_BGSd, weights_TK, ids_TK,
                                  T).view(B, T, D)
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


def routed_heads(attn, device) -> torch.Tensor:
    """The routed heads' ids as a tensor, made once per device and kept on the module (no copy a call)."""
    routed = getattr(attn, "_routed_heads", None)
    if routed is None or routed.device != device:
        routed = attn._routed_heads = torch.as_tensor(attn.routed, device=device)
    return routed


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
    routed = routed_heads(attn, x_TD.device)
    h_N = routed[ids_TK.reshape(-1)]
    o_BTHd = q_full.new_zeros(BT, H, d)
    routed_attention(q_full, cos_Td.to(q_full.dtype), sin_Td.to(q_full.dtype), tok_N, h_N, weights_TK.reshape(-1),
                     tok_N // T, h_N // group, S_k - T + tok_N % T, k_BGSd, v_BGSd, attn.scaling, o_BTHd)
    return Fn.linear(o_BTHd.view(BT, H * d), attn.o_proj.weight)


def _prefill_by_blocks(attn, x_TD, q_full, cos_Td, sin_Td, k_BGSd, v_BGSd, weights_TK, ids_TK, T):
    """CPU prefill without a padding mask. Every query is projected and rotated at once, as the dense layer
    does (one matmul costs less here than gathering each head's token rows for its own). The shared heads of
    each key/value group attend every token through sdpa; the routed heads' selected (token, head) pairs,
    grouped by batch row and key/value group (the heads of a group read the same keys) and in position order,
    go through causal_rows: a few large flash calls per group instead of small ones per head. Every output
    lands in one [B*T, H*d] matrix (zeros where a token skipped a head) that goes through o_proj once, over the
    heads somebody used (a routed head nobody chose is never read). Returns [B*T, D]."""
    H, G, d = attn.heads, attn.kv_heads, attn.head_dim
    group, S_k = H // G, k_BGSd.shape[2]
    BT, K = ids_TK.shape
    B = BT // T
    dev = x_TD.device
    if q_full is None:
        q_full = attn.q_proj(x_TD).view(BT, H, d)
    q_BTHd = rope(q_full, cos_Td[:, None], sin_Td[:, None])
    o_BTHd = q_BTHd.new_zeros(BT, H, d)
    if attn.shared:  # per key/value group, its shared heads over every token (sdpa broadcasts the one kv head)
        mask = None
        if T != S_k:  # a cache before these tokens: causal from position S_k - T on
            mask = keep_mask(None, 0, torch.arange(T, device=dev), T, S_k, dev)
        for g in sorted({h // group for h in attn.shared}):
            hs = heads_index([h for h in attn.shared if h // group == g])
            q = q_BTHd.view(B, T, H, d)[:, :, hs].transpose(1, 2)
            out = Fn.scaled_dot_product_attention(q, k_BGSd[:, g:g + 1], v_BGSd[:, g:g + 1], attn_mask=mask,
                                                  is_causal=mask is None, scale=attn.scaling, enable_gqa=True)
            o_BTHd.view(B, T, H, d)[:, :, hs] = out.transpose(1, 2)
    routed = routed_heads(attn, dev)
    tok_N = torch.arange(BT, device=dev).repeat_interleave(K)
    r_N, w_N = ids_TK.reshape(-1), weights_TK.reshape(-1)
    h_N = routed[r_N]
    seg_N = (tok_N // T) * G + h_N // group  # (batch row, key/value group)
    order = torch.argsort(seg_N * T + tok_N % T, stable=True)
    tok_N, h_N, w_N, seg_N = tok_N[order], h_N[order], w_N[order], seg_N[order]
    pair_N = tok_N * H + h_N
    q_Nd = q_BTHd.reshape(BT * H, d).index_select(0, pair_N)
    o_Nd = torch.empty_like(q_Nd)
    start = 0
    for bg, count in enumerate(torch.bincount(seg_N, minlength=B * G).tolist()):
        if count:
            rows = slice(start, start + count)
            b, g = divmod(bg, G)
            o_Nd[rows] = causal_rows(q_Nd[rows], S_k - T + tok_N[rows] % T, k_BGSd[b, g], v_BGSd[b, g],
                                     attn.scaling)
            start += count
    o_BTHd.view(BT * H, d).index_copy_(0, pair_N, o_Nd.mul_(w_N.to(o_Nd.dtype)[:, None]))
    used = torch.zeros(H, dtype=torch.bool, device=dev)
    used[attn.shared] = True
    used[h_N] = True
    if bool(used.all()):
        return attn.o_proj(o_BTHd.view(BT, H * d))
    heads = used.nonzero().squeeze(-1)
    cols = (heads[:, None] * d + torch.arange(d, device=dev)[None, :]).reshape(-1)
    y = Fn.linear(o_BTHd[:, heads].reshape(BT, -1), attn.o_proj.weight[:, cols])
    return y if attn.o_proj.bias is None else y + attn.o_proj.bias
