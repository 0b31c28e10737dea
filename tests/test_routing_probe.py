"""The inference-only routing probe (evals/routing_probe.py): its control reproduces the model, the
conditional-mean compensation and the dynamic-k threshold are what they claim, and the model is restored."""

import dataclasses

import pytest
import torch

import surgery
from surgery.convert import ConvertConfig, convert_model
from surgery.moe import moe_blocks
from surgery_evals.routing_probe import collect, probing, selection, threshold_for_mean_k

from helpers import make_llama


def _model(tmp_path):
    path = make_llama(tmp_path / "dense", ffn=96, layers=2)
    model = convert_model(surgery.load(path), ConvertConfig(experts=8, shared_experts=2, top_k=2, seed=1))
    for b in moe_blocks(model):  # routers with real preferences (a fresh one scores every expert alike)
        torch.nn.init.normal_(b.router.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    return model.eval()


def _expert_by_hand(block, x, j):
    """Routed expert j's SwiGLU output on x, written out (the reference the probe's statistics are checked against)."""
    e = block.experts
    return (torch.nn.functional.silu(x @ e.gate_proj[j].T) * (x @ e.up_proj[j].T)) @ e.down_proj[j].T


def _ids(model, n, seed):
    return torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_topk_mode_is_the_model_itself_and_the_model_is_restored(tmp_path):
    model = _model(tmp_path)
    ids = _ids(model, 24, 0)
    before = model(input_ids=ids, use_cache=False).logits
    with probing(model) as (probe, _):
        probe.mode = "topk"
        probed = model(input_ids=ids, use_cache=False).logits
    after = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(probed, before, atol=1e-4, rtol=1e-4)
    assert torch.equal(after, before)


@torch.no_grad()
def test_cmean_adds_each_unchosen_experts_mean_when_unchosen(tmp_path):
    model = _model(tmp_path)
    block = moe_blocks(model)[1]
    xs = []
    hook = block.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, m.hidden).clone()))
    with probing(model) as (probe, blocks):
        collect(model, probe, blocks, _ids(model, 64, 1)[0], chunk=32)
        hook.remove()
        x = torch.cat(xs).float()
        # by hand, expert by expert: the mean of expert e's output over the tokens whose top-2 left e out
        p = torch.softmax(block.router_logits(x), -1)
        chosen = p.topk(2, -1).indices
        for j in range(block.num_experts):
            out = _expert_by_hand(block, x, j)
            left_out = ~(chosen == j).any(1)
            assert left_out.any()
            torch.testing.assert_close(probe.stats[id(block)]["mu"][j], out[left_out].mean(0), atol=1e-5, rtol=1e-4)
        # in use: cmean's block output minus top-k's is the sum of the unchosen experts' means
        x1 = x[:5]
        probe.mode = "topk"
        y_top = block(x1)
        probe.mode = "cmean"
        y_cm = block(x1)
        unchosen = 1 - selection(torch.softmax(block.router_logits(x1), -1), 2)
        torch.testing.assert_close(y_cm - y_top, unchosen @ probe.stats[id(block)]["mu"], atol=1e-5, rtol=1e-4)


def test_threshold_gives_the_mean_k_within_bounds():
    p = torch.softmax(torch.randn(4000, 10, generator=torch.Generator().manual_seed(0)) * 2, -1)
    tau = threshold_for_mean_k(p, 2, 4)
    sel = selection(p, 2, tau, 4)
    k = sel.sum(1)
    assert k.mean().item() == pytest.approx(2.0, abs=0.01)
    assert k.min() >= 1 and k.max() <= 4 and k.max() > 2  # dynamic: some rows take more than 2
    # the chosen experts are the most probable ones of each row
    assert torch.all((p * sel).max(1).values == p.max(1).values)


def test_probe_refuses_a_dense_model_and_routing_it_does_not_reproduce(tmp_path):
    dense = surgery.load(make_llama(tmp_path / "d", ffn=96, layers=2))
    with pytest.raises(ValueError, match="converted model"):
        with probing(dense):
            pass
    model = _model(tmp_path)
    b = moe_blocks(model)[1]
    b.routing = dataclasses.replace(b.routing, score_func="sigmoid")
    with pytest.raises(ValueError, match="MoE block 1: .*sigmoid"):
        with probing(model):
            pass


@torch.no_grad()
def test_oracle_chooses_the_experts_with_the_largest_outputs_and_reports_agreement(tmp_path):
    model = _model(tmp_path)
    block = moe_blocks(model)[0]
    x = torch.randn(6, block.hidden, generator=torch.Generator().manual_seed(5))
    Y = torch.stack([_expert_by_hand(block, x, j) for j in range(block.num_experts)], 1)  # [T, E, D]
    p = torch.softmax(block.router_logits(x), -1)
    chosen = Y.norm(dim=-1).topk(2, -1).indices
    w = torch.gather(p, 1, chosen)
    w = w / w.sum(1, keepdim=True) * block.routing.scale
    want = (w[:, :, None] * torch.gather(Y, 1, chosen[:, :, None].expand(-1, -1, Y.shape[-1]))).sum(1)
    want = want + block.shared_expert(x)
    with probing(model) as (probe, blocks):
        probe.mode = "oracle"
        got = block(x)
        agree = probe.take(blocks, "agree")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    by_hand = torch.tensor([len(set(chosen[t].tolist()) & set(p[t].topk(2).indices.tolist())) / 2 for t in range(6)])
    torch.testing.assert_close(agree, by_hand)


@torch.no_grad()
def test_dyn_with_kmax_above_the_number_of_experts(tmp_path):
    model = _model(tmp_path)  # 6 routed experts per block
    with probing(model, kmax=16) as (probe, blocks):
        collect(model, probe, blocks, _ids(model, 64, 2)[0], chunk=32)
        probe.mode = "dyn"
        model(input_ids=_ids(model, 16, 3), use_cache=False)
        ks = probe.take(blocks)
    assert ks.max() <= moe_blocks(model)[0].num_experts and ks.min() >= 1


@torch.no_grad()
def test_refit_learns_the_oracles_choices_and_leaves_the_router_alone(tmp_path):
    from surgery_evals.routing_probe import refit

    model = _model(tmp_path)
    routers = [b.router.weight.clone() for b in moe_blocks(model)]
    ids = _ids(model, 16, 4)
    with probing(model) as (probe, blocks):
        probe.mode = "topk"
        want = model(input_ids=ids, use_cache=False).logits
        zero = refit(model, probe, blocks, _ids(model, 128, 5)[0], steps=0, chunk=64)
        probe.mode = "refit"  # no steps: the refitted router is the router
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)
        fitted = refit(model, probe, blocks, _ids(model, 128, 5)[0], steps=200, chunk=64)
        # in use: the block routes by the refitted weights, as if they were its router's
        block = blocks[0]
        x = torch.randn(7, block.hidden, generator=torch.Generator().manual_seed(6))
        probe.mode = "refit"
        got = block(x)
        probe.mode = "topk"
        saved = block.router.weight.clone()
        block.router.weight.copy_(probe.stats[id(block)]["W_refit"])
        want_block = block(x)
        block.router.weight.copy_(saved)
    torch.testing.assert_close(got, want_block, atol=1e-5, rtol=1e-5)
    assert all(z["agree_before"] == z["agree_after"] for z in zero)
    for f in fitted:  # on the fitting tokens the refitted router picks more of the oracle's experts
        assert f["agree_after"] > f["agree_before"]
    for w, b in zip(routers, moe_blocks(model)):
        assert torch.equal(w, b.router.weight)
