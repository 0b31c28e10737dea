"""Neuron clustering: every method turns one FFN into a partition of its intermediate neurons.

A method is a function `(ffn, sizes, seed, stats) -> list[LongTensor]` returning one tensor of neuron
indices per group, with len(groups[i]) == sizes[i] and every neuron in exactly one group. The first
`shared` groups become always-on shared experts; the caller decides how many by the sizes it passes and
methods that care (e.g. picking the most active neurons as shared) receive `shared` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from surgery.errors import SurgeryError


@dataclass
class FFNWeights:
    """One SwiGLU FFN: gate [F, D], up [F, D], down [D, F]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def width(self) -> int:
        return self.gate.shape[0]


Method = Callable[..., list]
METHODS: dict[str, Method] = {}


def register(name: str):
    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SurgeryError(f"--method {name!r}: unknown clustering method (choose from {', '.join(sorted(METHODS))})")
    return METHODS[name]


def balanced_sizes(width: int, groups: int) -> list[int]:
    """Split `width` neurons into `groups` sizes that differ by at most one (larger ones first)."""
    base, extra = divmod(width, groups)
    return [base + (1 if i < extra else 0) for i in range(groups)]


def check_partition(groups: list[torch.Tensor], sizes: list[int], width: int) -> None:
    """A partition must cover every neuron exactly once with the requested sizes."""
    if [len(g) for g in groups] != list(sizes):
        raise AssertionError(f"group sizes {[len(g) for g in groups]} != requested {sizes}")
    flat = torch.cat(groups)
    if flat.numel() != width or not torch.equal(torch.sort(flat).values, torch.arange(width)):
        raise AssertionError("groups are not a partition of the FFN's neurons")


from surgery.cluster import random as _random  # noqa: E402,F401  (registers itself)
from surgery.cluster import weights as _weights  # noqa: E402,F401
from surgery.cluster import coactivation as _coactivation  # noqa: E402,F401
