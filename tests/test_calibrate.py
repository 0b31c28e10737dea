"""Calibration on tiny random Llamas: layer-wise and end-to-end distillation lower their losses, the CLI
writes a loadable model, resume continues where a run stopped and gives the same result; e2e.train=lora."""

import json

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.calibrate import (CalibrateConfig, EndToEndConfig, LayerwiseConfig, calibrate, calibrate_block)
from surgery.cli import main
from surgery.convert import ConvertConfig, convert_model
from surgery.errors import SurgeryError
from surgery.lora import attach, merge, merged_weights
from surgery.moe import moe_blocks

from helpers import make_llama, stop_after_checkpoint


def _sharpen(model):
    """The random tiny Llama's logits are nearly flat; a larger final-norm gain gives KD something to do."""
    with torch.no_grad():
        model.model.norm.weight.fill_(4.0)
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.mul_(3.0)
    return model


@pytest.fixture
def pair(tmp_path):
    src = make_llama(tmp_path / "dense", ffn=96, layers=2)
    teacher = _sharpen(surgery.load(src))
    student = convert_model(_sharpen(surgery.load(src)), ConvertConfig(experts=4, top_k=1, seed=1))
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    return src, teacher, student, ids


def test_layerwise_lowers_block_error(pair):
    _, teacher, student, ids = pair
    cfg = CalibrateConfig(layerwise=LayerwiseConfig(tokens=1024, ctx=64, router_steps=60, expert_epochs=2,
                                                    expert_lr=3e-3, batch_tokens=256), e2e=None)
    res = calibrate(student, teacher, None, cfg, ids=ids, progress=False)
    layers = res["layerwise"]["layers"]
    assert len(layers) == 2
    for r in layers:
        assert r["after"] < r["before"]


def test_calibrate_block_router_only_never_changes_experts(pair):
    _, teacher, student, _ = pair
    block = moe_blocks(student)[0]
    experts = block.experts.gate_proj.detach().clone()
    x = torch.randn(512, 64)
    with torch.no_grad():
        target = teacher.model.layers[0].mlp(x)
    r = calibrate_block(block, x, target, LayerwiseConfig(router_steps=50, expert_epochs=0))
    assert torch.equal(block.experts.gate_proj, experts) and r["after"] <= r["before"] + 1e-6


def _e2e_cfg(**kw):
    return CalibrateConfig(layerwise=None, e2e=EndToEndConfig(**{"tokens": 1536, "ctx": 64, "batch_size": 2,
                                                                 "lr": 3e-3, "checkpoint_every": 3, **kw}), seed=7)


def test_end_to_end_lowers_distillation_loss(pair):
    _, teacher, student, ids = pair
    res = calibrate(student, teacher, None, _e2e_cfg(balance=0.01, concentration=0.01), ids=ids, progress=False)
    hist = res["e2e"]["history"]
    assert len(hist) == 12
    first = sum(h["kd"] for h in hist[:3]) / 3
    last = sum(h["kd"] for h in hist[-3:]) / 3
    assert last < first


def test_end_to_end_hidden_distillation_pulls_hidden_states_towards_the_teacher(pair):
    _, teacher, student, ids = pair
    res = calibrate(student, teacher, None, _e2e_cfg(hidden=1.0), ids=ids, progress=False)
    hist = res["e2e"]["history"]
    assert all("hidden" in h and h["hidden"] > 0 for h in hist)
    assert sum(h["hidden"] for h in hist[-3:]) < sum(h["hidden"] for h in hist[:3])
    assert sum(h["kd"] for h in hist[-3:]) < sum(h["kd"] for h in hist[:3])
    assert "hidden" not in calibrate(student, teacher, None, _e2e_cfg(), ids=ids, progress=False)["e2e"]["history"][0]


def test_end_to_end_train_all_moves_attention_never_embeddings(tmp_path, pair):
    _, teacher, student, ids = pair
    q0 = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    emb0 = student.model.embed_tokens.weight.detach().clone()
    res = calibrate(student, teacher, None, _e2e_cfg(train="all"), ckpt=tmp_path / "all", ids=ids, progress=False)
    assert not torch.equal(student.model.layers[0].self_attn.q_proj.weight, q0)
    assert torch.equal(student.model.embed_tokens.weight, emb0)
    hist = res["e2e"]["history"]
    assert sum(h["kd"] for h in hist[-3:]) < sum(h["kd"] for h in hist[:3])
    saved = torch.load(tmp_path / "all" / "ckpt.pt", weights_only=False)["params"]
    assert "model.layers.0.self_attn.q_proj.weight" in saved  # resume restores attention too


def test_resume_matches_an_uninterrupted_run(tmp_path, pair):
    src, teacher, _, ids = pair

    def fresh():
        return convert_model(_sharpen(surgery.load(src)), ConvertConfig(experts=4, top_k=1, seed=1))

    full = fresh()
    calibrate(full, teacher, None, _e2e_cfg(), ckpt=tmp_path / "a", ids=ids, progress=False)
    # an "interrupted" run: 6 of 12 steps, checkpointed at step 6
    part = fresh()
    cut = _e2e_cfg()
    cut.e2e.tokens = 1536  # same schedule ...
    stop_after_checkpoint(lambda: calibrate(part, teacher, None, cut, ckpt=tmp_path / "b", ids=ids, progress=False),
                          "step", 6)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 6
    resumed = fresh()
    res = calibrate(resumed, teacher, None, _e2e_cfg(), ckpt=tmp_path / "b", resume=True, ids=ids, progress=False)
    assert len(res["e2e"]["history"]) == 12
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_layerwise_resume_skips_done_layers(tmp_path, pair):
    _, teacher, student, ids = pair
    cfg = CalibrateConfig(layerwise=LayerwiseConfig(tokens=512, ctx=64, router_steps=20), e2e=None)
    calibrate(student, teacher, None, cfg, ckpt=tmp_path / "c", ids=ids, progress=False)
    state = json.loads((tmp_path / "c" / "state.json").read_text())
    assert state["stage"] == "layerwise" and state["next_layer"] == 2
    res = calibrate(student, teacher, None, cfg, ckpt=tmp_path / "c", resume=True, ids=ids, progress=False)
    assert len(res["layerwise"]["layers"]) == 2  # both reported, none recomputed
    assert res["layerwise"]["layers"] == state["report"]


def test_calibrate_cli(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96)
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "moe"), "-E", "4", "-K", "2"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "cal"
    args = ["calibrate", str(tmp_path / "moe"), str(out), "--teacher", str(src), "--data", str(text_file),
            "--tokens", "512", "--layerwise-tokens", "256", "--ctx", "64", "--seed", "1", "--device", "cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["e2e"]["steps"] == 2 and (out / "config.json").is_file()
    cfg = json.loads((out / "config.json").read_text())["surgery"]
    assert cfg["calibration"]["e2e_tokens"] == 512 and cfg["calibration"]["seed"] == 1
    assert surgery.load(out) is not None
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = CliRunner().invoke(main, ["calibrate", str(tmp_path / "moe"), str(tmp_path / "x"), "--teacher",
                                    str(tmp_path / "moe"), "--data", str(text_file)])
    assert bad.exit_code == 2 and "dense" in bad.output
    for flag, value, named in (("--average-tail", "1.5", "average_tail"), ("--ce-weight", "-1", "ce_weight"),
                               ("--e2e-prior-weight", "-1", "e2e.prior_weight")):
        bad = CliRunner().invoke(main, args[:2] + [str(tmp_path / "y")] + args[3:] + [flag, value])
        assert bad.exit_code == 2 and named in bad.output and not (tmp_path / "y").exists()
    # the router flags reach the stage: the prior-approximate loss is the whole aux (no balance / concentration)
    r = CliRunner().invoke(main, args[:2] + [str(tmp_path / "z")] + args[3:] + ["--e2e-prior-weight", "0.5",
                                                                               "--router-ste"])
    assert r.exit_code == 0, r.output

    def aux(run):
        return [h["aux"] for h in json.loads((tmp_path / run / "history.json").read_text())]

    assert all(a > 0 for a in aux(json.loads(r.stdout)["checkpoint"])) and aux(summary["checkpoint"]) == [0.0, 0.0]


# ---- e2e.train=lora (surgery/lora.py): peft adapters on the attention projections, trained with the MoE
# blocks, merged into plain weights when the stage ends; resume and snapshots work as for the other modes.

def _attention_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".self_attn." in n}


def test_merged_weights_are_what_merge_leaves(tmp_path):
    """merged_weights (for mid-run snapshots) on a state dict with random adapters equals peft's own merge."""
    model = surgery.load(make_llama(tmp_path / "dense"))
    handle = attach(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    expect = merged_weights(model.state_dict(), 4, 8.0)
    assert len(expect) == 4 * len(model.model.layers)
    x = torch.randint(1, 128, (1, 16))
    with torch.no_grad():
        with_adapters = model(input_ids=x).logits
    merge(handle)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # peft's wrappers are gone
    state = model.state_dict()
    for k, w in expect.items():
        assert torch.allclose(state[k], w, atol=1e-6), k
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, with_adapters, atol=1e-5)


def test_lora_trains_adapters_and_moe_then_merges(tmp_path, pair):
    _, teacher, student, ids = pair
    attn0 = _attention_weights(student)
    emb0 = student.model.embed_tokens.weight.detach().clone()
    norm0 = student.model.layers[0].input_layernorm.weight.detach().clone()
    mlp0 = {n: p.detach().clone() for n, p in student.named_parameters() if ".mlp." in n}
    res = calibrate(student, teacher, None, _e2e_cfg(train="lora", lora_rank=4, lora_alpha=8.0),
                    ckpt=tmp_path / "lora", ids=ids, progress=False)
    hist = res["e2e"]["history"]
    assert sum(h["kd"] for h in hist[-3:]) < sum(h["kd"] for h in hist[:3])
    # merged: plain Linear layers, no adapter left, every attention projection moved (low-rank), norms and
    # embeddings untouched, MoE weights trained
    assert not any("lora_" in n or "base_layer" in n for n, _ in student.named_parameters())
    attn1 = _attention_weights(student)
    assert attn1.keys() == attn0.keys()
    for n in attn0:
        delta = attn1[n] - attn0[n]
        assert delta.abs().max() > 0, n
        assert torch.linalg.matrix_rank(delta.double(), atol=1e-7) <= 4, n
    assert torch.equal(student.model.embed_tokens.weight, emb0)
    assert torch.equal(student.model.layers[0].input_layernorm.weight, norm0)
    assert any(not torch.equal(p, mlp0[n]) for n, p in student.named_parameters() if ".mlp." in n)
    assert all(not p.requires_grad for p in student.parameters())
    saved = torch.load(tmp_path / "lora" / "ckpt.pt", weights_only=False)["params"]
    assert any("lora_A" in k for k in saved) and not any(".self_attn.q_proj.weight" == k[-22:] for k in saved)


def test_lora_resume_matches_an_uninterrupted_run(tmp_path, pair):
    src, teacher, _, ids = pair

    def fresh():
        return convert_model(_sharpen(surgery.load(src)), ConvertConfig(experts=4, top_k=1, seed=1))

    cfg = lambda: _e2e_cfg(train="lora", lora_rank=4, lora_alpha=8.0)  # noqa: E731
    full = fresh()
    calibrate(full, teacher, None, cfg(), ckpt=tmp_path / "a", ids=ids, progress=False)
    part = fresh()
    stop_after_checkpoint(lambda: calibrate(part, teacher, None, cfg(), ckpt=tmp_path / "b", ids=ids,
                                            progress=False), "step", 6)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 6
    resumed = fresh()
    res = calibrate(resumed, teacher, None, cfg(), ckpt=tmp_path / "b", resume=True, ids=ids, progress=False)
    assert len(res["e2e"]["history"]) == 12
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_lora_snapshots_hold_merged_weights(tmp_path, pair):
    """A mid-run snapshot loads (strict=False, as the recipe's curve does) into a model with no adapters and
    gives the adapted attention weights, not the frozen base ones."""
    _, teacher, student, ids = pair
    base = _attention_weights(student)
    calibrate(student, teacher, None, _e2e_cfg(train="lora", lora_rank=4, lora_alpha=8.0, snapshots=[0.5]),
              ckpt=tmp_path / "s", ids=ids, progress=False)
    snap = torch.load(tmp_path / "s" / "snapshot-000006.pt", weights_only=True)
    assert not any("lora_" in k or "base_layer" in k for k in snap)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert q in snap and not torch.equal(snap[q], base[q])


def test_lora_refuses_head_experts_and_bad_rank(tmp_path, pair):
    src, teacher, _, ids = pair
    heads = convert_model(_sharpen(surgery.load(src)), ConvertConfig(experts=4, top_k=1, attention_experts=True))
    with pytest.raises(SurgeryError, match="not with head experts"):
        calibrate(heads, teacher, None, _e2e_cfg(train="lora"), ids=ids, progress=False)
    student = convert_model(_sharpen(surgery.load(src)), ConvertConfig(experts=4, top_k=1, seed=1))
    with pytest.raises(SurgeryError, match="lora_rank 0"):
        calibrate(student, teacher, None, _e2e_cfg(train="lora", lora_rank=0), ids=ids, progress=False)
