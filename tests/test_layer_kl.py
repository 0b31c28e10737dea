"""Per-layer budgets from the end-to-end KL (evals/layer_kl.py): the greedy allocation and the KL measure."""

import pytest
import torch

import surgery
from surgery.convert import ConvertConfig, convert_model
from surgery_evals.layer_kl import allocate, mean_kl

from helpers import make_llama


def test_allocation_keeps_the_total_and_follows_the_largest_gains():
    # layer 0 gains a lot from each expert, layer 1 a little, layer 2 nothing past k = 1
    curves = [{1: 1.0, 2: 0.5, 3: 0.2, 4: 0.1}, {1: 0.6, 2: 0.55, 3: 0.5, 4: 0.45}, {1: 0.3, 2: 0.3, 3: 0.3, 4: 0.3}]
    ks = allocate(curves, base_k=2)
    assert sum(ks) == 3 * 2
    # gains in order: layer 0 1->2 (0.5), 2->3 (0.3), then 3->4 (0.1) beats layer 1's 1->2 (0.05)
    assert ks == [4, 1, 1]
    assert min(allocate(curves, base_k=2, floor=2)) == 2 and allocate(curves, 2, floor=2) == [2, 2, 2]


def test_allocation_refuses_a_total_the_candidates_cannot_hold():
    with pytest.raises(ValueError, match="too few"):
        allocate([{1: 1.0, 2: 0.5}, {1: 1.0, 2: 0.5}], base_k=3)


def test_mean_kl_is_zero_against_itself_and_positive_for_a_converted_model(tmp_path):
    path = make_llama(tmp_path / "dense", ffn=96, layers=2)
    teacher = surgery.load(path)
    wins = torch.randint(0, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_logp = [torch.log_softmax(teacher(input_ids=w[None], use_cache=False).logits[0].float(), -1) for w in wins]
    assert mean_kl(teacher, wins, t_logp) == pytest.approx(0.0, abs=1e-6)
    student = convert_model(surgery.load(path), ConvertConfig(experts=8, top_k=1, seed=1))
    kl = mean_kl(student, wins, t_logp)
    assert kl > 0  # a random tiny model's distributions are nearly flat: the KL is small, but not zero
    # by hand for the first window: the mean over its tokens of sum_v p_t (log p_t - log p_s)
    with torch.no_grad():
        s0 = torch.log_softmax(student(input_ids=wins[0][None], use_cache=False).logits[0].float(), -1)
        s1 = torch.log_softmax(student(input_ids=wins[1][None], use_cache=False).logits[0].float(), -1)
    by_hand = torch.cat([(t_logp[0].exp() * (t_logp[0] - s0)).sum(-1), (t_logp[1].exp() * (t_logp[1] - s1)).sum(-1)])
    assert kl == pytest.approx(by_hand.mean().item(), rel=1e-4)
