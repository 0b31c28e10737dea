"""Our decode and sampling loops hand the KV cache over under the keyword the installed transformers declares,
so they keep working when transformers drops the deprecated `past_key_values` alias (announced for 5.40)."""

import warnings

import pytest
import torch

import surgery
from surgery.data import sample_corpus
from surgery.kvcache import cache_keyword, returned_cache, with_cache
from surgery_evals.throughput import greedy_decode


def _no_cache_deprecation():
    """Turn any warning that names past_key_values into an error."""
    warnings.filterwarnings("error", message=r".*past_key_values.*")


def test_keyword_is_the_declared_one(tiny_llama):
    import inspect

    model = surgery.load(tiny_llama)
    name = cache_keyword(model)
    assert name in inspect.signature(type(model).forward).parameters
    assert with_cache(model, None) == {name: None}


def test_greedy_decode_and_sampling_raise_no_cache_deprecation(tiny_llama):
    model = surgery.load(tiny_llama)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        _no_cache_deprecation()
        tokens, _ = greedy_decode(model, prompt, steps=3, runtime="eager")
        # The cache returned by a plain forward is found whatever the output calls it, and continuing from
        # it gives the same next token as the static-cache loop.
        out = model(input_ids=prompt, use_cache=True, **with_cache(model, None))
        cache = returned_cache(out)
        assert cache is not None
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(nxt, tokens[:, :1])
        step = model(input_ids=nxt, use_cache=True, **with_cache(model, cache))
        assert torch.equal(step.logits[:, -1].argmax(-1, keepdim=True), tokens[:, 1:2])

        class Tok:
            bos_token_id = 1

        ids = sample_corpus(model, Tok(), tokens=24, seq_len=6, batch_size=2, progress=False)
    assert ids.numel() >= 24


def test_a_forward_without_a_cache_argument_is_refused():
    class NotADecoder(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="neither"):
        cache_keyword(NotADecoder())
