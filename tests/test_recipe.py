"""Recipes: the whole pipeline on a tiny random Llama, its report and plots, resume, and the shipped YAMLs."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.recipe import Recipe, run_recipe

from helpers import make_llama

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _recipe(tmp_path, src, text_file, **over):
    d = {
        "name": "tiny", "source": str(src), "seed": 0, "device": "cpu",
        "profile": {"data": str(text_file), "tokens": 512, "ctx": 64, "samples": 256},
        "convert": {"experts": 6, "shared_experts": 2, "top_k": 2, "method": "coactivation", "router_init": "fitted"},
        "layerwise": {"tokens": 256, "ctx": 64, "router_steps": 10},
        "e2e": {"tokens": 256, "ctx": 64, "batch_size": 2, "lr": 1e-3},
        "calibration_data": str(text_file),
        "evaluate": {"ctx": 64, "datasets": {str(text_file): 256}, "stages": ["converted", "layerwise", "final"]},
    }
    d.update(over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_recipe_runs_and_resumes(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96)
    path = _recipe(tmp_path, src, text_file, export=["qwen2_moe"],
                   e2e={"tokens": 256, "ctx": 64, "batch_size": 2, "lr": 1e-3, "snapshots": [0.5]})
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    # the printed table: dense and converted rows, the speed figure, the verified export
    assert "dense" in r.output and "converted (e2e)" in r.output and "export qwen2_moe" in r.output
    exp = report["exports"]["qwen2_moe"]
    assert exp["reloaded_by"] == "transformers.AutoModelForCausalLM" and exp["max_abs_logit_diff"] < 1e-4
    assert (out / "export-qwen2_moe" / "config.json").is_file()
    assert report["speed"]["dense_tokens_per_s"] > 0 and report["speed"]["converted_tokens_per_s"] > 0
    curve = report["ppl_vs_calibration_time"]
    assert [p["step"] for p in curve] == [1, "final"] and all(p["perplexity"] > 1 for p in curve)
    stages = {(e["stage"]) for e in report["evaluations"]}
    assert stages == {"dense", "converted", "layerwise", "e2e"}
    assert report["active_ffn_fraction"] == pytest.approx(0.5)
    assert len(report["expert_load"]["counts"]) == 2 and len(report["expert_load"]["counts"][0]) == 6
    assert set(report["stages"]) >= {"profile", "convert", "layerwise", "e2e"}
    assert report["stages"]["e2e"]["tokens"] == 256 and report["machine"]["summary"]
    assert (out / "expert_load.png").stat().st_size > 0 and (out / "perplexity_vs_active.png").stat().st_size > 0
    assert surgery.load(out / "model").surgery_config.calibration["e2e_tokens"] == 256
    # a rerun finds every stage done and does no work
    before = (out / "model" / "config.json").stat().st_mtime_ns
    again = run_recipe(Recipe.load(path), out, progress=False)
    assert (out / "model" / "config.json").stat().st_mtime_ns == before
    assert again["perplexity"] == report["perplexity"]


def test_recipe_reports_static_pruning_and_activation_sparsity_beside_the_conversion(tmp_path, text_file,
                                                                                      monkeypatch):
    import surgery.recipe as recipe_mod
    import surgery_evals.baselines as baselines_mod
    from surgery_evals.baselines import run_baseline

    src = make_llama(tmp_path / "dense", ffn=96)
    path = _recipe(tmp_path, src, text_file, layerwise=None, evaluate={"ctx": 64, "datasets": {str(text_file): 256}})
    out = tmp_path / "run"
    first = run_recipe(Recipe.load(path), out, progress=False)
    assert not any(k.startswith(("static/", "gate-sparsity/")) for k in first["perplexity"])
    # switched on for the finished run: the baselines are added, nothing trained or evaluated is redone
    trained = (out / "model" / "config.json").stat().st_mtime_ns
    path = _recipe(tmp_path, src, text_file, layerwise=None,
                   evaluate={"ctx": 64, "datasets": {str(text_file): 256}, "static_baseline": True,
                             "activation_sparsity": True})
    r = CliRunner().invoke(main, ["run", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "model" / "config.json").stat().st_mtime_ns == trained
    assert "static pruning, same e2e budget" in r.output and "activation sparsity, no training" in r.output
    report = json.loads((out / "report.json").read_text())
    static = [e for e in report["evaluations"] if e["stage"] == "static"]
    assert len(static) == 1 and static[0]["active_ffn_fraction"] == report["active_ffn_fraction"] == 0.5
    assert static[0]["perplexity"] != report["perplexity"][f"e2e/{text_file}"]
    assert report["perplexity"][f"e2e/{text_file}"] == first["perplexity"][f"e2e/{text_file}"]
    info = report["static_baseline"]
    assert info["keep"] == 0.5 and info["tokens"] == report["stages"]["e2e"]["tokens"] == 256
    assert "static-baseline" not in report["stages"]  # not part of the pipeline's time
    # activation sparsity at the same neuron fraction, untrained: the standalone baseline command's figure
    alone = run_baseline(src, "gate-sparsity", 0.5, datasets={str(text_file): 256}, ctx=64, progress=False)
    assert report["perplexity"][f"gate-sparsity/{text_file}"] == pytest.approx(
        alone["evaluations"][str(text_file)]["perplexity"], rel=1e-4)
    assert report["activation_sparsity"] == {"keep": 0.5, "tokens": 0, "ffn_matmul_fraction": 0.8333}
    # a rerun keeps the recorded baselines and does not build them again
    monkeypatch.setattr(recipe_mod, "_static_baseline", lambda *a, **k: pytest.fail("static baseline redone"))
    monkeypatch.setattr(baselines_mod, "apply_baseline", lambda *a, **k: pytest.fail("gate sparsity redone"))
    again = run_recipe(Recipe.load(path), out, progress=False)
    for k in (f"static/{text_file}", f"gate-sparsity/{text_file}"):
        assert again["perplexity"][k] == report["perplexity"][k]


def test_recipe_resumes_after_a_lost_stage(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96)
    path = _recipe(tmp_path, src, text_file, e2e=None, evaluate={"ctx": 64, "datasets": {str(text_file): 128}})
    out = tmp_path / "run"
    run_recipe(Recipe.load(path), out, progress=False)
    state = json.loads((out / "state.json").read_text())
    del state["stages"]["layerwise"]
    (out / "state.json").write_text(json.dumps(state))
    profile_mtime = (out / "profile.pt").stat().st_mtime_ns
    report = run_recipe(Recipe.load(path), out, progress=False)
    assert (out / "profile.pt").stat().st_mtime_ns == profile_mtime  # not redone
    assert "layerwise" in report["stages"]


def test_recipe_errors(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: y\nbogus: 1\n")
    with pytest.raises(SurgeryError, match="unknown recipe keys"):
        Recipe.load(bad)
    bad.write_text("name: x\nsource: y\nconvert: {experts: 4, top_k: 2, nope: 1}\n")
    with pytest.raises(SurgeryError, match="nope"):
        Recipe.load(bad)
    path = _recipe(tmp_path, src, text_file, layerwise=None, e2e=None,
                   evaluate={"ctx": 64, "datasets": {str(text_file): 128}})
    out = tmp_path / "run"
    run_recipe(Recipe.load(path), out, progress=False)
    other = _recipe(tmp_path, src, text_file, seed=5, layerwise=None, e2e=None)
    with pytest.raises(SurgeryError, match="different recipe"):
        run_recipe(Recipe.load(other), out, progress=False)
    # only the baseline switches may change under a finished run: other evaluation settings are refused
    other = _recipe(tmp_path, src, text_file, layerwise=None, e2e=None,
                    evaluate={"ctx": 64, "datasets": {str(text_file): 64}})
    with pytest.raises(SurgeryError, match="different recipe"):
        run_recipe(Recipe.load(other), out, progress=False)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("**/*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    r = Recipe.load(path)
    assert r.source == "demo"
    E, S, K = r.convert["experts"], r.convert.get("shared_experts", 0), r.convert["top_k"]
    active = (K + S) / (E + S)  # equal-sized groups
    want = 0.25 if "25pct" in path.name else 0.5  # quickstart and the ablations: 50%
    assert active == pytest.approx(want)
    assert "wikitext" in r.evaluate["datasets"]
    if path.parent == RECIPES:  # the shipped recipes (not the ablations) also measure the second domain
        assert set(r.evaluate["datasets"]) == {"wikitext", "stdlib"}


def test_intermediate_stages_on_fewer_datasets(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96)
    second = tmp_path / "second.txt"
    second.write_text(text_file.read_text()[::-1])
    ev = {"ctx": 64, "datasets": {str(text_file): 128, str(second): 128}, "stages": ["converted", "final"],
          "intermediate_datasets": [str(text_file)]}
    report = run_recipe(Recipe.load(_recipe(tmp_path, src, text_file, e2e=None, evaluate=ev)), tmp_path / "run",
                        progress=False)
    got = {(e["stage"], e["dataset"]) for e in report["evaluations"]}
    assert ("converted", str(text_file)) in got and ("converted", str(second)) not in got
    assert ("layerwise", str(second)) in got  # the final stage gets every dataset
    bad = dict(ev, intermediate_datasets=["nope"])
    with pytest.raises(SurgeryError, match="intermediate_datasets"):
        Recipe.load(_recipe(tmp_path, src, text_file, evaluate=bad))


def test_quality_table_from_reports(tmp_path):
    report = {"recipe": {"name": "r"}, "method": "coactivation E12 S4 K4", "machine": {"summary": "CPU"},
              "calibration_tokens": {"converted": 0, "layerwise": 10, "e2e": 100},
              "seconds_to_stage": {"converted": 1.0, "layerwise": 3.0, "e2e": 9.0},
              "evaluations": [
                  {"stage": "dense", "dataset": "wikitext", "perplexity": 20.0, "active_ffn_fraction": 1.0},
                  {"stage": "converted", "dataset": "wikitext", "perplexity": 80.0, "active_ffn_fraction": 0.5},
                  {"stage": "e2e", "dataset": "wikitext", "perplexity": 30.0, "active_ffn_fraction": 0.5},
                  {"stage": "static", "dataset": "wikitext", "perplexity": 25.0, "active_ffn_fraction": 0.5},
                  {"stage": "gate-sparsity", "dataset": "wikitext", "perplexity": 50.0, "active_ffn_fraction": 0.5}],
              "static_baseline": {"keep": 0.5, "tokens": 64, "seconds": 5.0},
              "activation_sparsity": {"keep": 0.5, "tokens": 0, "ffn_matmul_fraction": 0.8333}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    r = CliRunner().invoke(main, ["quality-table", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 6  # header, rule, two stages in calibration order, then the two baselines
    assert "| none | 50% | 80.00 (4.00x)" in lines[2] and "layer-wise + end-to-end | 50% | 30.00 (1.50x)" in lines[3]
    assert "| static pruning, bias-compensated | end-to-end (the recipe's e2e budget) | 50% | 25.00 (1.25x)" in lines[4]
    assert "| 64 | 5.0 |" in lines[4]
    assert "| gate-decided activation sparsity (gate dense) | none (training-free) | 50% | 50.00 (2.50x)" in lines[5]
    assert "| 0 | - |" in lines[5]
    # a recipe without a layer-wise stage: its e2e row says end-to-end alone
    report["calibration_tokens"].pop("layerwise")
    (tmp_path / "r.json").write_text(json.dumps(report))
    lines = CliRunner().invoke(main, ["quality-table", str(tmp_path)]).output.strip().splitlines()
    assert "| end-to-end | 50% | 30.00 (1.50x)" in lines[3]
    bad = CliRunner().invoke(main, ["quality-table", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no such folder" in bad.output


def test_recipe_with_an_unknown_prompt_category_is_refused_at_load(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96)
    path = _recipe(tmp_path, src, text_file, calibration_data="mix-prompted:math,poetry")
    r = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "calibration_data" in r.output and "poetry" in r.output
    assert not (tmp_path / "run").exists()


def test_recipe_on_prompted_text_samples_answers_once(tmp_path, text_file):
    """calibration_data: mix-prompted draws one prompted corpus for the run (its own file, beside the unprompted
    one's name), half of each stage's tokens."""
    src = make_llama(tmp_path / "dense", ffn=96)
    path = _recipe(tmp_path, src, text_file, calibration_data="mix-prompted:math", layerwise=None,
                   e2e={"tokens": 512, "ctx": 64, "batch_size": 2},
                   evaluate={"ctx": 64, "datasets": {str(text_file): 128}, "stages": ["final"], "snapshots": False})
    out = tmp_path / "run"
    report = run_recipe(Recipe.load(path), out, progress=False)
    files = list(out.glob("prompted_corpus-*.pt"))
    assert len(files) == 1 and not (out / "sampled_corpus.pt").exists()
    assert torch.load(files[0], weights_only=True).numel() == 256  # the sampled half of the e2e budget
    assert report["stages"]["e2e"]["tokens"] == 512


def test_profile_and_calibration_on_different_samples_draw_only_what_each_reads(tmp_path, text_file):
    """profile on `mix` beside calibration on `mix-prompted` (the 50% recipe since round 20): the unprompted
    corpus is sized by the profile alone (half its 256 tokens), not by the end-to-end budget the prompted one
    serves (round 20's recipe drew 126,976 unprompted tokens to profile 8,192 of them)."""
    src = make_llama(tmp_path / "dense", ffn=96)
    path = _recipe(tmp_path, src, text_file, profile={"data": "mix", "tokens": 256, "ctx": 64, "samples": 128},
                   calibration_data="mix-prompted:math", layerwise=None,
                   e2e={"tokens": 512, "ctx": 64, "batch_size": 2},
                   evaluate={"ctx": 64, "datasets": {str(text_file): 128}, "stages": ["final"], "snapshots": False})
    out = tmp_path / "run"
    report = run_recipe(Recipe.load(path), out, progress=False)
    assert torch.load(out / "sampled_corpus.pt", weights_only=True).numel() == 128
    prompted = list(out.glob("prompted_corpus-*.pt"))
    assert len(prompted) == 1 and torch.load(prompted[0], weights_only=True).numel() == 256
    assert report["stages"]["profile"]["tokens"] == 256 and report["stages"]["e2e"]["tokens"] == 512


def test_recipe_on_sampled_text_draws_one_corpus(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96)
    path = _recipe(tmp_path, src, text_file, profile={"data": "sample", "tokens": 256, "ctx": 64, "samples": 128},
                   calibration_data="sample", layerwise={"tokens": 128, "ctx": 64, "router_steps": 5},
                   e2e={"tokens": 384, "ctx": 64, "batch_size": 2},
                   evaluate={"ctx": 64, "datasets": {str(text_file): 128}})
    out = tmp_path / "run"
    report = run_recipe(Recipe.load(path), out, progress=False)
    corpus = torch.load(out / "sampled_corpus.pt", weights_only=True)
    assert corpus.numel() == 384  # the largest budget of the three stages, sampled once
    assert report["stages"]["profile"]["tokens"] == 256 and report["stages"]["e2e"]["tokens"] == 384


def test_recipe_with_head_experts_profiles_the_heads(tmp_path, text_file):
    """A recipe converting heads too, with shared heads and the learned router: its profile stage stores head
    statistics in profile.pt, the conversion chooses the shared heads from them (the heads of largest output
    contribution) and the calibrated model carries head experts through to the report."""
    from surgery.attention import head_expert_modules
    from surgery.attention.profile import load_head_stats

    src = make_llama(tmp_path / "dense", ffn=96)
    convert = {"experts": 6, "shared_experts": 2, "top_k": 2, "method": "coactivation", "router_init": "fitted",
               "attention_experts": True, "attention_top_k": 1, "shared_heads": 1, "head_router": "learned"}
    path = _recipe(tmp_path, src, text_file, convert=convert,
                   layerwise={"tokens": 256, "ctx": 64, "router_steps": 10, "head_steps": 5, "head_train": "qo"},
                   evaluate={"ctx": 64, "datasets": {str(text_file): 256}, "stages": ["final"], "snapshots": False})
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    stats = load_head_stats(out / "profile.pt")
    assert stats is not None and len(stats) == 2
    model = surgery.load(out / "model")
    heads = head_expert_modules(model)
    assert len(heads) == 2
    for i, m in enumerate(heads):
        assert list(m.shared) == [int(stats[i].contribution.argmax())]
    report = json.loads((out / "report.json").read_text())
    assert report["evaluations"][-1]["perplexity"] > 1
    assert report["attention"]["shared_heads"] == 1 and report["attention"]["active_head_fraction"] == 0.5
