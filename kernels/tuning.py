"""Autotune plumbing shared by the Triton kernels: shape buckets, and one small fixed config under the
interpreter (TRITON_INTERPRET=1), where benchmarking configs would only make the CPU tests slow.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, N = T*K (token, expert) pairs.
"""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def bucket(n: int, lo: int = 16, hi: int = 8192) -> int:
    """The power of two at or above n, clamped to [lo, hi]: an autotune key that tunes once per bucket of
    sizes instead of once per distinct token count (T changes every decode step and prefill)."""
    b = lo
    while b < min(n, hi):
        b *= 2
    return b


def autotune(gpu_configs: list[triton.Config], interp_config: triton.Config, key: list[str], prune=None):
    """triton.autotune over `gpu_configs` on a GPU; under the interpreter a single fixed config (a single
    config is never benchmarked, so the tests stay fast)."""
    if interpreting():
        return triton.autotune(configs=[interp_config], key=key)
    by = {"early_config_prune": prune} if prune is not None else None
    return triton.autotune(configs=gpu_configs, key=key, prune_configs_by=by)


def prune_block_m(configs, named_args, **kwargs):
    """Drop configs whose BLOCK_M is far larger than the rows an expert typically gets (M_BUCKET): they
    would only compute padding. Always keeps at least one config."""
    m = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 16))
    keep = [c for c in configs if c.kwargs.get("BLOCK_M", 16) <= max(16, 2 * m)]
    return keep or configs[:1]


def cfg(num_warps: int = 4, num_stages: int = 2, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)
