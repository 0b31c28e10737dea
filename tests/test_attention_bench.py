"""`surgery bench model --prefill-ctx`: the attention-only timing feeds every attention module its dense
inputs, and the CLI writes attention and whole-model rows for dense and head experts (tiny models)."""

import json

import torch
from click.testing import CliRunner

import surgery
from surgery.attention import head_expert_modules
from surgery.cli import main
from surgery.convert import ConvertConfig, convert
from surgery_evals.throughput import ThroughputConfig, attention_inputs, attention_times


def heads_model(src, out):
    convert(src, out, ConvertConfig(experts=1, top_k=1, attention_experts=True, attention_top_k=2, shared_heads=1),
            progress=False)
    return out


def test_attention_inputs_are_the_dense_layers_inputs(tmp_path, tiny_llama):
    """Recorded inputs, run through each dense attention module, rebuild the hidden states the decoder layers
    see: layer i's input plus its attention output, normed, is what layer i's MLP gets (checked via a hook)."""
    dense = surgery.load(tiny_llama)
    inputs = attention_inputs(dense, 24)
    assert len(inputs) == 2 and inputs[0]["hidden_states"].shape == (1, 24, 64)
    assert not torch.equal(inputs[0]["hidden_states"], inputs[1]["hidden_states"])
    got = []
    hook = dense.model.layers[1].self_attn.register_forward_hook(lambda m, a, o: got.append(o[0]))
    with torch.no_grad():
        from surgery_evals.throughput import _prefill_ids

        dense(input_ids=_prefill_ids(dense, 1, 24), use_cache=False)
        hook.remove()
        replay = dense.model.layers[1].self_attn(**inputs[1], attention_mask=None)[0]
    assert torch.allclose(replay, got[0], atol=1e-6)


def test_attention_times_run_the_sparse_path(tmp_path, tiny_llama):
    moe = surgery.load(heads_model(tiny_llama, tmp_path / "moe"))
    inputs = attention_inputs(surgery.load(tiny_llama), 16)
    calls = []
    for m in head_expert_modules(moe):
        m.register_forward_hook(lambda mod, a, o: calls.append(mod.impl))
    times = attention_times(moe, inputs, ThroughputConfig(warmup=1, repeats=2))
    assert len(times) == 2 and all(t > 0 for t in times)
    assert len(calls) == 2 * 3  # 2 layers x (1 warmup + 2 timed)
    assert head_expert_modules(moe)[0].last_head_weights is None  # the sparse path ran, not the masked one


def test_bench_model_prefill_ctx_cli(tmp_path, tiny_llama):
    moe = heads_model(tiny_llama, tmp_path / "moe")
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", "model", str(moe), "--dense", str(tiny_llama), "--device", "cpu",
                                  "--prefill", "", "--decode-batch", "", "--prefill-ctx", "32,64", "--warmup", "0",
                                  "--repeats", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["model"], r["phase"], r["seq"]) for r in rows} == {
        (m, p, s) for m in ("dense", "converted") for p in ("attention", "prefill") for s in (32, 64)}
    for row in rows:
        assert len(row["seconds"]) == 3 and row["median_seconds"] == sorted(row["seconds"])[1]
        # tokens/s is seq over the median, rounded to 0.01; median_seconds is rounded to 1e-6 s, which on a tiny
        # model's sub-millisecond pass moves seq / median by more than 0.1%: allow exactly the two roundings
        m = row["median_seconds"]
        assert abs(row["tokens_per_second"] * m - row["seq"]) <= 1.01 * (row["seq"] * 5e-7 / (m - 5e-7) + 0.005 * m)
    assert all("speedup_vs_dense" in r for r in rows if r["model"] == "converted")
    assert result["attention"]["active_head_fraction"] == 0.75 and "sparse.py" in result["attention"]["path"]
    assert result["command"].startswith("surgery") and result["config"]["repeats"] == 3


def test_bench_model_synthetic_heads_cli(tmp_path, monkeypatch):
    """--synthetic llama3.2-1b with head experts (shrunk here: the shape function is swapped for a tiny one)."""
    from transformers import LlamaConfig

    import surgery_evals.throughput as tp

    tiny = lambda layers: LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers or 2,  # noqa: E731
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=128)
    monkeypatch.setitem(tp.SYNTHETIC, "llama3.2-1b", tiny)
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", "model", "--synthetic", "llama3.2-1b", "-E", "1", "-K", "1",
                                  "--attention-experts", "--shared-heads", "2", "--head-router", "learned",
                                  "--device", "cpu", "--prefill", "", "--decode-batch", "", "--prefill-ctx", "16",
                                  "--warmup", "0", "--repeats", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["attention"] == {"heads": 8, "kv_heads": 2, "shared_heads": 2, "top_k": 4,
                                   "active_head_fraction": 0.75, "router": "learned",
                                   "path": "PyTorch sparse path (surgery/attention/sparse.py)"}
    assert len(result["rows"]) == 4


def test_bench_model_bad_flags(tmp_path, tiny_llama):
    moe = heads_model(tiny_llama, tmp_path / "moe")
    for args, message in [(["--prefill-ctx", "2k"], "--prefill-ctx"), (["--prefill-ctx", "0"], "--prefill-ctx"),
                          (["--repeats", "0"], "--repeats"), (["--attention-experts"], "go with --synthetic")]:
        out = tmp_path / "x.json"
        r = CliRunner().invoke(main, ["bench", "model", str(moe), *args, "--json", str(out)])
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
        assert not out.exists()


def test_profile_layer_ranks_ops_for_both_modules(tmp_path, monkeypatch):
    """evals/profile_layer.py on a tiny shape: for attention (head experts) and the FFN (MoE block) it profiles
    dense and converted on the same inputs and ranks real ops: the converted FFN runs the routed path's
    matmuls, the converted attention the sparse path's flash calls (not the dense module's one SDPA call)."""
    from transformers import LlamaConfig

    from surgery_evals import profile_layer

    tiny = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=256)
    monkeypatch.setattr(profile_layer, "SYNTHETIC", {"tiny": lambda layers: tiny})
    for module in ("attention", "mlp"):
        out_path = tmp_path / f"{module}.json"
        profile_layer.main([module, "--synthetic", "tiny", "--layers", "1", "--tokens", "32", "-E", "4", "-K", "2",
                            "--dtype", "float32", "--device", "cpu", "--repeats", "2", "--json", str(out_path)])
        got = json.loads(out_path.read_text())
        for side in ("dense", "converted"):
            assert got[side]["ranked_by"] == "cpu_ms" and got[side]["wall_ms_per_call"] > 0
            ops = {r["op"] for r in got[side]["ops"]}
            assert "aten::mm" in ops or "aten::addmm" in ops or "aten::bmm" in ops, ops
        assert got["dense"]["ops"] != got["converted"]["ops"]
        if module == "attention":
            dense_ops = {r["op"]: r["calls"] for r in got["dense"]["ops"]}
            conv_ops = {r["op"]: r["calls"] for r in got["converted"]["ops"]}
            flash = "aten::_scaled_dot_product_flash_attention_for_cpu"  # shared heads' sdpa + the routed blocks'
            assert conv_ops.get(flash, 0) > dense_ops.get(flash, 0) == 1
