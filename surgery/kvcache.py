"""The KV-cache argument of a transformers model's forward, across transformers versions.

transformers up to 5.22 takes and returns the cache as `past_key_values`; 5.23 renamed it `cache` (in and
out) and keeps the old keyword only as a deprecated alias, to be removed in 5.40. Our own decode and
sampling loops go through these two helpers, so they pass whichever name the installed version declares
and never rely on the alias.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _name_for(forward_fn) -> str:
    params = inspect.signature(forward_fn).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{getattr(forward_fn, '__qualname__', forward_fn)}: takes neither 'cache' nor "
                    "'past_key_values'; not a transformers decoder")


def cache_keyword(model) -> str:
    """'cache' or 'past_key_values': the keyword `model.forward` declares for its KV cache."""
    forward = type(model).forward  # the class's function: hashable and shared by every instance
    return _name_for(forward)


def with_cache(model, cache) -> dict:
    """Keyword arguments that hand `cache` (None for a fresh one) to `model(...)`."""
    return {cache_keyword(model): cache}


def returned_cache(output):
    """The cache a forward pass returned (`output.cache` on new transformers, `past_key_values` on old)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def static_cache(model, batch: int, length: int, device, dtype):
    """transformers' StaticCache of `length` positions: 5.x sizes itself lazily; 4.x wants batch, device and
    dtype up front."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except TypeError:
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length, device=device, dtype=dtype)


def growing_cache(model, batch: int, length: int, device, dtype):
    """A KV cache allocated once for `length` positions, like StaticCache (no per-step concatenation), whose
    attention reads only the positions written so far: a StaticCache hands every decode step all `length`
    positions, masked, so a step near the start of a 256-token answer paid for the whole answer (attention was
    43% of the sampler's time at batch 128, bf16, on the 2-core Xeon). transformers releases without cache
    layers (4.x) get a StaticCache."""
    try:
        from transformers.cache_utils import Cache, DynamicLayer
    except ImportError:
        return static_cache(model, batch, length, device, dtype)
    layer_cls = _growing_layer_class(DynamicLayer)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    try:
        return Cache(layers=[layer_cls(length) for _ in range(n_layers)])
    except TypeError:
        return static_cache(model, batch, length, device, dtype)


@functools.lru_cache(maxsize=None)
def _growing_layer_class(base):
    class GrowingLayer(base):
        """One layer's keys and values in a preallocated [batch, heads, length, dim] buffer; update() writes the
        new positions in place and returns views of the filled part, and the mask is sized to it (a dynamic
        layer's mask: filled + new positions)."""

        def __init__(self, max_cache_len: int):
            super().__init__()
            self.max_cache_len = max_cache_len
            self.filled = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            b, h, _, _ = key_states.shape
            self.device = key_states.device
            self.keys = key_states.new_zeros(b, h, self.max_cache_len, key_states.shape[-1])
            self.values = value_states.new_zeros(b, h, self.max_cache_len, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self.filled, self.filled + key_states.shape[-2]
            if end > self.max_cache_len:
                raise ValueError(f"KV cache of {self.max_cache_len} positions: cannot hold position {end - 1}")
            self.keys[:, :, start:end] = key_states
            self.values[:, :, start:end] = value_states
            self.filled = end
            return self.keys[:, :, :end], self.values[:, :, :end]

        def get_seq_length(self, *args) -> int:
            return self.filled

        def get_max_length(self) -> int:
            return self.max_cache_len

        def reset(self) -> None:
            self.filled = 0

        def crop(self, max_length: int) -> None:
            self.filled = max_length if max_length >= 0 else max(0, self.filled + max_length)

    return GrowingLayer
