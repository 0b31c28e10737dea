"""Attention heads as experts (surgery/attention/, issue 14) on tiny random Llamas: the dense-routing invariant,
the sparse path against the masked reference (prefill, padding, KV-cache decode), the learned router's fit,
save/load, the export refusal and the CLI."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.attention import HeadConfig, head_expert_modules
from surgery.attention.profile import profile_heads
from surgery.attention.router import fit_router
from surgery.cli import main
from surgery.convert import ConvertConfig, convert, convert_model
from surgery.errors import SurgeryError
from surgery.modeling import save_converted
from surgery.moe import set_dense_routing

from helpers import (decode_through_cache, greedy_with_and_without_cache, make_llama, randomise_head_routers,
                     relative_error)

TOL = 1e-5  # float32 logits, max |a - b| / max |b|


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def heads_cfg(top_k=2, shared=1, router="qnorm", experts=1, ffn_top_k=1, **kw):
    return ConvertConfig(experts=experts, top_k=ffn_top_k, attention_experts=True, attention_top_k=top_k,
                         shared_heads=shared, head_router=router, **kw)


def set_impl(model, impl):
    for m in head_expert_modules(model):
        m.impl = impl


# ---- the invariant: dense routing (every head, unit weights) is the dense model --------------------------

@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("router", ["qnorm", "learned"])
def test_invariant_dense_routing_equals_dense(tmp_path, tied, kv_heads, router):
    src = make_llama(tmp_path / "dense", tied=tied, kv_heads=kv_heads)
    convert(src, tmp_path / "moe", heads_cfg(top_k=1, shared=1, router=router, experts=5, ffn_top_k=2,
                                             shared_experts=1), progress=False)
    dense, moe = surgery.load(src), surgery.load(tmp_path / "moe")
    randomise_head_routers(moe)
    assert len(head_expert_modules(moe)) == 2
    ids = torch.randint(0, 128, (2, 17))
    sparse = logits(moe, ids)
    set_dense_routing(moe, True)  # heads and FFN experts switch together
    assert all(m.dense_routing for m in head_expert_modules(moe))
    assert relative_error(logits(moe, ids), logits(dense, ids)) <= TOL
    assert relative_error(sparse, logits(dense, ids)) > 1e-3  # routing really drops heads


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("impl", ["masked", "sparse"])
def test_all_heads_unit_weights_is_dense_in_every_path(tmp_path, kv_heads, impl):
    """K = H - S with equal scores (the learned router's zero init) gives every head weight 1: the routed paths
    themselves, not only the dense_routing switch, compute the dense model."""
    src = make_llama(tmp_path / "dense", kv_heads=kv_heads)
    convert(src, tmp_path / "moe", heads_cfg(top_k=3, shared=1, router="learned"), progress=False)
    dense, moe = surgery.load(src), surgery.load(tmp_path / "moe")
    set_impl(moe, impl)
    ids = torch.randint(0, 128, (2, 13))
    assert relative_error(logits(moe, ids), logits(dense, ids)) <= TOL


def test_mistral_invariant(tmp_path):
    src = make_llama(tmp_path / "dense", model_type="mistral")
    convert(src, tmp_path / "moe", heads_cfg(top_k=2, shared=0), progress=False)
    dense, moe = surgery.load(src), surgery.load(tmp_path / "moe")
    set_dense_routing(moe, True)
    ids = torch.randint(0, 128, (1, 9))
    assert type(moe).__name__ == "MistralForCausalLM"
    assert relative_error(logits(moe, ids), logits(dense, ids)) <= TOL


# ---- the sparse path against the masked reference --------------------------------------------------------

SPARSE_TOL = 1e-5  # float32: the same products summed in another order


@pytest.mark.parametrize("kv_heads,shared,top_k,router", [
    (4, 0, 1, "qnorm"), (2, 1, 2, "qnorm"), (1, 2, 1, "qnorm"), (2, 0, 3, "learned"), (4, 1, 1, "learned")])
def test_sparse_equals_masked(tmp_path, kv_heads, shared, top_k, router):
    src = make_llama(tmp_path / "dense", kv_heads=kv_heads)
    convert(src, tmp_path / "moe", heads_cfg(top_k=top_k, shared=shared, router=router), progress=False)
    moe = surgery.load(tmp_path / "moe")
    randomise_head_routers(moe, seed=kv_heads)
    ids = torch.randint(0, 128, (3, 21))
    set_impl(moe, "masked")
    ref = logits(moe, ids)
    set_impl(moe, "sparse")
    assert relative_error(logits(moe, ids), ref) <= SPARSE_TOL
    # every token really skipped heads: the masked reference's weights hold exactly H - S - K zeros per token
    set_impl(moe, "masked")
    logits(moe, ids)
    w = head_expert_modules(moe)[0].last_head_weights
    assert ((w == 0).sum(-1) == 4 - shared - top_k).all()
    assert torch.allclose(w[:, head_expert_modules(moe)[0].routed].sum(-1), torch.full((63,), float(top_k)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_causal_rows_equals_naive_causal_attention(dtype, tol):
    """The CPU block path (prefix by flash, band by one masked flash call, merged by log-sum-exp) against a
    float32 O(n S) softmax on the same (dtype-rounded) inputs; repeated positions, as several heads' rows of one
    key/value group give, and blocks that do not divide the rows. bfloat16 runs the flash calls in bfloat16
    (tolerance: its 8-bit mantissa), float32 in float32."""
    from surgery.attention.sparse import _flash, causal_rows

    if _flash is None:
        pytest.skip("this torch has no CPU flash kernel")
    g = torch.Generator().manual_seed(0)
    S, d = 150, 16
    pos = torch.sort(torch.randint(0, S, (230,), generator=g)).values
    q = torch.randn(230, d, generator=g).to(dtype)
    k, v = torch.randn(S, d, generator=g).to(dtype), torch.randn(S, d, generator=g).to(dtype)
    out = causal_rows(q, pos, k, v, 0.25, rows=64)
    scores = (q.float() @ k.float().t()) * 0.25
    scores = scores.masked_fill(torch.arange(S)[None, :] > pos[:, None], float("-inf"))
    ref = torch.softmax(scores, -1) @ v.float()
    assert out.dtype == torch.float32 and out.shape == (230, d)
    assert (out - ref).abs().max() / ref.abs().max() <= tol


def test_demo_layout_nine_heads_three_kv(tmp_path):
    """SmolLM2's layout (9 query heads on 3 key/value heads), S = 3, K = 4: invariant and sparse == masked."""
    src = make_llama(tmp_path / "dense", hidden=72, heads=9, kv_heads=3)
    convert(src, tmp_path / "moe", heads_cfg(top_k=4, shared=3), progress=False)
    dense, moe = surgery.load(src), surgery.load(tmp_path / "moe")
    ids = torch.randint(0, 128, (2, 19))
    set_impl(moe, "masked")
    ref = logits(moe, ids)
    set_impl(moe, "sparse")
    assert relative_error(logits(moe, ids), ref) <= SPARSE_TOL
    set_dense_routing(moe, True)
    assert relative_error(logits(moe, ids), logits(dense, ids)) <= TOL


def test_sparse_equals_masked_with_padding_mask(tmp_path):
    src = make_llama(tmp_path / "dense", kv_heads=2)
    convert(src, tmp_path / "moe", heads_cfg(top_k=2, shared=1), progress=False)
    moe = surgery.load(tmp_path / "moe")
    ids = torch.randint(1, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding in the second row
    set_impl(moe, "masked")
    ref = logits(moe, ids, attention_mask=mask)
    set_impl(moe, "sparse")
    out = logits(moe, ids, attention_mask=mask)
    assert relative_error(out[0], ref[0]) <= SPARSE_TOL
    assert relative_error(out[1, 4:], ref[1, 4:]) <= SPARSE_TOL


@pytest.mark.parametrize("impl", ["sparse", "masked"])
def test_kv_cache_decode(tmp_path, impl):
    """Prefill then decode steps through the cache give the logits of one full forward (each path), and
    greedy generation with and without the cache agree; sparse decode equals masked decode."""
    src = make_llama(tmp_path / "dense", kv_heads=2)
    convert(src, tmp_path / "moe", heads_cfg(top_k=1, shared=1), progress=False)
    moe = surgery.load(tmp_path / "moe")
    set_impl(moe, impl)
    ids = torch.randint(0, 128, (2, 11))
    assert relative_error(decode_through_cache(moe, ids, prefill=8), logits(moe, ids)) <= SPARSE_TOL
    cached, uncached = greedy_with_and_without_cache(moe, ids[:1, :5])
    assert torch.equal(cached, uncached)


# ---- routing, shared heads and the learned router's initialisation ---------------------------------------

def test_fit_router_recovers_a_linear_log_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    W, b = torch.randn(3, 16, generator=g) * 0.3, torch.randn(3, generator=g)
    w_fit, b_fit = fit_router(x, (x @ W.T + b).exp(), ridge=0.0)
    assert torch.allclose(w_fit, W, atol=1e-4) and torch.allclose(b_fit, b, atol=1e-4)


def test_profiled_heads_choose_shared_and_fit_router(tmp_path):
    src = make_llama(tmp_path / "dense", kv_heads=2)
    dense = surgery.load(src)
    stats = profile_heads(dense, torch.randint(0, 128, (512,)), ctx=64, samples=256, progress=False)
    s0 = stats[0]
    assert s0.inputs.shape == (256, 64) and s0.out_norms.shape == (256, 4) and s0.tokens == 512
    # the hooks' per-head norms are the heads' real contributions: summed they rebuild the attention output
    cfg = heads_cfg(top_k=2, shared=1, router="learned")
    cfg.head_stats = stats
    convert(src, tmp_path / "moe", cfg, progress=False)
    block = json.loads((tmp_path / "moe" / "config.json").read_text())["surgery"]["attention"]
    assert block["init"] == "profile"
    assert block["shared"] == [[int(stats[i].contribution.argmax())] for i in range(2)]
    moe = surgery.load(tmp_path / "moe")
    attn = head_expert_modules(moe)[0]
    assert attn.shared == block["shared"][0]
    # the fitted router predicts log head norms better than a constant per head (the zero init's best)
    x, y = s0.inputs.float(), s0.out_norms[:, attn.routed].log()
    pred = x @ attn.router.weight.T + attn.router.bias
    assert (pred - y).pow(2).mean() < (y - y.mean(0)).pow(2).mean()


def test_head_norm_hooks_match_attention_output(tmp_path, monkeypatch):
    """A head's profiled output norm is the norm of the attention block's output with only that head on (weight
    1, through the masked path's own per-head weights)."""
    import surgery.attention.heads as heads_mod

    src = make_llama(tmp_path / "dense", kv_heads=2, layers=1)
    ids = torch.randint(0, 128, (1, 32))
    stats = profile_heads(surgery.load(src), ids[0], ctx=32, samples=32, progress=False)
    convert(src, tmp_path / "moe", heads_cfg(top_k=3, shared=0, router="learned"), progress=False)
    moe = surgery.load(tmp_path / "moe")
    set_impl(moe, "masked")
    attn = head_expert_modules(moe)[0]
    norms = []
    for h in range(4):
        monkeypatch.setattr(heads_mod, "head_weights",
                            lambda *a, h=h: torch.nn.functional.one_hot(torch.full((32,), h), 4).float())
        got = {}
        hook = attn.o_proj.register_forward_hook(lambda m, a, o: got.setdefault("y", o))
        logits(moe, ids)
        hook.remove()
        norms.append(got["y"][0].norm(dim=-1))
    assert torch.allclose(torch.stack(norms, -1), stats[0].out_norms, rtol=1e-4, atol=1e-5)


def test_sparse_path_skips_unselected_work(tmp_path, monkeypatch):
    """Only selected (token, head) pairs are computed: a head no token chooses may hold NaN weights without
    touching the output, and the routed heads' attention rows number exactly tokens x K."""
    import surgery.attention.sparse as sparse_mod

    src = make_llama(tmp_path / "dense", kv_heads=2)
    convert(src, tmp_path / "moe", heads_cfg(top_k=1, shared=1, router="learned"), progress=False)
    moe = surgery.load(tmp_path / "moe")
    randomise_head_routers(moe)
    ids = torch.randint(0, 128, (2, 15))
    set_impl(moe, "masked")
    ref = logits(moe, ids)
    rows = []
    real_attend = sparse_mod.causal_rows
    monkeypatch.setattr(sparse_mod, "causal_rows", lambda q, *a: rows.append(q.shape[0]) or real_attend(q, *a))
    set_impl(moe, "sparse")
    assert relative_error(logits(moe, ids), ref) <= SPARSE_TOL
    assert sum(rows) == 2 * 30 * 1  # layers x tokens x K
    with torch.no_grad():  # head 3 (routed row 2) is never chosen; poison its q rows and o columns
        for m in head_expert_modules(moe):
            m.router.bias[2] = -1e4
            m.q_proj.weight[48:64] = float("nan")
            m.o_proj.weight[:, 48:64] = float("nan")
    assert torch.isfinite(logits(moe, ids)).all()
    set_impl(moe, "masked")
    assert torch.isnan(logits(moe, ids)).any()  # the reference computes every head


# ---- native format, in-memory conversion, export refusal, info ------------------------------------------

def test_save_load_round_trip_bit_exact(tmp_path, tiny_llama):
    convert(tiny_llama, tmp_path / "a", heads_cfg(top_k=2, shared=1, router="learned", experts=4, ffn_top_k=2),
            progress=False)
    a = surgery.load(tmp_path / "a")
    randomise_head_routers(a)
    save_converted(a, tmp_path / "b", tokenizer_from=tmp_path / "a")
    b = surgery.load(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["surgery"]["attention"] == \
        json.loads((tmp_path / "a" / "config.json").read_text())["surgery"]["attention"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and "model.layers.0.self_attn.router.weight" in sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(logits(a, ids), logits(b, ids))


def test_config_block_records_heads(tmp_path, tiny_llama):
    summary = convert(tiny_llama, tmp_path / "moe", heads_cfg(top_k=2, shared=1), progress=False)
    block = json.loads((tmp_path / "moe" / "config.json").read_text())["surgery"]["attention"]
    assert (block["heads"], block["kv_heads"], block["top_k"], block["shared_heads"], block["router"]) == \
        (4, 2, 2, 1, "qnorm")
    assert block["shared"] == [[0], [0]] and block["active_head_fraction"] == 0.75
    assert summary["attention_top_k"] == 2 and summary["active_head_fraction"] == 0.75
    # qnorm adds no tensors: the checkpoint holds the source's attention projections under their own names
    from safetensors import safe_open
    with safe_open(str(tmp_path / "moe" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "router" in k and "self_attn" in k]


def test_in_memory_conversion_matches_streaming(tmp_path, tiny_llama):
    cfg = heads_cfg(top_k=2, shared=1, router="learned", experts=4, ffn_top_k=2, seed=3)
    convert(tiny_llama, tmp_path / "moe", cfg, progress=False)
    streamed = surgery.load(tmp_path / "moe")
    in_memory = convert_model(surgery.load(tiny_llama), cfg)
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert in_memory.surgery_config.attention == streamed.surgery_config.attention
    ids = torch.randint(0, 128, (1, 7))
    assert torch.equal(logits(streamed, ids), logits(in_memory, ids))


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe", "gguf"])
def test_stock_exports_refuse_head_experts(tmp_path, tiny_llama, fmt):
    from surgery.export import export, export_model

    convert(tiny_llama, tmp_path / "moe", heads_cfg(experts=4, ffn_top_k=2, shared=1), progress=False)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    with pytest.raises(SurgeryError, match="routes its attention heads"):
        export_model(tmp_path / "moe", out, fmt, progress=False)
    assert not out.exists()
    if fmt != "gguf":
        with pytest.raises(SurgeryError, match="no stock architecture"):
            export(surgery.load(tmp_path / "moe"), out, fmt, progress=False)
    else:
        from surgery.export.gguf import write_gguf
        with pytest.raises(SurgeryError, match="no stock architecture"):
            write_gguf(surgery.load(tmp_path / "moe"), out, tokenizer_from=tmp_path / "moe", progress=False)
    assert not out.exists()
    export_model(tmp_path / "moe", tmp_path / "native", "native", progress=False)  # native carries them
    assert surgery.load(tmp_path / "native").surgery_config.attention["top_k"] == 2


def test_info_counts_active_attention(tmp_path, tiny_llama):
    from surgery.info import model_info

    D, d, L = 64, 16, 2
    dense = model_info(surgery.load(tiny_llama))
    assert dense["attention_parameters"] == L * (2 * 4 * d * D + 2 * 2 * d * D)
    assert dense["active_attention_parameters"] == dense["attention_parameters"]
    for router, q_heads, router_params in [("qnorm", 4, 0), ("learned", 3, 3 * D + 3)]:
        convert(tiny_llama, tmp_path / router, heads_cfg(top_k=2, shared=1, router=router), progress=False)
        info = model_info(surgery.load(tmp_path / router))
        active = L * (2 * 2 * d * D + q_heads * d * D + 3 * d * D + router_params)
        assert info["active_attention_parameters"] == active
        assert info["attention_flops_per_token"] == 2 * active
        assert info["attention_score_flops_per_token_per_position"] == 4 * d * 3 * L
        assert dense["attention_score_flops_per_token_per_position"] == 4 * d * 4 * L
        assert info["active_heads"] == 3 and info["attention"]["router"] == router
        idle_attention = info["attention_parameters"] - info["active_attention_parameters"]
        assert info["active_parameters"] == info["total_parameters"] - idle_attention  # E1 K1: FFN all active
        assert info["ffn_flops_per_token"] == 2 * L * (3 * D * 96 + D)  # the one FFN expert and its router row


# ---- CLI --------------------------------------------------------------------------------------------------

def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_convert_info_eval(tmp_path, tiny_llama, text_file):
    moe = tmp_path / "moe"
    r = run_cli("convert", tiny_llama, moe, "--attention-experts", "--attention-top-k", 2, "--shared-heads", 1,
                "--head-router", "qnorm")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["active_head_fraction"] == 0.75 and json.loads(r.stdout)["experts"] == 1
    info = json.loads(run_cli("info", moe, "--json").stdout)
    assert info["active_head_fraction"] == 0.75
    assert info["active_attention_parameters"] < info["attention_parameters"]
    res = {}
    runs = [("dense", tiny_llama, []), ("heads", moe, []), ("heads_dense", moe, ["--dense-routing"])]
    for name, model, extra in runs:
        r = run_cli("eval", "perplexity", model, "--data", text_file, "--max-tokens", 300, "--ctx", 100,
                    "--device", "cpu", *extra)
        assert r.exit_code == 0, r.output
        res[name] = json.loads(r.stdout)["perplexity"]
    assert math.isclose(res["heads_dense"], res["dense"], rel_tol=1e-5)
    assert not math.isclose(res["heads"], res["dense"], rel_tol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--attention-experts", "--attention-top-k", 4, "--shared-heads", 1], "--attention-top-k 4"),
    (["--attention-experts", "--attention-top-k", 0], "--attention-top-k 0"),
    (["--attention-experts", "--shared-heads", 4], "--shared-heads 4"),
    (["-E", 4, "-K", 2, "--shared-heads", 1], "need --attention-experts"),
    ([], "--experts and --top-k are required"),
])
def test_cli_bad_head_flags(tmp_path, tiny_llama, args, message):
    out = tmp_path / "moe"
    r = run_cli("convert", tiny_llama, out, *args)
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "dense"]


def test_cli_profile_without_heads_is_refused(tmp_path, tiny_llama):
    """A profile without head statistics cannot silently give data-free heads."""
    from surgery.profile import save_profile

    save_profile({}, tmp_path / "p.pt")
    r = run_cli("convert", tiny_llama, tmp_path / "moe", "--attention-experts", "--profile", tmp_path / "p.pt")
    assert r.exit_code == 2 and "surgery profile --heads" in r.stderr
    assert not (tmp_path / "moe").exists()


def test_head_config_validates():
    HeadConfig(heads=9, kv_heads=3, top_k=4, shared_heads=3).validate(30)
    with pytest.raises(SurgeryError, match="--head-router"):
        HeadConfig(heads=9, kv_heads=3, top_k=4, router="mlp").validate()
    with pytest.raises(SurgeryError, match="attention.shared"):
        HeadConfig(heads=4, kv_heads=2, top_k=1, shared_heads=1, shared=[[0], [7]]).validate(2)
