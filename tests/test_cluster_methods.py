"""Every clustering method: balanced sizes, a partition of all neurons, shared experts from the most
important neurons, and the conversion invariant with data-aware methods and router init."""

import pytest
import torch

import surgery
from surgery.cluster import METHODS, FFNWeights, balanced_sizes, check_partition, get_method
from surgery.cluster.balanced import balanced_kmeans
from surgery.convert import ConvertConfig, convert, convert_model
from surgery.moe import set_dense_routing
from surgery.profile import ProfileConfig, profile_model

from helpers import make_llama, relative_error


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src = make_llama(tmp_path_factory.mktemp("m") / "dense", ffn=96)
    model = surgery.load(src)
    ids = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(0))
    stats = profile_model(model, ids, ProfileConfig(tokens=512, ctx=64, samples=256), progress=False)
    return src, model, stats


def _ffn(model, layer=0):
    mlp = model.model.layers[layer].mlp
    return FFNWeights(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data)


def test_all_methods_registered():
    assert {"random", "weights", "coactivation"} <= set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("groups,shared", [(8, 0), (6, 2), (7, 0), (5, 3)])
def test_partition_and_balanced_sizes(tiny, method, groups, shared):
    _, model, stats = tiny
    ffn = _ffn(model)
    sizes = balanced_sizes(ffn.width, groups)
    parts = get_method(method)(ffn, sizes, seed=3, stats=stats[0], shared=shared)
    check_partition(parts, sizes, ffn.width)
    assert max(sizes) - min(sizes) <= 1
    again = get_method(method)(ffn, sizes, seed=3, stats=stats[0], shared=shared)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))  # deterministic


@pytest.mark.parametrize("method", ["weights", "coactivation"])
def test_shared_experts_take_the_most_important_neurons(tiny, method):
    _, model, stats = tiny
    ffn = _ffn(model)
    sizes = balanced_sizes(96, 8)
    parts = get_method(method)(ffn, sizes, stats=stats[0], shared=2)
    top = set(torch.argsort(stats[0].importance, descending=True)[:24].tolist())
    assert set(torch.cat(parts[:2]).tolist()) == top


def test_weights_method_without_profile(tiny):
    _, model, _ = tiny
    parts = get_method("weights")(_ffn(model), balanced_sizes(96, 4), stats=None, shared=1)
    check_partition(parts, balanced_sizes(96, 4), 96)


def test_coactivation_needs_a_profile(tiny):
    _, model, _ = tiny
    with pytest.raises(surgery.errors.SurgeryError, match="profil"):
        get_method("coactivation")(_ffn(model), balanced_sizes(96, 4), stats=None)


def test_balanced_kmeans_recovers_clear_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4) * 10
    x = torch.cat([centers[i] + 0.1 * torch.randn(6, 4, generator=g) for i in range(4)])
    perm = torch.randperm(24, generator=g)
    groups = balanced_kmeans(x[perm], [6, 6, 6, 6], seed=1)
    found = sorted(sorted((perm[gr] // 6).tolist()) for gr in groups)
    assert found == [[i] * 6 for i in range(4)]


@pytest.mark.parametrize("method,init", [("weights", "centroid"), ("coactivation", "fitted"), ("weights", "fitted")])
def test_invariant_with_data_methods(tmp_path, tiny, method, init):
    src, dense, stats = tiny
    cfg = ConvertConfig(experts=5, top_k=2, shared_experts=2, method=method, router_init=init, stats=stats)
    convert(src, tmp_path / "moe", cfg, progress=False)
    moe = surgery.load(tmp_path / "moe")
    set_dense_routing(moe, True)
    ids = torch.randint(0, 128, (1, 13))
    with torch.no_grad():
        assert relative_error(moe(input_ids=ids).logits, dense(input_ids=ids).logits) <= 1e-5


def test_fitted_router_beats_centroid_on_profiled_tokens(tiny):
    """The data-fitted router picks experts that reproduce the dense FFN better than the centroid guess."""
    from surgery import losses

    src, _, stats = tiny
    errs = {}
    for init in ("centroid", "fitted"):
        m = convert_model(surgery.load(src), ConvertConfig(experts=8, top_k=2, method="coactivation",
                                                           router_init=init, stats=stats))
        dense = surgery.load(src)
        x = stats[0].inputs.float()
        with torch.no_grad():
            errs[init] = losses.relative_mse(m.model.layers[0].mlp(x), dense.model.layers[0].mlp(x)).item()
    assert errs["fitted"] < errs["centroid"]
