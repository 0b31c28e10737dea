"""Calibration of head experts (surgery/attention/calibrate.py through surgery calibrate) on tiny random Llamas
with SmolLM2's head layout (9 query heads on 3 key/value heads): layer-wise fitting lowers each attention
block's error, end-to-end KD moves exactly the head parameters asked for, the head router losses match a hand
computation, resume restores the heads, stick-breaking heads are reached by calibration."""

import json
import os
import math

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.attention import head_expert_modules
from surgery.attention import calibrate as head_cal
from surgery.calibrate import CalibrateConfig, EndToEndConfig, LayerwiseConfig, _moe_state, calibrate
from surgery.cli import main
from surgery.convert import ConvertConfig, convert_model
from surgery.errors import SurgeryError

from helpers import make_llama, randomise_head_routers, stop_after_checkpoint


def _sharpen(model):
    with torch.no_grad():
        model.model.norm.weight.fill_(4.0)
    return model


def heads_cfg(router="learned", fn="softmax", top_k=4, shared=3):
    return ConvertConfig(experts=1, top_k=1, attention_experts=True, attention_top_k=top_k, shared_heads=shared,
                         head_router=router, attention_fn=fn)


@pytest.fixture
def src(tmp_path):
    return make_llama(tmp_path / "dense", hidden=72, heads=9, kv_heads=3, layers=2)


def student_of(src, **kw):
    return convert_model(_sharpen(surgery.load(src)), heads_cfg(**kw))


IDS = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))


def lw_only(**kw):
    base = dict(tokens=1024, ctx=64, router_steps=5, head_steps=60, head_lr=3e-3, batch_tokens=256)
    return CalibrateConfig(layerwise=LayerwiseConfig(**{**base, **kw}), e2e=None)


@pytest.mark.parametrize("router,train", [("learned", "router"), ("learned", "qo"), ("qnorm", "qo")])
def test_layerwise_lowers_attention_block_error(src, router, train):
    teacher, student = _sharpen(surgery.load(src)), student_of(src, router=router)
    if router == "learned":
        randomise_head_routers(student)
    res = calibrate(student, teacher, None, lw_only(head_train=train), ids=IDS, progress=False)
    layers = res["layerwise"]["layers"]
    assert len(layers) == 2
    for r in layers:
        h = r["heads"]
        assert h["after"] < 0.9 * h["before"] and not h.get("kept_start"), h


def test_layerwise_router_only_leaves_projections(src):
    teacher, student = _sharpen(surgery.load(src)), student_of(src)
    randomise_head_routers(student)
    q0 = student.model.layers[1].self_attn.q_proj.weight.detach().clone()
    r0 = student.model.layers[1].self_attn.router.weight.detach().clone()
    calibrate(student, teacher, None, lw_only(head_train="router"), ids=IDS, progress=False)
    attn = student.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, q0) and not torch.equal(attn.router.weight, r0)


def test_fit_head_block_target_is_the_dense_attention(src):
    """Under dense routing the head-expert block is the teacher's attention: error ~0 before any step."""
    from surgery.calibrate import _causal_mask
    from surgery.moe import set_dense_routing

    teacher, student = surgery.load(src), student_of(src)
    set_dense_routing(student, True)
    x = torch.randn(3, 16, 72)
    pos = student.model.rotary_emb(x, torch.arange(16)[None])
    r = head_cal.fit_head_block(student.model.layers[0].self_attn, teacher.model.layers[0].self_attn, x, pos,
                                _causal_mask(16, "cpu"), steps=0, lr=0.0, batch_tokens=32)
    assert r["before"] < 1e-10 and r["after"] == r["before"]


def test_stick_breaking_heads_are_reached_by_calibration(src):
    """Softmax -> stick-breaking: every projection retrained per layer (head_train attn) lowers the error."""
    teacher, student = _sharpen(surgery.load(src)), student_of(src, fn="stick-breaking")
    res = calibrate(student, teacher, None, lw_only(head_train="attn", head_steps=80), ids=IDS, progress=False)
    for r in res["layerwise"]["layers"]:
        assert r["heads"]["after"] < 0.8 * r["heads"]["before"], r["heads"]


def _e2e(**kw):
    base = {"tokens": 1536, "ctx": 64, "batch_size": 2, "lr": 3e-3, "checkpoint_every": 3, "train": "router"}
    return CalibrateConfig(layerwise=None, e2e=EndToEndConfig(**{**base, **kw}), seed=7)


@pytest.mark.parametrize("train,moved,still", [("router", ["router.weight"], ["q_proj.weight", "k_proj.weight"]),
                                                ("qo", ["router.weight", "q_proj.weight", "o_proj.weight"],
                                                 ["k_proj.weight", "v_proj.weight"]),
                                                ("none", [], ["router.weight", "q_proj.weight"])])
def test_end_to_end_trains_the_head_parameters_asked_for(src, train, moved, still):
    teacher, student = _sharpen(surgery.load(src)), student_of(src)
    randomise_head_routers(student)
    before = {k: v.clone() for k, v in student.model.layers[0].self_attn.state_dict().items()}
    mlp0 = {k: v.clone() for k, v in student.model.layers[0].mlp.state_dict().items()}
    res = calibrate(student, teacher, None, _e2e(head_train=train), ids=IDS, progress=False)
    after = student.model.layers[0].self_attn.state_dict()
    for k in moved:
        assert not torch.equal(after[k], before[k]), k
    for k in still:
        assert torch.equal(after[k], before[k]), k
    assert all(torch.equal(v, mlp0[k]) for k, v in student.model.layers[0].mlp.state_dict().items())  # E=1
    hist = res["e2e"]["history"]
    if train == "qo":
        assert sum(h["kd"] for h in hist[-3:]) < sum(h["kd"] for h in hist[:3])
    assert all(m.impl == "auto" and m.last_router_logits is None for m in head_expert_modules(student))


def _hand_balance_concentration(logits):
    """ModuleFormer's two losses written out in float64, one token and one head at a time."""
    T, R = logits.shape
    p = [[math.exp(x) for x in row] for row in logits.double().tolist()]
    p = [[x / sum(row) for x in row] for row in p]
    mean = [sum(p[t][r] for t in range(T)) / T for r in range(R)]
    balance = math.log(R) + sum(m * math.log(m) for m in mean)
    concentration = sum(-sum(x * math.log(x) for x in row) for row in p) / T / math.log(R)
    return balance, concentration


def test_head_losses_match_a_hand_computation():
    g = torch.Generator().manual_seed(3)

    class M:
        pass

    mods = []
    for _ in range(3):
        m = M()
        m.last_router_logits = torch.randn(11, 6, generator=g) * 2
        mods.append(m)
    got = head_cal.head_aux(mods, 0.3, 0.7)
    want = sum(0.3 * b + 0.7 * c for b, c in (_hand_balance_concentration(m.last_router_logits) for m in mods)) / 3
    assert math.isclose(got.item(), want, rel_tol=1e-5)
    assert head_cal.head_aux(mods, 0.0, 0.0).item() == 0.0


def test_end_to_end_adds_the_head_losses(src):
    """At lr 0 each step's recorded aux is the weighted head losses over that batch's head router logits
    (the FFN's one-expert routers add nothing), computed here from a plain forward of the same batch."""
    from surgery.calibrate import _epoch_order
    from surgery.data import windows_of

    teacher, student = _sharpen(surgery.load(src)), student_of(src)
    randomise_head_routers(student)
    # float32 like the plain forward below (on a CPU with AMX, "auto" trains the student under bf16 autocast)
    cfg = _e2e(lr=0.0, tokens=256, head_balance=0.5, head_concentration=0.25, autocast="off")
    res = calibrate(student, teacher, None, cfg, ids=IDS, progress=False)
    wins = windows_of(IDS, 64)
    order = _epoch_order(wins.shape[0], 2, 2, torch.Generator().manual_seed(cfg.seed + 1))
    with torch.no_grad():
        student(input_ids=wins[order[:2]])
    want = sum(0.5 * b + 0.25 * c for b, c in (_hand_balance_concentration(m.last_router_logits)
                                               for m in head_expert_modules(student))) / 2
    assert math.isclose(res["e2e"]["history"][0]["aux"], want, rel_tol=1e-4)


def test_resume_restores_head_parameters(tmp_path, src):
    teacher = _sharpen(surgery.load(src))
    full = student_of(src)
    calibrate(full, teacher, None, _e2e(head_train="qo"), ckpt=tmp_path / "a", ids=IDS, progress=False)

    stop_after_checkpoint(lambda: calibrate(student_of(src), teacher, None, _e2e(head_train="qo"),
                                            ckpt=tmp_path / "b", ids=IDS, progress=False), "step", 6)
    saved = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["params"]
    assert "model.layers.0.self_attn.router.weight" in saved and "model.layers.0.self_attn.q_proj.weight" in saved
    resumed = student_of(src)
    res = calibrate(resumed, teacher, None, _e2e(head_train="qo"), ckpt=tmp_path / "b", resume=True, ids=IDS,
                    progress=False)
    assert len(res["e2e"]["history"]) == 12
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_layerwise_resume_with_heads(tmp_path, src):
    """Stopped after layer 0, resumed: layer 0's fitted heads come back from the checkpoint, layer 1 is fitted on
    their output, and the result equals an uninterrupted run."""

    teacher = _sharpen(surgery.load(src))

    def fresh():
        m = student_of(src)
        randomise_head_routers(m)
        return m

    full = fresh()
    first = calibrate(full, teacher, None, lw_only(head_train="qo"), ids=IDS, progress=False)

    stop_after_checkpoint(lambda: calibrate(fresh(), teacher, None, lw_only(head_train="qo"), ckpt=tmp_path / "c",
                                            ids=IDS, progress=False), "next_layer", 1)
    resumed = fresh()
    res = calibrate(resumed, teacher, None, lw_only(head_train="qo"), ckpt=tmp_path / "c", resume=True, ids=IDS,
                    progress=False)
    assert res["layerwise"]["layers"] == first["layerwise"]["layers"]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_models_without_heads_keep_their_checkpoint_contents(tiny_llama):
    plain = convert_model(surgery.load(tiny_llama), ConvertConfig(experts=4, top_k=2))
    assert not [k for k in _moe_state(plain) if "self_attn" in k]
    heads = convert_model(surgery.load(tiny_llama), ConvertConfig(experts=4, top_k=2, attention_experts=True,
                                                                  shared_heads=1, head_router="learned"))
    assert "model.layers.0.self_attn.router.weight" in _moe_state(heads)


def test_every_checkpoint_kind_keeps_the_head_experts(tmp_path, tiny_llama, monkeypatch):
    """One rule for what calibration trains: single-process checkpoints, snapshots of a gathered state and
    torch.distributed checkpoints all keep head-expert attention (router, q/o projections) beside the MoE."""
    import torch.distributed.checkpoint as dcp

    import surgery.distributed as sdist
    from surgery.calibrate import _save_snapshot

    heads = convert_model(surgery.load(tiny_llama), ConvertConfig(experts=4, top_k=2, attention_experts=True,
                                                                  shared_heads=1, head_router="learned"))
    want = set(_moe_state(heads))
    assert {k for k in want if ".self_attn." in k} and {k for k in want if ".mlp." in k}
    snap = _save_snapshot(tmp_path, heads, 1, 2, 0.0, False, full=heads.state_dict())
    assert set(torch.load(snap["path"])) == want
    saved = {}
    monkeypatch.setattr(dcp, "save", lambda sd, checkpoint_id: saved.update(sd["model"]) or os.mkdir(checkpoint_id))
    opt = torch.optim.AdamW([p for p in heads.parameters()], lr=1e-3)
    dist = sdist.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(sdist.Dist, "barrier", lambda self: None, raising=False)
    sdist.save_checkpoint(tmp_path / "dcp", {"step": 1}, heads, opt, False, dist)
    assert set(saved) == want


def test_bad_head_train_is_refused(src):
    teacher, student = surgery.load(src), student_of(src)
    with pytest.raises(SurgeryError, match="--head-train 'all'"):
        calibrate(student, teacher, None, _e2e(head_train="all"), ids=IDS, progress=False)
    with pytest.raises(SurgeryError, match="not a converted one"):
        calibrate(student, student_of(src), None, _e2e(), ids=IDS, progress=False)


def test_calibrate_cli_with_heads(tmp_path, src, text_file):
    moe = tmp_path / "heads"
    r = CliRunner().invoke(main, ["convert", str(src), str(moe), "--attention-experts", "--attention-top-k", "4",
                                  "--shared-heads", "3", "--head-router", "qnorm"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "cal"
    r = CliRunner().invoke(main, ["calibrate", str(moe), str(out), "--teacher", str(src), "--data", str(text_file),
                                  "--tokens", "256", "--layerwise-tokens", "256", "--ctx", "64", "--batch-size", "2",
                                  "--head-train", "qo", "--head-steps", "5", "--head-balance", "0.01",
                                  "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert "heads" in res["layerwise"]["layers"][0] and res["config"]["e2e"]["head_train"] == "qo"
    cal, raw = surgery.load(out), surgery.load(moe)
    assert not torch.equal(cal.model.layers[0].self_attn.q_proj.weight, raw.model.layers[0].self_attn.q_proj.weight)
    assert cal.surgery_config.attention["top_k"] == 4


def test_eval_head_impl_masked_equals_sparse(tmp_path, src, text_file):
    moe = tmp_path / "heads"
    r = CliRunner().invoke(main, ["convert", str(src), str(moe), "--attention-experts", "--attention-top-k", "4",
                                  "--shared-heads", "3"])
    assert r.exit_code == 0, r.output
    res = {}
    for impl in ("auto", "masked"):
        r = CliRunner().invoke(main, ["eval", "perplexity", str(moe), "--data", str(text_file), "--max-tokens", "300",
                                      "--ctx", "100", "--device", "cpu", "--head-impl", impl])
        assert r.exit_code == 0, r.output
        res[impl] = json.loads(r.stdout)
    assert math.isclose(res["auto"]["perplexity"], res["masked"]["perplexity"], rel_tol=1e-5)
    assert res["masked"]["head_impl"] == "masked" and "head_impl" not in res["auto"]
