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


def test_growing_cache_decodes_like_a_static_cache_and_reads_only_the_filled_positions(tiny_llama):
    """The sampler's cache: left-padded prompts of unequal length, then decode steps; the logits equal a
    StaticCache loop's (float32, 1e-5), and every layer hands attention only the positions written so far."""
    from surgery.kvcache import growing_cache, static_cache

    model = surgery.load(tiny_llama)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 128, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0  # row 0 is two tokens shorter, left-padded
    mask[2, :1] = 0
    nxt = torch.randint(2, 128, (3, 4), generator=g)
    logits = {}
    for name, make in (("static", static_cache), ("growing", growing_cache)):
        cache = make(model, 3, 10, "cpu", torch.float32)
        seen = []
        if name == "growing":  # the key length each attention call of layer 0 receives
            update = cache.layers[0].update

            def recording_update(k, v, *a, **kw):
                keys, values = update(k, v, *a, **kw)
                seen.append(keys.shape[2])
                return keys, values

            cache.layers[0].update = recording_update
        am, pos = mask.clone(), (mask.cumsum(-1) - 1).clamp(min=0)
        out = [model(input_ids=prompt, attention_mask=am, position_ids=pos, cache_position=torch.arange(6),
                     use_cache=True, **with_cache(model, cache)).logits[:, -1]]
        for t in range(4):
            am = torch.cat([am, am.new_ones(3, 1)], 1)
            pos = pos[:, -1:] + 1
            out.append(model(input_ids=nxt[:, t:t + 1], attention_mask=am, position_ids=pos,
                             cache_position=torch.tensor([6 + t]), use_cache=True,
                             **with_cache(model, cache)).logits[:, -1])
        logits[name] = torch.stack(out)
        if name == "growing":
            assert seen == [6, 7, 8, 9, 10] and cache.layers[0].get_seq_length() == 10
    torch.testing.assert_close(logits["growing"], logits["static"], rtol=1e-5, atol=1e-5)


def test_growing_cache_refuses_positions_past_its_length(tiny_llama):
    from surgery.kvcache import growing_cache

    model = surgery.load(tiny_llama)
    cache = growing_cache(model, 1, 4, "cpu", torch.float32)
    ids = torch.randint(2, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, use_cache=True, **with_cache(model, cache))
    with pytest.raises(ValueError, match="cannot hold position 4"):
        model(input_ids=ids[:, :1], use_cache=True, **with_cache(model, cache))
