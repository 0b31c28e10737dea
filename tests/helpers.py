"""Helpers the tests import: tiny random checkpoints and the invariant's error measure."""

from __future__ import annotations

from pathlib import Path

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
