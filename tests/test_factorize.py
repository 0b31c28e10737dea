"""Factorization is a permutation of neurons: exact to the bit, for every partition shape."""

import pytest
import torch

from surgery.cluster import FFNWeights, balanced_sizes, check_partition, get_method
from surgery.factorize import merge_experts, split_ffn
from surgery.moe import MoEBlock
from surgery.router import RoutingConfig


def random_ffn(D=16, F=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FFNWeights(torch.randn(F, D, generator=g), torch.randn(F, D, generator=g), torch.randn(D, F, generator=g))


@pytest.mark.parametrize("width,groups", [(96, 8), (50, 7), (7, 7), (1536, 8)])
def test_balanced_sizes_partition_width(width, groups):
    sizes = balanced_sizes(width, groups)
    assert sum(sizes) == width and len(sizes) == groups
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("shared", [0, 1, 2])
def test_random_partition_is_a_partition_and_seeded(shared):
    ffn = random_ffn()
    sizes = balanced_sizes(ffn.width, 6 + shared)
    method = get_method("random")
    a = method(ffn, sizes, seed=3, shared=shared)
    check_partition(a, sizes, ffn.width)
    b = method(ffn, sizes, seed=3, shared=shared)
    c = method(ffn, sizes, seed=4, shared=shared)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_check_partition_rejects_overlap():
    with pytest.raises(AssertionError):
        check_partition([torch.tensor([0, 1]), torch.tensor([1, 2])], [2, 2], 4)


@pytest.mark.parametrize("shared", [0, 2])
def test_split_then_merge_is_exact(shared):
    ffn = random_ffn(F=50)
    sizes = balanced_sizes(50, 7 + shared)
    groups = get_method("random")(ffn, sizes, seed=1, shared=shared)
    parts = split_ffn(ffn, groups, shared, max(sizes[shared:]))
    perm = torch.cat(groups).tolist()
    sh = (parts["shared_gate"], parts["shared_up"], parts["shared_down"]) if shared else None
    back = merge_experts(parts["gate"], parts["up"], parts["down"], sizes[shared:], sh, perm)
    assert torch.equal(back.gate, ffn.gate) and torch.equal(back.up, ffn.up) and torch.equal(back.down, ffn.down)


@pytest.mark.parametrize("shared", [0, 1])
def test_dense_routing_block_equals_dense_ffn_float64(shared):
    """Unequal experts (50 neurons in 7 groups: zero padding) and a shared expert, against float64 dense."""
    D, F = 16, 50
    ffn = random_ffn(D, F)
    sizes = balanced_sizes(F, 6 + shared)
    groups = get_method("random")(ffn, sizes, seed=2, shared=shared)
    width = max(sizes[shared:])
    parts = split_ffn(ffn, groups, shared, width)
    block = MoEBlock(D, 6, width, sum(sizes[:shared]), RoutingConfig(top_k=2))
    with torch.no_grad():
        block.experts.gate_proj.copy_(parts["gate"]); block.experts.up_proj.copy_(parts["up"])
        block.experts.down_proj.copy_(parts["down"])
        if shared:
            block.shared_expert.gate_proj.weight.copy_(parts["shared_gate"])
            block.shared_expert.up_proj.weight.copy_(parts["shared_up"])
            block.shared_expert.down_proj.weight.copy_(parts["shared_down"])
    block.dense_routing = True
    x = torch.randn(5, 3, D)
    y = block(x)
    x64 = x.double()
    ref = (torch.nn.functional.silu(x64 @ ffn.gate.double().T) * (x64 @ ffn.up.double().T)) @ ffn.down.double().T
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
