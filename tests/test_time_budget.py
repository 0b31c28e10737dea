"""Time budgets: the end-to-end stage plans its steps to end within a time limit, and a recipe's
time_budget_s sets that limit from what the earlier stages left."""

import json

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery import calibrate as calibrate_mod
from surgery.calibrate import (PLAN_EVERY, PLAN_STEPS, PLAN_WARMUP, PLAN_WINDOW, EndToEndConfig, load_checkpoint,
                               planned_steps, run_end_to_end)
from surgery.cli import main
from surgery.convert import ConvertConfig, convert_model
from surgery.errors import SurgeryError
from surgery.moe import set_impl
from surgery.recipe import Recipe, run_recipe

from helpers import make_llama
from test_recipe import _recipe


def test_planned_steps_fit_the_time_left():
    # steps 1-2 are warm-up (10 s of compiling); then 1 s a step; 5 steps done, 13 s spent
    marks = [9.0, 10.0, 11.0, 12.0, 13.0]
    assert (PLAN_WARMUP, PLAN_STEPS) == (2, 3)
    assert planned_steps(5, 100, marks, elapsed=13.0, limit=20.0) == 12  # 7 more steps fit in 7 s
    assert planned_steps(5, 8, marks, elapsed=13.0, limit=20.0) == 8  # never past the tokens asked for
    assert planned_steps(5, 100, marks, elapsed=13.0, limit=13.5) == 6  # at least the step at hand
    assert planned_steps(5, 100, marks, elapsed=30.0, limit=20.0) == 6  # over already: stop after it
    assert planned_steps(5, 100, [9.0, 10.0, 12.0, 14.0, 16.0], elapsed=16.0, limit=26.0) == 10  # 2 s a step
    assert planned_steps(5, 100, marks, elapsed=13.0, limit=20.0, reserve=3.0) == 9  # the last checkpoint's 3 s
    # later plans read the last PLAN_WINDOW steps: the machine slowed from 1 s to 2 s a step
    assert (PLAN_EVERY, PLAN_WINDOW) == (10, 50)
    drift = [float(i) for i in range(40)] + [40.0 + 2 * i for i in range(1, 61)]  # 100 steps
    assert planned_steps(100, 1000, drift, elapsed=160.0, limit=260.0) == 100 + 100 // 2


@pytest.fixture
def tiny(tmp_path):
    return make_llama(tmp_path / "dense", ffn=64)


def _student(tiny):
    student = convert_model(surgery.load(tiny), ConvertConfig(experts=8, top_k=2, seed=1))
    set_impl(student, "masked")
    return student


def test_e2e_time_limit_cuts_the_stage_and_the_schedule_follows(tiny, tmp_path, monkeypatch):
    ids = torch.randint(1, 128, (4096,), generator=torch.Generator().manual_seed(0))
    seen = []
    real = calibrate_mod._lr_at
    monkeypatch.setattr(calibrate_mod, "_lr_at", lambda step, steps, cfg: seen.append((step, steps)) or
                        real(step, steps, cfg))
    # no time at all: the plan, made after PLAN_WARMUP + PLAN_STEPS steps, keeps one step more
    cfg = EndToEndConfig(tokens=16 * 64, ctx=32, batch_size=2, lr=1e-3, autocast="off", train="moe",
                         compile="off", time_limit_s=0.0, snapshots=[0.5])
    ckpt = tmp_path / "ckpt"
    res = run_end_to_end(_student(tiny), surgery.load(tiny), ids, cfg, ckpt=ckpt, progress=False)
    n = PLAN_WARMUP + PLAN_STEPS + 1
    assert res["steps"] == len(res["history"]) == n and res["tokens"] == n * 64
    # the snapshot due at half the 16 steps falls behind the plan: taken once, at the first step past half of it
    assert [s["step"] for s in res["snapshots"]] == [n]
    assert res["time_limit"] == {"limit_s": 0.0, "max_steps": 16, "max_tokens": 1024, "cut": True}
    # the learning rate followed the 16-step schedule until the plan, the planned one after it
    assert [s for _, s in seen] == [16] * (n - 1) + [n]
    # the checkpoint holds the plan: resuming runs no step more and reports the same stage
    blob = load_checkpoint(ckpt)
    assert blob["state"]["step"] == blob["state"]["steps"] == n
    again = run_end_to_end(_student(tiny), surgery.load(tiny), ids, cfg, ckpt=ckpt, resume_blob=blob, progress=False)
    assert again["steps"] == n and len(again["history"]) == n
    # time enough: every step, nothing cut
    seen.clear()
    cfg = EndToEndConfig(tokens=16 * 64, ctx=32, batch_size=2, lr=1e-3, autocast="off", train="moe",
                         compile="off", time_limit_s=3600.0)
    res = run_end_to_end(_student(tiny), surgery.load(tiny), ids, cfg, progress=False)
    assert res["steps"] == 16 and res["time_limit"]["cut"] is False and {s for _, s in seen} == {16}
    # without a plan snapshots fall where they always did: fractions of the steps, one per step
    cfg = EndToEndConfig(tokens=16 * 64, ctx=32, batch_size=2, lr=1e-3, autocast="off", train="moe",
                         compile="off", snapshots=[0.25, 0.26, 0.5])
    res = run_end_to_end(_student(tiny), surgery.load(tiny), ids, cfg, ckpt=tmp_path / "ckpt2", progress=False)
    assert [s["step"] for s in res["snapshots"]] == [4, 8]


def test_e2e_time_limit_is_checked():
    with pytest.raises(SurgeryError, match="time_limit_s"):
        EndToEndConfig(time_limit_s=-1.0)


def test_recipe_budget_cuts_the_e2e_stage_and_says_so(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96)
    e2e = {"tokens": 2048, "ctx": 64, "batch_size": 2, "lr": 1e-3}
    ev = {"ctx": 64, "datasets": {str(text_file): 256}, "static_baseline": True}
    path = _recipe(tmp_path, src, text_file, e2e=e2e, evaluate=ev, time_budget_s=0.0)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    n = PLAN_WARMUP + PLAN_STEPS + 1
    assert report["stages"]["e2e"]["tokens"] == n * 128
    budget = report["time_budget"]
    assert budget["enforced"] and not budget["within"] and budget["e2e"]["cut"]
    assert budget["e2e"]["max_tokens"] == 2048 and budget["e2e"]["limit_s"] == 0.0
    assert f"cut to {n * 128:,} of 2,048 tokens" in r.output
    # the static baseline is distilled with the tokens the conversion had, not the recipe's
    assert report["static_baseline"]["tokens"] == n * 128
    # --no-time-budget: every token, however long
    out2 = tmp_path / "run-all"
    r = CliRunner().invoke(main, ["run", str(path), "--out", str(out2), "--no-time-budget"])
    assert r.exit_code == 0, r.output
    report = json.loads((out2 / "report.json").read_text())
    assert report["stages"]["e2e"]["tokens"] == 2048
    assert report["time_budget"]["enforced"] is False and "not enforced" in r.output
    # a budget the pipeline keeps leaves the stage whole
    path = _recipe(tmp_path, src, text_file, e2e=e2e, evaluate={"ctx": 64, "datasets": {str(text_file): 128}},
                   time_budget_s=3600.0)
    report = run_recipe(Recipe.load(path), tmp_path / "run-kept", progress=False)
    assert report["stages"]["e2e"]["tokens"] == 2048
    assert report["time_budget"]["within"] and not report["time_budget"]["e2e"]["cut"]


def test_sampling_stops_at_its_deadline(tmp_path):
    import time

    from surgery.data import sample_corpus
    from surgery.modeling import load_tokenizer

    src = make_llama(tmp_path / "dense")
    model, tok = surgery.load(src), load_tokenizer(src)
    whole = sample_corpus(model, tok, 40, seq_len=10, batch_size=2, seed=3, progress=False)
    late = sample_corpus(model, tok, 40, seq_len=10, batch_size=2, seed=3, progress=False, deadline=time.time() - 1)
    assert late.numel() == 20 and torch.equal(late, whole[:20])  # the first batch is always drawn, then no more
    far = sample_corpus(model, tok, 40, seq_len=10, batch_size=2, seed=3, progress=False, deadline=time.time() + 3600)
    assert torch.equal(far, whole)


def test_recipe_budget_cuts_the_sampled_corpus_once_and_keeps_the_mix_even(tmp_path, text_file, monkeypatch):
    import surgery.data as data_mod

    src = make_llama(tmp_path / "dense", ffn=96)
    calls = []
    real = data_mod.sample_corpus
    # batches of 2 sequences of 256 tokens (the recipes' 128 would hold this whole test corpus in one)
    monkeypatch.setattr(data_mod, "sample_corpus", lambda *a, **k: calls.append(k.get("deadline")) or
                        real(*a, **{**k, "batch_size": 2}))
    e2e = {"tokens": 2048, "ctx": 64, "batch_size": 2, "lr": 1e-3}
    path = _recipe(tmp_path, src, text_file, e2e=e2e, calibration_data="mix",
                   layerwise={"tokens": 256, "ctx": 64, "router_steps": 5},
                   evaluate={"ctx": 64, "datasets": {str(text_file): 128}}, time_budget_s=0.0)
    out = tmp_path / "run"
    report = run_recipe(Recipe.load(path), out, progress=False)
    # one draw, in the layer-wise stage, for the e2e stage's 1,024 sampled tokens; ended after its first batch
    assert len(calls) == 1 and calls[0] is not None
    corpus = torch.load(out / "sampled_corpus.pt", weights_only=True)
    assert report["time_budget"]["sampling"] == {"sampled_corpus.pt": {"tokens": 512, "asked": 1024}}
    assert corpus.numel() == 512
    # the e2e stage drew from an even mix, 512 sampled and 512 WikiText tokens, cycled by its plan
    assert report["stages"]["e2e"]["corpus_tokens"] == 1024
    assert report["stages"]["e2e"]["tokens"] == (PLAN_WARMUP + PLAN_STEPS + 1) * 128
    # a resumed run reads the cut corpus as it is: no second draw
    run_recipe(Recipe.load(path), out, progress=False)
    assert len(calls) == 1
