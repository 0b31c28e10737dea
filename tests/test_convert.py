"""Conversion on tiny random Llamas: the core invariant, the native format's round trip, sharding, routing."""

import json

import pytest
import torch

import surgery
from surgery.convert import ConvertConfig, convert
from surgery.modeling import save_converted
from surgery.moe import moe_blocks, set_dense_routing

from helpers import make_llama, relative_error

TOL = 1e-5  # float32 logits, max |moe - dense| / max |dense|


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("experts,shared", [(4, 0), (7, 0), (5, 2)])  # 96 neurons: 7 and 5+2 are unequal
def test_invariant_dense_routing_equals_dense(tmp_path, tied, kv_heads, experts, shared):
    src = make_llama(tmp_path / "dense", tied=tied, kv_heads=kv_heads)
    convert(src, tmp_path / "moe", ConvertConfig(experts=experts, top_k=2, shared_experts=shared, seed=1), progress=False)
    dense, moe = surgery.load(src), surgery.load(tmp_path / "moe")
    set_dense_routing(moe, True)
    ids = torch.randint(0, 128, (2, 17))
    assert relative_error(logits(moe, ids), logits(dense, ids)) <= TOL


def test_invariant_mistral_config(tmp_path):
    src = make_llama(tmp_path / "dense", model_type="mistral")
    convert(src, tmp_path / "moe", ConvertConfig(experts=4, top_k=4), progress=False)
    dense, moe = surgery.load(src), surgery.load(tmp_path / "moe")
    set_dense_routing(moe, True)
    ids = torch.randint(0, 128, (1, 9))
    assert type(moe).__name__ == "MistralForCausalLM"
    assert relative_error(logits(moe, ids), logits(dense, ids)) <= TOL


def test_native_config_block(tmp_path, tiny_llama):
    summary = convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=7, top_k=3, shared_experts=1, seed=5),
                      progress=False)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    block = cfg["surgery"]
    assert block["num_experts"] == 7 and block["top_k"] == 3 and block["shared_experts"] == 1
    assert sum(block["expert_sizes"]) + block["shared_width"] == 96
    assert block["method"] == "random" and block["seed"] == 5
    assert block["source_hash"].startswith("sha256:") and len(block["source_hash"]) == 71
    assert len(block["permutations"]) == 2
    assert all(sorted(p) == list(range(96)) for p in block["permutations"])
    assert summary["peak_rss_bytes"] > 0 and summary["checkpoint_bytes"] > 0


def test_round_trip_is_bit_exact(tmp_path, tiny_llama):
    convert(tiny_llama, tmp_path / "a", ConvertConfig(experts=4, top_k=2, shared_experts=1), progress=False)
    a = surgery.load(tmp_path / "a")
    save_converted(a, tmp_path / "b", tokenizer_from=tmp_path / "a")
    b = surgery.load(tmp_path / "b")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(logits(a, ids), logits(b, ids))


def test_sharded_source_and_output(tmp_path):
    src = make_llama(tmp_path / "dense", max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    convert(src, tmp_path / "moe", ConvertConfig(experts=4, top_k=4, max_shard_size="50KB"), progress=False)
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    dense, moe = surgery.load(src), surgery.load(tmp_path / "moe")
    set_dense_routing(moe, True)
    ids = torch.randint(0, 128, (1, 8))
    assert relative_error(logits(moe, ids), logits(dense, ids)) <= TOL


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    src = make_llama(tmp_path / "dense", dtype=torch.bfloat16)
    convert(src, tmp_path / "moe", ConvertConfig(experts=4, top_k=4), progress=False)
    dense, moe = surgery.load(src), surgery.load(tmp_path / "moe")
    assert next(moe.parameters()).dtype == torch.bfloat16
    # Every expert tensor is an exact copy of dense weights: compare the rebuilt FFN in float32.
    set_dense_routing(moe, True)
    ids = torch.randint(0, 128, (1, 8))
    a, b = logits(moe.float(), ids), logits(dense.float(), ids)
    assert relative_error(a, b) <= TOL


def test_topk_routing_differs_from_dense_and_generates(tmp_path, tiny_llama):
    convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=4, top_k=1), progress=False)
    moe = surgery.load(tmp_path / "moe")
    ids = torch.randint(0, 128, (2, 10))
    sparse = logits(moe, ids)
    set_dense_routing(moe, True)
    assert relative_error(sparse, logits(moe, ids)) > 1e-3
    set_dense_routing(moe, False)
    assert all(b.last_router_logits.shape == (20, 4) for b in moe_blocks(moe))
    prompt = ids[:1, :5]
    cached = moe.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = moe.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 11) and torch.equal(cached, uncached)


def test_converted_runs_in_bfloat16(tmp_path, tiny_llama):
    convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=4, top_k=2), progress=False)
    moe = surgery.load(tmp_path / "moe", dtype="bfloat16")
    out = logits(moe, torch.randint(0, 128, (1, 6)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_conversion_is_deterministic(tmp_path, tiny_llama):
    """Converting twice with the same seed gives identical files (deterministic)."""
    cfg = ConvertConfig(experts=4, top_k=2, seed=9)
    convert(tiny_llama, tmp_path / "a", cfg, progress=False)
    convert(tiny_llama, tmp_path / "b", cfg, progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_in_memory_conversion_matches_streaming(tmp_path, tiny_llama):
    from surgery.convert import convert_model

    cfg = ConvertConfig(experts=7, top_k=2, shared_experts=1, seed=3)
    convert(tiny_llama, tmp_path / "moe", cfg, progress=False)
    streamed = surgery.load(tmp_path / "moe")
    in_memory = convert_model(surgery.load(tiny_llama), cfg)
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert in_memory.surgery_config.permutations == streamed.surgery_config.permutations
