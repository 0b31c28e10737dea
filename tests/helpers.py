"""Helpers the tests import: tiny random checkpoints and the invariant's error measure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_llama(folder: Path, *, hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, vocab=128, tied=True,
               model_type="llama", dtype=torch.float32, seed=0, max_shard_size="5GB") -> Path:
    """A random Llama (or Mistral) saved as a Hugging Face folder, with a tiny tokenizer-free layout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                               tie_word_embeddings=tied, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    # Default init leaves small weights; make the FFN matter so the invariant is a real test.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    save_tiny_tokenizer(folder, vocab)
    return folder


WORDS = ["the", "model", "expert", "router", "token", "layer", "dense", "sparse", "neuron", "weight"]


def save_tiny_tokenizer(folder: Path, vocab: int) -> None:
    """A whitespace word-level tokenizer whose ids fit the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(folder))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the invariant's measure (elementwise ratios blow up near zero)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def write_random_llama(folder: Path, *, hidden, ffn, layers, heads, kv_heads, vocab, dtype=torch.bfloat16,
                       tied=False, max_shard_size="2GB") -> int:
    """A random-weight Llama written straight to sharded safetensors, one tensor at a time (no model is
    built, so a ~1B checkpoint costs the test little memory). Returns the checkpoint's bytes."""
    import json

    from surgery.safetensors_io import ShardedWriter, TensorSpec, parse_size

    folder.mkdir(parents=True)
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.mlp.gate_proj.weight": (ffn, hidden), f"{p}.mlp.up_proj.weight": (ffn, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, ffn),
        })
    writer = ShardedWriter(folder, [TensorSpec(k, v, dtype) for k, v in shapes.items()], parse_size(max_shard_size))
    g = torch.Generator().manual_seed(0)
    for spec in writer.order:
        writer.write(spec.name, (torch.randn(spec.shape, generator=g) * 0.02).to(dtype))
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return writer.total_bytes


def randomise_head_routers(model, seed=0) -> None:
    """Unit-normal weights and biases for every learned head router (a fresh router routes every token alike),
    so that tests see tokens choosing different heads. qnorm layers (no router) are left as they are."""
    from surgery.attention import head_expert_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in head_expert_modules(model):
            if m.router is not None:
                m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
                m.router.bias.copy_(torch.randn(m.router.bias.shape, generator=g))


def decode_through_cache(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ids[:, :prefill] as one prefill into a fresh cache, then one token at a time through that
    cache: the same as one full forward when the model's cache path is right."""
    from transformers import DynamicCache

    from surgery.kvcache import returned_cache, with_cache

    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], **with_cache(model, DynamicCache()), use_cache=True)
        steps, cache = [out.logits], returned_cache(out)
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], **with_cache(model, cache), use_cache=True)
            cache = returned_cache(out)
            steps.append(out.logits)
    return torch.cat(steps, 1)


def greedy_with_and_without_cache(model, prompt: torch.Tensor, new_tokens: int = 6):
    """`generate`'s greedy tokens with the KV cache and without it (they must agree)."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw)


def require_triton(cuda: bool) -> None:
    """Skip unless Triton kernels can run here: on a GPU, or on CPU under TRITON_INTERPRET=1 (which the kernel
    test modules set before their first Triton import when there is no GPU)."""
    import os

    pytest.importorskip("triton")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")


class Stop(Exception):
    """Raised by stop_after_checkpoint to kill a calibration run."""


def stop_after_checkpoint(run, key: str, value: int) -> None:
    """Call `run` (a calibration) and kill it right after it saves the checkpoint whose state[key] == value."""
    import surgery.calibrate as cal

    orig = cal._save_ckpt

    def save(folder, state, model, optimizer=None, **kw):
        orig(folder, state, model, optimizer, **kw)
        if state.get(key) == value:
            raise Stop

    cal._save_ckpt = save
    try:
        with pytest.raises(Stop):
            run()
    finally:
        cal._save_ckpt = orig


def run_compiled_in_fresh_process(code: str, *args) -> dict:
    """Run `code` (a script that prints one JSON line last) in a new Python process and return that JSON.
    For tests that torch.compile: dynamo and inductor import and configure triton, and the kernel tests run
    Triton's interpreter in this session; a fresh process keeps the two apart."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
