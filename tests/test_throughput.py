"""The end-to-end benchmark's runtime is correct (same tokens as `generate`) and its CLI writes the JSON."""

import json

import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.convert import ConvertConfig, convert
from surgery_evals.throughput import greedy_decode


def test_static_cache_decode_matches_generate(tmp_path, tiny_llama):
    convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=4, top_k=2), progress=False)
    for path in (tiny_llama, tmp_path / "moe"):
        model = surgery.load(path)
        prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
        ours, seconds = greedy_decode(model, prompt, steps=5, runtime="eager", warmup=2)
        ref = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 6:]
        assert ours.shape == (2, 8) and torch.equal(ours, ref) and seconds > 0


def test_bench_model_cli_writes_rows(tmp_path, tiny_llama):
    convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=4, top_k=1), progress=False)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", "model", str(tmp_path / "moe"), "--device", "cpu", "--prefill", "1x16",
                                  "--decode-batch", "1,2", "--new-tokens", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and "cpu_moe" in result["path"]
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    rows = result["rows"]
    assert {(r["model"], r["phase"], r["batch"]) for r in rows} == {
        (m, p, b) for m in ("dense", "converted") for p, b in (("prefill", 1), ("decode", 1), ("decode", 2))}
    assert all(r["tokens_per_second"] > 0 for r in rows)
    assert all("speedup_vs_dense" in r for r in rows if r["model"] == "converted")
    dense = {(r["phase"], r["batch"]): r for r in rows if r["model"] == "dense"}
    for r in (r for r in rows if r["model"] == "converted"):  # 3 interleaved rounds: the middle per-round ratio
        d = dense[(r["phase"], r["batch"])]
        assert len(r["rounds"]) == len(d["rounds"]) == 3
        assert r["speedup_paired"] == round(sorted(c / x for c, x in zip(r["rounds"], d["rounds"]))[1], 3)


def test_rounds_interleave_the_models():
    """Each round runs every model once, in turn, after the warm-up calls: a drifting machine speed lands on
    every side alike."""
    from surgery_evals.throughput import interleaved_rounds

    calls = []
    times = interleaved_rounds({"dense": "d", "converted": "c"}, lambda m: calls.append(m) or float(len(calls)),
                    torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["d", "c"] + ["d", "c"] * 3
    assert times == {"dense": [3.0, 5.0, 7.0], "converted": [4.0, 6.0, 8.0]}


def test_bench_model_needs_a_model():
    r = CliRunner().invoke(main, ["bench", "model", "--json", "x.json"])
    assert r.exit_code == 2 and "--synthetic" in r.stderr


def test_bench_model_stock_needs_synthetic(tmp_path, tiny_llama):
    convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=4, top_k=1), progress=False)
    r = CliRunner().invoke(main, ["bench", "model", str(tmp_path / "moe"), "--stock", "--json", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "--stock goes with --synthetic" in r.output


def test_stock_mixtral_has_the_converted_shape():
    from surgery_evals.throughput import llama2_7b_config, stock_mixtral_like

    c = stock_mixtral_like(llama2_7b_config(layers=2), experts=16, top_k=4)
    assert (c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok, c.num_hidden_layers) == (
        4096, 11008 // 16, 16, 4, 2)
