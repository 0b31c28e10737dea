"""GGUF export, checked by its consumer: llama.cpp (llama-cpp-python, built by the README's test command)
loads the file and must give our logits and greedy tokens.

Tolerances (max |logit difference|, float32 weights, llama.cpp's KV cache in float32, one thread):
    random configs  1e-5   (measured ~2e-7 on logits of magnitude ~0.5)
    demo model      5e-3   (30 layers, logits up to ~30; measured up to 2.3e-3: float32 summation order)
plus the same 32 greedy tokens. Reduced types are checked against the float32 export's own logits with looser,
stated bounds (f16/bf16/q8_0 round the weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.convert import ConvertConfig, convert
from surgery.errors import SurgeryError
from surgery.export import export_model

from helpers import make_llama

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the README's test command builds it)")
from surgery_evals import llamacpp as L  # noqa: E402

TOL_RANDOM = 1e-5
TOL_DEMO = 5e-3
STEPS = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def random_llama(folder: Path, tokenizer_from: Path, *, ffn=100, rope=None, tied=False) -> Path:
    """A random Llama-3-style model (GQA, untied, rope_theta 5e5, optionally Llama-3.1 RoPE scaling) with the
    demo model's BPE tokenizer (so its vocabulary, 49152)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    rope = rope or {"rope_type": "default", "rope_theta": 500000.0}
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=ffn, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=tied,
                               max_position_embeddings=256, rope_parameters=rope)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def ours_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def ours_greedy(model, prompt: list[int], steps: int = STEPS) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def check_against_llamacpp(src: Path, gguf: Path, ids: list[int], tol: float, prompt: int = 8) -> float:
    model = surgery.load(src).eval()
    llm = L.load(gguf, n_ctx=256, threads=1, kv_f32=True)
    diff = float(np.abs(L.logits(llm, ids) - ours_logits(model, ids)).max())
    assert diff <= tol, f"max |logit difference| {diff} > {tol}"
    assert L.greedy(llm, ids[:prompt], STEPS) == ours_greedy(model, ids[:prompt])
    return diff


def random_ids(n=40, vocab=49152, seed=1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("case,convert_kw,arch,rope", [
    ("dense", None, "llama", LLAMA31_ROPE),
    # 100 neurons into 7 experts: widths 15 and 14, zero-padded
    ("routed", dict(experts=7, top_k=2), "llama", LLAMA31_ROPE),
    # 5 routed + 3 shared experts (one shared MLP of their summed width), unequal widths, scale folded
    ("shared", dict(experts=5, top_k=2, shared_experts=3, scale=1.7), "granitemoe", LLAMA31_ROPE),
    ("no-renorm", dict(experts=6, top_k=3, shared_experts=1, renormalize=False, scale=1.5), "deepseek", None),
    ("no-renorm-routed", dict(experts=4, top_k=2, renormalize=False), "deepseek",
     {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
])
def test_random_config_runs_in_llamacpp_with_our_logits(tmp_path, demo_model, case, convert_kw, arch, rope):
    dense = random_llama(tmp_path / "dense", demo_model, rope=rope)
    src = dense
    if convert_kw is not None:
        src = tmp_path / "moe"
        convert(dense, src, ConvertConfig(seed=3, **convert_kw), progress=False)
    summary = export_model(src, tmp_path / "m.gguf", "gguf", dtype="f32", progress=False)
    assert summary["architecture"] == arch and summary["dtype"] == "f32" and summary["tokenizer_pre"] == "smollm"
    check_against_llamacpp(src, tmp_path / "m.gguf", random_ids(), TOL_RANDOM)


@pytest.mark.parametrize("dtype,tol", [("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1)])
def test_reduced_types(tmp_path, demo_model, dtype, tol):
    """Matrices in the chosen type, norms and router in F32; q8_0 pads FFN widths to its 32-wide blocks
    (exact zeros). Logits within `tol` (relative to the largest logit) of the float32 export's."""
    import gguf

    dense = random_llama(tmp_path / "dense", demo_model)
    convert(dense, tmp_path / "moe", ConvertConfig(experts=5, top_k=2, shared_experts=3, seed=3), progress=False)
    ref = export_model(tmp_path / "moe", tmp_path / "f32.gguf", "gguf", dtype="f32", progress=False)
    out = export_model(tmp_path / "moe", tmp_path / "m.gguf", "gguf", dtype=dtype, progress=False)
    assert out["output_bytes"] < ref["output_bytes"] and out["f16_fallback"] == []
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down_exps.weight"] == types["output.weight"] == dtype.upper()
    if dtype == "q8_0":
        assert out["expert_width"] % 32 == 0 and out["shared_width"] % 32 == 0
    ids = random_ids()
    a = L.logits(L.load(tmp_path / "m.gguf", n_ctx=128, threads=1, kv_f32=True), ids)
    b = L.logits(L.load(tmp_path / "f32.gguf", n_ctx=128, threads=1, kv_f32=True), ids)
    assert np.abs(a - b).max() <= tol * np.abs(b).max()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "routed", "shared"])
def test_demo_model_gguf_in_llamacpp(tmp_path, demo_model, kind):
    """The real SmolLM2-135M: dense, 8 routed experts (Mixtral layout), 6 routed + 2 shared (Granite-MoE
    layout): llama.cpp's 32 greedy tokens are ours, its logits within TOL_DEMO, and it tokenizes as we do."""
    src = demo_model
    if kind != "dense":
        shared = 2 if kind == "shared" else 0
        convert(demo_model, tmp_path / "moe", ConvertConfig(experts=8 - shared, top_k=2, shared_experts=shared),
                progress=False)
        src = tmp_path / "moe"
    summary = export_model(src, tmp_path / "m.gguf", "gguf", dtype="f32", progress=False)
    assert summary["architecture"] == {"dense": "llama", "routed": "llama", "shared": "granitemoe"}[kind]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    text = "The capital of France is a city where 1234 people's   words\n<|im_start|>user"
    ids = tok(text)["input_ids"]
    llm = L.load(tmp_path / "m.gguf", n_ctx=256, threads=1, kv_f32=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    check_against_llamacpp(src, tmp_path / "m.gguf", ids, TOL_DEMO, prompt=len(ids))
    meta = llm.metadata
    assert meta["tokenizer.chat_template"] == (Path(demo_model) / "chat_template.jinja").read_text()
    assert (int(meta["tokenizer.ggml.bos_token_id"]), int(meta["tokenizer.ggml.eos_token_id"])) == \
        (tok.bos_token_id, tok.eos_token_id)


def test_refusals_are_clear_and_leave_nothing(tmp_path, demo_model):
    # A tokenizer that is not byte-level BPE (the tiny test tokenizer is word-level).
    moe = tmp_path / "moe"
    convert(make_llama(tmp_path / "dense"), moe, ConvertConfig(experts=4, top_k=2), progress=False)
    with pytest.raises(SurgeryError, match="BPE"):
        export_model(moe, tmp_path / "a.gguf", "gguf", progress=False)
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob(".a.gguf*"))
    # Sigmoid scoring has no llama.cpp Llama-family MoE architecture.
    dense = random_llama(tmp_path / "bpe", demo_model)
    convert(dense, tmp_path / "sg", ConvertConfig(experts=4, top_k=2, score_func="sigmoid"), progress=False)
    with pytest.raises(SurgeryError, match="sigmoid"):
        export_model(tmp_path / "sg", tmp_path / "b.gguf", "gguf", progress=False)
    # Unrenormalised routing (DeepSeek-MoE layout) with Llama-3.1 RoPE factors, which DeepSeek does not read.
    d31 = random_llama(tmp_path / "d31", demo_model, rope=LLAMA31_ROPE)
    convert(d31, tmp_path / "nr", ConvertConfig(experts=4, top_k=2, renormalize=False), progress=False)
    with pytest.raises(SurgeryError, match="llama3"):
        export_model(tmp_path / "nr", tmp_path / "c.gguf", "gguf", progress=False)
    # CLI: one-line error, exit status 2, nothing written; an existing file is kept unless --overwrite.
    run = CliRunner().invoke
    r = run(main, ["export", str(moe), str(tmp_path / "d.gguf"), "--format", "gguf"])
    assert r.exit_code == 2 and "error:" in r.output and "tokenizer" in r.output
    assert not (tmp_path / "d.gguf").exists()
    r = run(main, ["export", str(dense), str(tmp_path / "e.gguf"), "--format", "gguf", "--dtype", "q8_0",
                   "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.json").read_text())["dtype"] == "q8_0"
    before = (tmp_path / "e.gguf").read_bytes()
    r = run(main, ["export", str(dense), str(tmp_path / "e.gguf"), "--format", "gguf"])
    assert r.exit_code == 2 and "--overwrite" in r.output and (tmp_path / "e.gguf").read_bytes() == before


def test_bench_llamacpp_measures_models_in_turn(tmp_path, demo_model, monkeypatch):
    """`surgery bench llamacpp` loads a dtype's GGUFs together and runs them in interleaved rounds (one warm-up
    each, then one run of each per round), writing both figures, every run and the speed-ups."""
    dense = random_llama(tmp_path / "dense", demo_model)
    convert(dense, tmp_path / "moe", ConvertConfig(experts=4, top_k=1, seed=3), progress=False)
    order = []
    run = L._Runner.run
    monkeypatch.setattr(L._Runner, "run", lambda self: order.append(self.prompt and id(self)) or run(self))
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", "llamacpp", str(dense), str(tmp_path / "moe"), "--repeats", "2",
                                  "--prompt", "16", "--decode", "4", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    a, b = order[0], order[1]
    assert a != b and order == [a, b, a, b, a, b]  # warm-up of each, then two rounds in turn
    res = json.loads(out.read_text())
    rows = res["results"]
    assert [x["role"] for x in rows] == ["dense", "converted"] and "protocol" in res["config"]
    assert all(len(x["pp"]["runs"]) == 2 and len(x["tg"]["runs"]) == 2 and x["tg"]["tokens_per_s"] > 0 for x in rows)
    assert set(rows[1]["speedup_vs_dense"]) == set(rows[1]["speedup_paired"]) == {"pp", "tg"}
    pp = [c / d for c, d in zip(rows[1]["pp"]["runs"], rows[0]["pp"]["runs"])]
    assert rows[1]["speedup_paired"]["pp"] == round(sorted(pp)[1], 3)  # the median of the two rounds' ratios
