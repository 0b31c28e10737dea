"""Stick-breaking attention (surgery/attention/stick_breaking.py) against a naive O(T^2) Python loop on random
inputs, and as the head experts' attention function (--attention-fn stick-breaking): dense routing, the
KV cache, save/load, export refusal and the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.attention import head_expert_modules
from surgery.attention.stick_breaking import stick_breaking_attention
from surgery.cli import main
from surgery.convert import ConvertConfig, convert
from surgery.errors import SurgeryError
from surgery.modeling import save_converted
from surgery.moe import set_dense_routing

from helpers import decode_through_cache, greedy_with_and_without_cache, make_llama, relative_error

TOL = 1e-5  # float32 against the float64 loop, max |a - b| / max |b|


def naive(q, k, v, scaling, keep):
    """The definition, one query and one key at a time, in float64: walk back from the newest key; each kept
    key takes sigmoid(score) of the stick that is left. keep [B, T, S] bool. Returns [B, T, H, d]."""
    B, H, T, d = q.shape
    G, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, T, H, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(T):
                stick = 1.0
                for j in range(S - 1, -1, -1):
                    if not keep[b, t, j]:
                        continue
                    beta = torch.sigmoid(q[b, h, t].double() @ k[b, g, j].double() * scaling).item()
                    out[b, t, h] += stick * beta * v[b, g, j].double()
                    stick *= 1.0 - beta
    return out


def causal(B, T, S):
    j = torch.arange(S)
    t = torch.arange(T) + (S - T)
    return (j[None, :] <= t[:, None]).expand(B, T, S)


def rand_qkv(B, H, G, T, S, d, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, d, generator=g) * spread, torch.randn(B, G, S, d, generator=g) * spread,
            torch.randn(B, G, S, d, generator=g))


@pytest.mark.parametrize("H,G", [(4, 4), (6, 2), (3, 1)])  # MHA, grouped-query, multi-query
@pytest.mark.parametrize("T,S", [(9, 9), (3, 11)])  # prefill; queries at the end of a longer cache
def test_matches_naive_loop_causal(H, G, T, S):
    q, k, v = rand_qkv(2, H, G, T, S, 8, seed=H * 10 + T)
    out = stick_breaking_attention(q, k, v, 8 ** -0.5)  # mask None: plain causal
    assert out.shape == (2, T, H, 8)
    assert relative_error(out, naive(q, k, v, 8 ** -0.5, causal(2, T, S))) <= TOL


@pytest.mark.parametrize("kind", ["additive", "bool", "2d"])
def test_matches_naive_loop_with_padding(kind):
    """Left padding in row 1 (keys 0-3 hidden): masked keys take nothing and leave the stick whole."""
    B, H, G, T, d = 2, 6, 3, 10, 8
    q, k, v = rand_qkv(B, H, G, T, T, d, seed=5)
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :4] = False
    keep = causal(B, T, T) & pad[:, None, :]
    if kind == "2d":
        mask = pad.long()
    elif kind == "bool":
        mask = keep[:, None]
    else:
        mask = torch.zeros(B, 1, T, T).masked_fill(~keep[:, None], torch.finfo(torch.float32).min)
    out = stick_breaking_attention(q, k, v, d ** -0.5, mask)
    ref = naive(q, k, v, d ** -0.5, keep)
    assert relative_error(out[0], ref[0]) <= TOL
    assert relative_error(out[1, 4:], ref[1, 4:]) <= TOL  # padded query rows are never read


def test_weights_are_a_broken_stick():
    """Every weight in [0, 1], each row sums to at most 1; a very large score on the newest key takes the
    whole stick (the output is that key's value); with every score very negative the output vanishes."""
    from surgery.attention.stick_breaking import stick_breaking_weights

    s = torch.randn(3, 7, 7) * 4
    keep = causal(1, 7, 7)
    a = stick_breaking_weights(s, keep)
    assert (a >= 0).all() and (a <= 1).all() and (a.sum(-1) <= 1 + 1e-6).all()
    assert (a[:, keep[0].logical_not()] == 0).all()
    q, k, v = rand_qkv(1, 1, 1, 1, 5, 4, seed=1)
    k[0, 0, -1] = q[0, 0, 0] * 100.0
    assert relative_error(stick_breaking_attention(q, k, v, 1.0)[0, 0, 0], v[0, 0, -1]) <= 1e-6
    assert stick_breaking_attention(q, (-100 * q).expand(1, 1, 5, 4), v, 1.0).abs().max() < 1e-6


def test_gradients_match_float64():
    q, k, v = rand_qkv(1, 2, 1, 6, 6, 4, seed=3)
    grads = []
    for dt in (torch.float32, torch.float64):
        qq, kk, vv = (x.detach().to(dt).clone().requires_grad_(True) for x in (q, k, v))
        stick_breaking_attention(qq, kk, vv, 0.5).pow(2).sum().backward()
        grads.append([x.grad for x in (qq, kk, vv)])
    for a, b in zip(*grads):
        assert relative_error(a, b) <= 1e-5


# ---- as the head experts' attention function ----------------------------------------------------------

def sb_cfg(top_k=2, shared=1, router="qnorm", **kw):
    return ConvertConfig(experts=1, top_k=1, attention_experts=True, attention_top_k=top_k, shared_heads=shared,
                         head_router=router, attention_fn="stick-breaking", **kw)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_dense_routing_is_stick_breaking_over_every_head(tmp_path):
    """Dense routing on a stick-breaking model: every head at unit weight through stick-breaking, no RoPE,
    checked against the loop on one layer; routed (top-k) output differs; masked and auto paths agree."""
    src = make_llama(tmp_path / "dense", hidden=48, heads=6, kv_heads=2, layers=1)
    convert(src, tmp_path / "sb", sb_cfg(top_k=2, shared=2), progress=False)
    model = surgery.load(tmp_path / "sb")
    attn = head_expert_modules(model)[0]
    assert attn.attention_fn == "stick-breaking"
    x = torch.randn(2, 7, 48)
    cos, sin = torch.ones(1, 7, 8), torch.zeros(1, 7, 8)  # ignored by stick-breaking (no RoPE)
    pe = (torch.randn(1, 7, 8), torch.randn(1, 7, 8))
    set_dense_routing(model, True)
    with torch.no_grad():
        y, _ = attn(x, position_embeddings=pe, attention_mask=None)
        y2, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
        q = attn.q_proj(x).view(2, 7, 6, 8).transpose(1, 2)
        k = attn.k_proj(x).view(2, 7, 2, 8).transpose(1, 2)
        v = attn.v_proj(x).view(2, 7, 2, 8).transpose(1, 2)
        ref = attn.o_proj(naive(q, k, v, attn.scaling, causal(2, 7, 7)).float().reshape(2, 7, 48))
    assert relative_error(y, ref) <= TOL and torch.equal(y, y2)
    set_dense_routing(model, False)
    with torch.no_grad():
        routed, _ = attn(x, position_embeddings=pe, attention_mask=None)
    assert relative_error(routed, ref) > 1e-3


@pytest.mark.parametrize("router", ["qnorm", "learned"])
def test_kv_cache_decode_and_generate(tmp_path, router):
    src = make_llama(tmp_path / "dense", kv_heads=2)
    convert(src, tmp_path / "sb", sb_cfg(top_k=1, shared=1, router=router), progress=False)
    moe = surgery.load(tmp_path / "sb")
    ids = torch.randint(0, 128, (2, 11))
    assert relative_error(decode_through_cache(moe, ids, prefill=8), logits(moe, ids)) <= TOL
    cached, uncached = greedy_with_and_without_cache(moe, ids[:1, :5])
    assert torch.equal(cached, uncached)


def test_padding_mask_in_the_model(tmp_path):
    """A left-padded row gives the logits of the same tokens unpadded (stick-breaking needs no positions)."""
    src = make_llama(tmp_path / "dense", kv_heads=2)
    convert(src, tmp_path / "sb", sb_cfg(), progress=False)
    moe = surgery.load(tmp_path / "sb")
    ids = torch.randint(1, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    padded = logits(moe, ids, attention_mask=mask)
    alone = logits(moe, ids[1:, 4:])
    assert relative_error(padded[1, 4:], alone[0]) <= TOL


def test_save_load_and_export_refusal(tmp_path, tiny_llama):
    from surgery.export import export_model

    convert(tiny_llama, tmp_path / "a", sb_cfg(router="learned"), progress=False)
    a = surgery.load(tmp_path / "a")
    assert a.surgery_config.attention["attention_fn"] == "stick-breaking"
    save_converted(a, tmp_path / "b", tokenizer_from=tmp_path / "a")
    b = surgery.load(tmp_path / "b")
    assert head_expert_modules(b)[0].attention_fn == "stick-breaking"
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(logits(a, ids), logits(b, ids))
    with pytest.raises(SurgeryError, match="routes its attention heads"):
        export_model(tmp_path / "a", tmp_path / "out", "mixtral", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_attention_fn(tmp_path, tiny_llama):
    r = CliRunner().invoke(main, ["convert", str(tiny_llama), str(tmp_path / "sb"), "--attention-experts",
                                  "--attention-fn", "stick-breaking"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["attention_fn"] == "stick-breaking"
    block = json.loads((tmp_path / "sb" / "config.json").read_text())["surgery"]["attention"]
    assert block["attention_fn"] == "stick-breaking"
    for args, message, one_line in [
            (["--attention-experts", "--attention-fn", "linear"], "'--attention-fn'", False),  # click's usage error
            (["-E", 4, "-K", 2, "--attention-fn", "stick-breaking"], "need --attention-experts", True)]:
        out = tmp_path / "bad"
        r = CliRunner().invoke(main, ["convert", str(tiny_llama), str(out), *map(str, args)])
        assert r.exit_code == 2 and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 or not one_line
        assert not out.exists()


def test_old_config_without_attention_fn_loads_as_softmax():
    from surgery.attention import HeadConfig

    hc = HeadConfig.from_dict({"heads": 4, "kv_heads": 2, "top_k": 2, "shared_heads": 1})
    assert hc.attention_fn == "softmax"
    with pytest.raises(SurgeryError, match="--attention-fn"):
        HeadConfig.from_dict({"heads": 4, "kv_heads": 2, "top_k": 2, "attention_fn": "linear"})
