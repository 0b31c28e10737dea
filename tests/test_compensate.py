"""Closed-form refit of the down-projections under the routing mask (surgery/compensate.py), on a hand-made
MoE block: it is the weighted least-squares solution, it minimises losses.block_error, and it touches nothing
but the down-projections."""

import torch

from surgery import losses
from surgery.calibrate import LayerwiseConfig, calibrate_block
from surgery.compensate import _down_matrix, _features, refit_down, token_weights
from surgery.moe import MoEBlock
from surgery.router import RoutingConfig


def _block(E=6, F=5, D=8, S=4, K=2, seed=0):
    torch.manual_seed(seed)
    b = MoEBlock(D, E, F, S, RoutingConfig(K, scale=float(K)))
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.5)
    return b


def test_token_weights_reproduce_block_error():
    torch.manual_seed(1)
    t, y = torch.randn(50, 8) * torch.rand(50, 1) * 5, torch.randn(50, 8)
    a = token_weights(t)
    weighted = (a * (y - t).pow(2).sum(-1)).mean()
    assert torch.allclose(weighted, losses.block_error(y, t), rtol=1e-5)


def test_refit_is_weighted_least_squares():
    b = _block()
    x = torch.randn(300, 8)
    target = torch.randn(300, 8)
    z = _features(b, x).double()
    a = token_weights(target).double()
    # reference: lstsq on the sqrt(a)-scaled system, the minimiser of sum_n a_n ||W z_n - t_n||^2
    ref = torch.linalg.lstsq(z * a.sqrt()[:, None], target.double() * a.sqrt()[:, None]).solution.T
    refit_down(b, x, target, damp=1e-10)
    assert torch.allclose(_down_matrix(b).double(), ref, atol=1e-4, rtol=1e-4)


def test_refit_recovers_down_projections_that_produce_the_target():
    b, truth = _block(seed=2), _block(seed=3)
    with torch.no_grad():  # same gates, ups and router: only the down-projections differ
        for name in ("experts.gate_proj", "experts.up_proj", "router.weight", "shared_expert.gate_proj.weight",
                     "shared_expert.up_proj.weight"):
            b.get_parameter(name).copy_(truth.get_parameter(name))
    x = torch.randn(400, 8)
    with torch.no_grad():
        target = truth(x)
    r = refit_down(b, x, target, damp=1e-9)
    assert r["refit_after"] < 1e-6 < r["refit_before"]
    assert torch.allclose(b.experts.down_proj, truth.experts.down_proj, atol=1e-3)
    assert torch.allclose(b.shared_expert.down_proj.weight, truth.shared_expert.down_proj.weight, atol=1e-3)


def test_refit_lowers_error_and_changes_only_down_projections():
    b = _block(seed=4)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    x, target = torch.randn(200, 8), torch.randn(200, 8)
    r = refit_down(b, x, target, damp=1e-2)
    assert r["refit_after"] < r["refit_before"]
    with torch.no_grad():
        assert abs(losses.block_error(b(x), target).item() - r["refit_after"]) < 1e-5
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]) == ("down_proj" not in k), k


def test_larger_damp_stays_closer_to_the_current_weights():
    x, target = torch.randn(200, 8), torch.randn(200, 8)
    w0 = _down_matrix(_block(seed=5))
    moved = []
    for damp in (1e-4, 1.0):
        b = _block(seed=5)
        refit_down(b, x, target, damp=damp)
        moved.append((_down_matrix(b) - w0).norm().item())
    assert moved[1] < moved[0]


def test_layerwise_with_refit_ends_lower():
    x = torch.randn(512, 8)
    truth = _block(seed=6)
    with torch.no_grad():
        target = truth(x) + 0.1 * torch.randn(512, 8)
    errs = {}
    for refit in (False, True):
        b = _block(seed=7)
        cfg = LayerwiseConfig(router_steps=20, expert_epochs=0, refit_down=refit)
        errs[refit] = calibrate_block(b, x, target, cfg)["after"]
    assert errs[True] < 0.8 * errs[False]
