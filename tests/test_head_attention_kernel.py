"""The sparse head path's attention over selected (token, head) pairs, against references.

Shape legend: N pairs, B batch, G key/value heads, S_k key positions, T query tokens, d head dim.

Ground truth layers: a naive per-pair loop in float64 checks the blocked CPU path (surgery/attention/sparse.py)
and the Triton kernel (kernels/head_attention.py); the masked module path (every head computed, unselected
heads weighted 0) checks the whole sparse block with each of them. Without a GPU the kernel runs in the Triton
interpreter (TRITON_INTERPRET=1, float32 and float16); with one the CUDA tests run too.
Tolerances: float32 max |a - b| <= 1e-4 (outputs O(1)) and model logits relative 1e-5 (CPU path) / 1e-4 (the
kernel: another summation order, online softmax); float16 2e-3 of the output's scale.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of a @triton.jit module

import surgery  # noqa: E402
import surgery.attention.sparse as sparse_mod  # noqa: E402
from surgery.attention import head_expert_modules  # noqa: E402
from surgery.convert import ConvertConfig, convert  # noqa: E402

from helpers import (decode_through_cache, make_llama, randomise_head_routers, relative_error,  # noqa: E402
                     require_triton)

DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def kernel():
    require_triton(CUDA)
    from surgery_kernels.head_attention import pair_attention

    return pair_attention


def naive_pairs(q_Nd, b_N, g_N, pos_N, k_BGSd, v_BGSd, scaling, key_keep_BS=None):
    """One pair at a time, float64: softmax over the kept keys 0..pos; zeros when none is kept."""
    out = torch.zeros(q_Nd.shape, dtype=torch.float64)
    for n in range(q_Nd.shape[0]):
        b, g, p = int(b_N[n]), int(g_N[n]), int(pos_N[n])
        k, v = k_BGSd[b, g, :p + 1].double().cpu(), v_BGSd[b, g, :p + 1].double().cpu()
        keep = torch.ones(p + 1, dtype=torch.bool) if key_keep_BS is None else key_keep_BS[b, :p + 1].cpu()
        if keep.any():
            s = (k[keep] @ q_Nd[n].double().cpu()) * scaling
            out[n] = torch.softmax(s, 0) @ v[keep]
    return out


def random_pairs(B, G, S_k, T, N, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, G, S_k, d, generator=g), torch.randn(B, G, S_k, d, generator=g)
    q = torch.randn(N, d, generator=g)
    b_N, g_N = torch.randint(0, B, (N,), generator=g), torch.randint(0, G, (N,), generator=g)
    pos = S_k - T + torch.randint(0, T, (N,), generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), b_N.to(device), g_N.to(device), pos.to(device), to(k), to(v)


# ---- the blocked CPU prefill path --------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 4, 7, 256])
def test_causal_rows_match_naive(rows):
    """Rows of several heads of one key/value group (positions ascending, repeated: up to three rows at one
    position) against that group's keys with a KV cache offset (S_k > T): blocks smaller than, equal to and
    larger than a band, a ragged last block."""
    g = torch.Generator().manual_seed(rows)
    T, S_k, d = 50, 61, 16
    pos = torch.cat([S_k - T + torch.randperm(T, generator=g)[:n] for n in (31, 20, 9)]).sort().values
    q, k, v = torch.randn(len(pos), d, generator=g), torch.randn(S_k, d, generator=g), torch.randn(S_k, d, generator=g)
    o = sparse_mod.causal_rows(q, pos, k, v, 0.25, rows)
    zeros = torch.zeros(len(pos), dtype=torch.long)
    ref = naive_pairs(q, zeros, zeros, pos, k[None, None], v[None, None], 0.25)
    assert o.shape == q.shape and torch.isfinite(o).all()
    assert (o.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_prefill_chunks_with_padding_mask_match_naive(monkeypatch, chunk):
    """One head's gathered queries (a random subset of positions, ascending) under transformers' 4D boolean
    mask (causal, the first 9 keys padded), CHUNK rows at a time."""
    monkeypatch.setattr(sparse_mod, "CHUNK", chunk)
    g = torch.Generator().manual_seed(chunk)
    T, S_k, d = 50, 61, 16
    t_n = torch.randperm(T, generator=g)[:31].sort().values
    q, k, v = torch.randn(31, d, generator=g), torch.randn(S_k, d, generator=g), torch.randn(S_k, d, generator=g)
    key_keep = torch.ones(1, S_k, dtype=torch.bool)
    key_keep[0, :9] = False
    causal = torch.arange(S_k)[None, :] <= (S_k - T + torch.arange(T))[:, None]
    o = sparse_mod._attend_prefill(q, k, v, (causal & key_keep)[None, None], 0, t_n, T, 0.25)
    ref = naive_pairs(q, torch.zeros(31, dtype=torch.long), torch.zeros(31, dtype=torch.long), S_k - T + t_n,
                      k[None, None], v[None, None], 0.25, key_keep)
    assert torch.isfinite(o).all()
    assert (o.double() - ref).abs().max() <= 1e-5


def test_causal_rows_read_only_their_keys(monkeypatch):
    """The work really is causal: one masked flash call covers every block's band (from its first row's
    position to its last), and each block's unmasked call reads only the keys before its first row, never the
    rest of S_k (key counts worked out by hand: blocks [0 3 4 10] [11 12 30 31] [90 + 3 padding rows])."""
    calls = []
    real = sparse_mod._flash
    monkeypatch.setattr(sparse_mod, "_flash",
                        lambda q, k, *a, **kw: calls.append((q.shape[0], k.shape[2], "attn_mask" in kw))
                        or real(q, k, *a, **kw))
    pos = torch.tensor([0, 3, 4, 10, 11, 12, 30, 31, 90])
    q, k, v = torch.randn(9, 8), torch.randn(100, 8), torch.randn(100, 8)
    o = sparse_mod.causal_rows(q, pos, k, v, 1.0, 4)
    assert calls == [(3, 21, True), (1, 11, False), (1, 90, False)]  # band W = 31 - 11 + 1; prefixes 11, 90
    zeros = torch.zeros(9, dtype=torch.long)
    ref = naive_pairs(q, zeros, zeros, pos, k[None, None], v[None, None], 1.0)
    assert (o.double() - ref).abs().max() <= 1e-5


def heads_model(tmp_path, top_k, shared, router="learned", kv_heads=2, heads=4, hidden=64, seed=0):
    src = make_llama(tmp_path / "dense", kv_heads=kv_heads, heads=heads, hidden=hidden)
    convert(src, tmp_path / "moe", ConvertConfig(experts=1, top_k=1, attention_experts=True, attention_top_k=top_k,
                                                 shared_heads=shared, head_router=router), progress=False)
    moe = surgery.load(tmp_path / "moe")
    randomise_head_routers(moe, seed)
    return moe


def model_logits(moe, ids, impl, kernel="torch", **kw):
    for m in head_expert_modules(moe):
        m.impl, m.sparse_kernel = impl, kernel
    with torch.no_grad():
        return moe(input_ids=ids, **kw).logits


@pytest.mark.parametrize("router", ["qnorm", "learned"])
def test_sparse_equals_masked_at_longer_context(tmp_path, monkeypatch, router):
    """T = 300 (blocks of 16 rows per key/value group, CHUNK 32 with the mask), batch 2, left padding."""
    monkeypatch.setattr(sparse_mod, "CHUNK", 32)
    monkeypatch.setattr(sparse_mod, "BLOCK_ROWS", 16)
    moe = heads_model(tmp_path, top_k=2, shared=1, router=router)
    ids = torch.randint(1, 128, (2, 300), generator=torch.Generator().manual_seed(1))
    ref = model_logits(moe, ids, "masked")
    assert relative_error(model_logits(moe, ids, "sparse"), ref) <= 1e-5
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :37] = 0
    ref = model_logits(moe, ids, "masked", attention_mask=mask)
    out = model_logits(moe, ids, "sparse", attention_mask=mask)
    assert torch.isfinite(out).all()
    assert relative_error(out[0], ref[0]) <= 1e-5 and relative_error(out[1, 37:], ref[1, 37:]) <= 1e-5


@pytest.mark.parametrize("router", ["qnorm", "learned"])
def test_blocked_prefill_after_a_cache_equals_one_pass(tmp_path, monkeypatch, router):
    """A second prefill chunk with no mask (T = 7 after 8 cached tokens): every row sees the cache and its own
    chunk causally, the same outputs as one pass over all 15 tokens (blocks of 4 rows, shared and routed)."""
    from transformers import DynamicCache

    monkeypatch.setattr(sparse_mod, "BLOCK_ROWS", 4)
    moe = heads_model(tmp_path, top_k=2, shared=1, router=router)
    attn = head_expert_modules(moe)[0]
    attn.impl = "sparse"
    x = torch.randn(2, 15, 64, generator=torch.Generator().manual_seed(3))
    cos, sin = moe.model.rotary_emb(x, torch.arange(15)[None].expand(2, -1))
    with torch.no_grad():
        full = attn(x, (cos, sin), attention_mask=None)[0]
        cache = DynamicCache()
        attn(x[:, :8], (cos[:, :8], sin[:, :8]), attention_mask=None, past_key_values=cache)
        second = attn(x[:, 8:], (cos[:, 8:], sin[:, 8:]), attention_mask=None, past_key_values=cache)[0]
    assert relative_error(second, full[:, 8:]) <= 1e-5


# ---- the Triton kernel ------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,G,S_k,T,N,d", [(1, 1, 40, 40, 37, 16), (2, 3, 53, 41, 90, 16), (2, 2, 70, 1, 5, 24)])
def test_kernel_matches_naive(kernel, B, G, S_k, T, N, d):
    """Pairs in random order over batch rows and key/value heads, a cache offset (S_k > T), decode (T = 1), a
    head dim that is not a power of two (24), segments longer than one block (16 rows under the interpreter)."""
    q, b, g, pos, k, v = random_pairs(B, G, S_k, T, N, d, device=DEV)
    o = kernel(q, b, g, pos, k, v, d ** -0.5)
    assert o.shape == (N, d) and o.dtype == torch.float32
    assert (o.double().cpu() - naive_pairs(q, b, g, pos, k, v, d ** -0.5)).abs().max() <= 1e-4


def test_kernel_key_padding_and_empty_rows(kernel):
    """A key mask per batch row; a row whose every visible key is masked gives zeros, not NaN."""
    B, G, S_k, T, N, d = 2, 2, 48, 48, 60, 16
    q, b, g, pos, k, v = random_pairs(B, G, S_k, T, N, d, device=DEV, seed=3)
    keep = torch.ones(B, S_k, dtype=torch.bool)
    keep[1, :20] = False
    pos[0], b[0] = 5, 1  # sees keys 0..5 of row 1: all padded
    o = kernel(q, b, g, pos, k, v, 0.3, keep.to(DEV))
    ref = naive_pairs(q, b, g, pos, k, v, 0.3, keep)
    assert torch.isfinite(o).all() and (o[0] == 0).all()
    assert (o.double().cpu() - ref).abs().max() <= 1e-4


def test_kernel_float16(kernel):
    q, b, g, pos, k, v = random_pairs(2, 2, 40, 40, 50, 16, dtype=torch.float16, device=DEV, seed=5)
    o = kernel(q, b, g, pos, k, v, 0.25)
    ref = naive_pairs(q, b, g, pos, k, v, 0.25)
    assert o.dtype == torch.float16
    assert (o.double().cpu() - ref).abs().max() <= 2e-3 * ref.abs().max()


def test_kernel_empty(kernel):
    q, b, g, pos, k, v = random_pairs(1, 1, 8, 8, 0, 16, device=DEV)
    assert kernel(q, b, g, pos, k, v, 1.0).shape == (0, 16)


def rope_ref(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_routed_attention_matches_gather_rope_scatter(kernel, dtype, tol):
    """routed_attention (queries read in place from the un-rotated projection, RoPE in registers, weighted
    outputs written to their (token, head) slot) against the same done in PyTorch: gather, rotate, the float64
    per-pair loop, weight, scatter; slots no pair falls in stay zero. Two batch rows of 21 tokens with a
    3-token cache offset, 6 query heads on 3 key/value heads (d 16), each token choosing 2 distinct heads."""
    from surgery_kernels.head_attention import routed_attention

    g = torch.Generator().manual_seed(11)
    B, T, H, G, d, S_k, K = 2, 21, 6, 3, 16, 24, 2
    q = torch.randn(B * T, H, d, generator=g)
    angles = torch.randn(B * T, d // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    k, v = torch.randn(B, G, S_k, d, generator=g), torch.randn(B, G, S_k, d, generator=g)
    ids = torch.stack([torch.randperm(H, generator=g)[:K] for _ in range(B * T)])  # [B*T, K] distinct heads
    w = torch.rand(B * T, K, generator=g)
    tok, h = torch.arange(B * T).repeat_interleave(K), ids.reshape(-1)
    b, pos = tok // T, S_k - T + tok % T
    to = lambda t: t.to(DEV, dtype)  # noqa: E731
    out = torch.zeros(B * T, H, d, dtype=dtype, device=DEV)
    routed_attention(to(q), to(cos), to(sin), tok.to(DEV), h.to(DEV), w.reshape(-1).to(DEV), b.to(DEV),
                     (h // (H // G)).to(DEV), pos.to(DEV), to(k), to(v), d ** -0.5, out)
    qr = rope_ref(to(q)[tok, h].double().cpu(), cos[tok].double(), sin[tok].double())
    ref = torch.zeros(B * T, H, d, dtype=torch.float64)
    ref[tok, h] = naive_pairs(qr, b, h // (H // G), pos, to(k), to(v), d ** -0.5) * w.reshape(-1, 1).double()
    assert (out.double().cpu() - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
    chosen = torch.zeros(B * T, H, dtype=torch.bool)
    chosen[tok, h] = True
    assert (out.cpu()[~chosen] == 0).all()


@pytest.mark.parametrize("kv_heads,shared,top_k,router", [(2, 1, 2, "qnorm"), (4, 0, 1, "learned"),
                                                           (1, 2, 1, "learned")])
def test_sparse_block_with_kernel_equals_masked(tmp_path, kernel, monkeypatch, kv_heads, shared, top_k, router):
    """The whole sparse block with the routed heads attended by the kernel (one launch per layer) against the
    masked reference; the kernel really ran, once per layer."""
    import surgery_kernels.head_attention as ha

    moe = heads_model(tmp_path, top_k=top_k, shared=shared, router=router, kv_heads=kv_heads, seed=kv_heads).to(DEV)
    calls = []
    real = ha.routed_attention
    monkeypatch.setattr(ha, "routed_attention", lambda *a, **kw: calls.append(a[3].numel()) or real(*a, **kw))
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(2)).to(DEV)
    ref = model_logits(moe, ids, "masked")
    out = model_logits(moe, ids, "sparse", kernel="triton")
    assert calls == [2 * 23 * top_k] * 2  # pairs = tokens x K, both layers
    assert relative_error(out, ref) <= 1e-4


def test_sparse_block_with_kernel_decode(tmp_path, kernel, monkeypatch):
    """Prefill then decode through the KV cache with the kernel gives one full masked forward's logits."""
    import surgery_kernels.head_attention as ha

    calls = []
    real = ha.routed_attention
    monkeypatch.setattr(ha, "routed_attention", lambda *a, **kw: calls.append(a[3].numel()) or real(*a, **kw))
    moe = heads_model(tmp_path, top_k=1, shared=1).to(DEV)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4)).to(DEV)
    full = model_logits(moe, ids, "masked")
    for m in head_expert_modules(moe):
        m.impl, m.sparse_kernel = "sparse", "triton"
    steps = decode_through_cache(moe, ids, prefill=9)
    assert calls == [2 * 9] * 2 + [2] * 6  # the prefill and every decode step went through the kernel
    assert relative_error(steps, full) <= 1e-4


COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from surgery_kernels import head_attention as ha

fn = ha._pair_attention_kernel
for dt, ieee, routed in (("fp16", False, True), ("bf16", False, True), ("bf16", False, False), ("fp32", True, True)):
    types = dict(q_ptr="*" + dt, k_ptr="*" + dt, v_ptr="*" + dt, o_ptr="*" + dt, row_ptr="*i64", tok_ptr="*i32",
                 pos_ptr="*i32", w_ptr="*fp32", cos_ptr="*" + dt, sin_ptr="*" + dt, blk_seg_ptr="*i32",
                 blk_start_ptr="*i32", blk_end_ptr="*i32", keep_ptr="*i8", qk_scale="fp32")
    consts = dict(ROPE=routed, HAS_W=routed, HAS_KEEP=not routed, IEEE=ieee, BLOCK_M=64, BLOCK_N=32, BLOCK_D=128,
                  BLOCK_H=64)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
"""


def test_kernel_compiles_for_hopper_without_a_gpu():
    """The kernel compiles to sm_90 in fp16, bf16 and fp32: GPU-only codegen errors the interpreter accepts."""
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget API")
    r = subprocess.run([sys.executable, "-c", COMPILE_CHECK], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_at_long_context(kernel, dtype):
    """4,096 keys, 64-dim heads, many blocks: half precision within 2e-2 of the output's scale."""
    q, b, g, pos, k, v = random_pairs(1, 3, 4096, 4096, 6000, 64, dtype=dtype, device="cuda", seed=7)
    o = kernel(q, b, g, pos, k, v, 0.125)
    sub = torch.randperm(6000)[:200].cuda()
    ref = naive_pairs(q[sub], b[sub], g[sub], pos[sub], k, v, 0.125)
    assert (o[sub].double().cpu() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_tile_sweep_checks_candidates_against_dense_reference(tmp_path, monkeypatch):
    """evals/tune_head_kernel.py --smoke: every candidate's output matches the float32 dense reference, the
    best is written in SURGERY_HEAD_TILES' format and that format is read back by tiles_for; a candidate
    whose output is wrong is rejected, never chosen."""
    require_triton(CUDA)
    from surgery_evals import tune_head_kernel as tune
    from surgery_kernels import head_attention as ha

    best = tmp_path / "best.txt"
    out = tune.main(["--smoke", "--json", str(tmp_path / "t.json"), "--best-out", str(best)])
    assert len(out["rows"]) == 2 and all(r["ok"] and r["rel_error"] <= 1e-4 for r in out["rows"])
    text = best.read_text().strip()
    dim, tiles = text.split("=")
    assert dim == "16" and list(map(int, tiles.split(","))) == out["best"]["16"]["tiles"]
    case = tune.make_case(4, 2, 16, 40, 3, torch.float32, torch.device(DEV))
    assert (case["ref"].abs().sum(-1) > 0).sum() == 40 * 3  # exactly the selected pairs are non-zero
    real = tune.run_kernel
    monkeypatch.setattr(tune, "run_kernel", lambda c, t: real(c, t) * (1.0 if t[0] == 16 else 1.01))
    out = tune.main(["--smoke"])
    assert [r["ok"] for r in out["rows"]] == [True, False] and out["best"]["16"]["tiles"] == [16, 16, 1, 1]

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tiles_for's table, not the interpreter's fixed tile
    monkeypatch.setenv("SURGERY_HEAD_TILES", "64=128,64,8,2;128=64,128,4,3")
    assert ha.tiles_for(128) == (64, 128, 4, 3) and ha.tiles_for(64) == (128, 64, 8, 2)
    assert ha.tiles_for(96) == (64, 64, 4, 3)
    monkeypatch.setenv("SURGERY_HEAD_TILES", "128=64,64")
    with pytest.raises(ValueError, match="SURGERY_HEAD_TILES"):
        ha.tiles_for(128)


def test_blocks_split_sorted_segments():
    """_blocks against a plain loop: every segment's rows (some segments empty, one longer than a block) cut into
    blocks of at most block_m rows, padded with empty blocks to the static bound."""
    require_triton(CUDA)
    from surgery_kernels.head_attention import _blocks

    counts = [5, 0, 1, 9, 0]
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor(counts)).to(DEV)
    s, a, e, bound = _blocks(seg, 5, 4)
    want, start = [], 0
    for g, c in enumerate(counts):
        for first in range(start, start + c, 4):
            want.append((g, first, min(first + 4, start + c)))
        start += c
    got = [(int(x), int(y), int(z)) for x, y, z in zip(s, a, e)]
    assert bound == -(-15 // 4) + 5 and len(got) == bound
    assert got[:len(want)] == want and all(y == z for _, y, z in got[len(want):])


@needs_cuda
def test_routed_attention_never_syncs_with_the_host(kernel):
    """The GPU path queues its launches without reading anything back (a sync a layer idles the GPU)."""
    from surgery_kernels.head_attention import routed_attention

    T, H, d, K = 64, 4, 32, 3
    q = torch.randn(T, H, d, device="cuda", dtype=torch.float16)
    cos, sin = torch.ones(T, d, device="cuda", dtype=q.dtype), torch.zeros(T, d, device="cuda", dtype=q.dtype)
    tok = torch.arange(T, device="cuda").repeat_interleave(K)
    h = torch.rand(T, H, device="cuda").argsort(-1)[:, :K].reshape(-1)
    k = torch.randn(1, 2, T, d, device="cuda", dtype=q.dtype)
    out = torch.zeros_like(q)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routed_attention(q, cos, sin, tok, h, torch.ones(T * K, device="cuda"), tok * 0, h // 2, tok, k, k, 0.2, out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.abs().sum() > 0
