"""Calibration losses on hand-made inputs with known values."""

import math

import pytest
import torch

from surgery import losses


def test_load_balance_zero_when_balanced_and_log_e_when_collapsed():
    balanced = torch.zeros(4, 4)  # uniform per token => uniform marginal
    assert abs(losses.load_balance(balanced).item()) < 1e-6
    collapsed = torch.tensor([[50.0, 0, 0, 0]] * 3)  # every token on expert 0
    assert abs(losses.load_balance(collapsed).item() - math.log(4)) < 1e-4
    # sharp per token but spread over experts: still balanced
    spread = torch.eye(4) * 50
    assert abs(losses.load_balance(spread).item()) < 1e-4


def test_load_concentration():
    assert abs(losses.load_concentration(torch.zeros(3, 8)).item() - 1.0) < 1e-6  # uniform: max entropy
    assert losses.load_concentration(torch.eye(8) * 60).item() < 1e-6  # one-hot tokens
    two = torch.tensor([[0.0, 0.0, -1e4, -1e4]])  # half/half over 2 of 4 experts: entropy log 2 / log 4
    assert abs(losses.load_concentration(two).item() - 0.5) < 1e-5


def test_switch_balance_is_one_when_balanced():
    logits = torch.zeros(4, 4)
    ids = torch.tensor([[0], [1], [2], [3]])
    assert abs(losses.switch_balance(logits, ids).item() - 1.0) < 1e-6
    ids = torch.zeros(4, 1, dtype=torch.long)
    peaked = torch.tensor([[10.0, 0, 0, 0]] * 4)
    assert losses.switch_balance(peaked, ids).item() > 3.9


def test_prior_approx_and_topk_prior():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    prior = losses.topk_prior(scores, 2)
    assert torch.equal(prior, torch.tensor([[0.5, 0.0, 0.5, 0.0]]))
    uniform = losses.prior_approx(torch.zeros(1, 4), prior).item()
    assert abs(uniform - math.log(4)) < 1e-6
    matched = losses.prior_approx(torch.tensor([[0.0, -1e4, 0.0, -1e4]]), prior).item()
    assert abs(matched - math.log(2)) < 1e-5  # the prior's own entropy: the minimum


def test_oracle_prior_is_the_mean_prior_approx_over_blocks():
    # block 1: a flat router against the top-2 {0, 2}: log 4; block 2: a router on exactly its top-2 {0, 2}: log 2
    logits = [torch.zeros(1, 4), torch.tensor([[0.0, -1e4, 0.0, -1e4]])]
    scores = [torch.tensor([[3.0, 1.0, 2.0, 0.0]]), torch.tensor([[5.0, 0.0, 4.0, 0.0]])]
    assert abs(losses.oracle_prior(logits, scores, [2, 2]).item() - (math.log(4) + math.log(2)) / 2) < 1e-5
    # top-1 of the second block is expert 0 alone: a router splitting 0 and 2 evenly pays log 2 there
    assert abs(losses.oracle_prior(logits[1:], scores[1:], [1]).item() - math.log(2)) < 1e-5
    with pytest.raises(ValueError, match="oracle_prior"):
        losses.oracle_prior(logits, scores[:1], [2, 2])


def test_relative_mse():
    t = torch.tensor([[3.0, 4.0]])
    assert losses.relative_mse(t, t).item() == 0.0
    assert abs(losses.relative_mse(torch.zeros(1, 2), t).item() - 1.0) < 1e-7
    assert abs(losses.relative_mse(t * 0.5, t).item() - 0.25) < 1e-7


def test_block_error_weighs_every_token():
    # one "massive activation" token (norm 100) and one ordinary token (norm 1), the ordinary one zeroed
    t = torch.tensor([[100.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[100.0, 0.0], [0.0, 0.0]])
    pooled = losses.relative_mse(y, t).item()
    assert abs(pooled - 1 / 10001) < 1e-9  # the pooled error hardly sees it
    assert abs(losses.token_relative_mse(y, t).item() - 0.5) < 1e-7  # the per-token error does
    assert abs(losses.block_error(y, t).item() - (0.5 + 1 / 10001)) < 1e-6


def test_kd():
    a = torch.tensor([[[1.0, 2.0, 3.0]]])
    assert abs(losses.kd(a, a).item()) < 1e-7
    t = torch.tensor([[[0.0, 0.0]]])  # teacher uniform
    s = torch.tensor([[[math.log(3.0), 0.0]]])  # student 3/4, 1/4
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert abs(losses.kd(s, t).item() - want) < 1e-6
    assert abs(losses.kd(s * 2, t, temperature=2.0).item() - 4 * want) < 1e-5


def test_router_aux_weights():
    lg = [torch.tensor([[50.0, 0, 0, 0]] * 2)]
    assert losses.router_aux(lg).item() == 0.0
    assert abs(losses.router_aux(lg, balance=2.0).item() - 2 * math.log(4)) < 1e-4


def test_hidden_distill_is_mean_block_error_over_layers():
    g = torch.Generator().manual_seed(3)
    teacher = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    student = [t + 0.1 * (i + 1) * torch.randn(2, 5, 8, generator=g) for i, t in enumerate(teacher)]
    assert losses.hidden_distill(teacher, teacher).item() == 0.0
    want = sum(losses.block_error(s.reshape(-1, 8), t.reshape(-1, 8)) for s, t in zip(student, teacher)) / 3
    assert torch.allclose(losses.hidden_distill(student, teacher), want, rtol=1e-6)
    with pytest.raises(ValueError, match="2 student vs 3 teacher"):
        losses.hidden_distill(student[:2], teacher)


def _kd_case(seed: int, N: int, unlabelled_every: int, D: int = 16, V: int = 300):
    """Random lm_heads [V, D] for student and teacher, teacher hidden states, labels with every
    `unlabelled_every`-th row ignored, and two equal leaf copies of the student's hidden states."""
    g = torch.Generator().manual_seed(seed)
    w_s, w_t = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    h_t = torch.randn(N, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::unlabelled_every] = -100
    h1 = torch.randn(N, D, generator=g).requires_grad_(True)
    return w_s, w_t, h_t, labels, h1, h1.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("temperature,chunk", [(1.0, 7), (2.0, 64)])
def test_kd_from_hidden_equals_kd_of_logits(temperature, chunk):
    """The chunked KD (final hidden states x frozen lm_heads) is `kd` of the two models' logits: same value
    and same gradient for the student's hidden states (float32, 1e-5), its ce the cross-entropy of the raw
    logits over the labelled rows; student and teacher heads may differ; chunks need not divide N."""
    w_s, w_t, h_t, labels, h1, h2 = _kd_case(seed=0, N=50, unlabelled_every=5)
    want = losses.kd(h1 @ w_s.T, h_t @ w_t.T, temperature)
    (want * 3).backward()
    got, ce = losses.kd_from_hidden(h2, h_t, w_s, w_t, labels, temperature, chunk=chunk)
    (got * 3).backward()
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, want.item())
    assert torch.allclose(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    keep = labels >= 0
    ce_want = torch.nn.functional.cross_entropy((h1 @ w_s.T)[keep], labels[keep])
    assert abs(ce.item() - ce_want.item()) < 1e-5
    assert not ce.requires_grad


@pytest.mark.parametrize("temperature,chunk", [(1.0, 7), (2.0, 64)])
def test_kd_from_hidden_with_ce_grad_differentiates_both(temperature, chunk):
    """ce_grad: kd + w * ce has the gradient autograd gives the logits path (float32, 1e-5); kd unchanged."""
    w_s, w_t, h_t, labels, h1, h2 = _kd_case(seed=1, N=40, unlabelled_every=4)
    keep = labels >= 0
    kd_want = losses.kd(h1 @ w_s.T, h_t @ w_t.T, temperature)
    ce_want = torch.nn.functional.cross_entropy((h1 @ w_s.T)[keep], labels[keep])
    (kd_want + 0.7 * ce_want).backward()
    kd, ce = losses.kd_from_hidden(h2, h_t, w_s, w_t, labels, temperature, chunk=chunk, ce_grad=True)
    assert ce.requires_grad
    (kd + 0.7 * ce).backward()
    assert abs(kd.item() - kd_want.item()) < 1e-5 * max(1.0, kd_want.item())
    assert abs(ce.item() - ce_want.item()) < 1e-5 * max(1.0, ce_want.item())
    assert torch.allclose(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    assert h1.grad[~keep].abs().sum() > 0  # unlabelled rows still carry the KD gradient


def test_kd_from_hidden_refuses_a_trained_head():
    w = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        losses.kd_from_hidden(torch.randn(3, 4), torch.randn(3, 4), w, w.detach(), torch.zeros(3, dtype=torch.long))
