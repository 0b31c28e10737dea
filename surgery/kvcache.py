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
