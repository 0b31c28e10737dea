"""The CPU inference path (kernels/cpu_moe.py) against the PyTorch reference (kernels/reference.py).

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, S shared width.
Inputs are random with O(1) outputs; both sides compute in float32 and differ only in summation order, so
the tolerance is atol = rtol = 1e-5 (observed differences are ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

from surgery_kernels import cpu_moe, ops, reference

TOL = dict(atol=1e-5, rtol=1e-5)


def make(E, F, D, S, widths=None, seed=0):
    """Stacked experts; `widths` (one per expert) zero-pads expert e beyond widths[e] neurons, as converted
    models with unequal expert widths are stored."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, F, D, generator=g) * D ** -0.5
    up = torch.randn(E, F, D, generator=g) * D ** -0.5
    down = torch.randn(E, D, F, generator=g) * F ** -0.5
    for e, w in enumerate(widths or ()):
        gate[e, w:] = 0
        up[e, w:] = 0
        down[e, :, w:] = 0
    shared = None
    if S:
        shared = (torch.randn(S, D, generator=g) * D ** -0.5, torch.randn(S, D, generator=g) * D ** -0.5,
                  torch.randn(D, S, generator=g) * S ** -0.5)
    return gate, up, down, shared


def routing(T, E, K, seed=1, idle_expert=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if idle_expert and K < E:
        logits[:, 0] = -1e4  # an expert no token selects
    return reference.route(logits, K)


CASES = [
    # T, E, F, D, S, K, widths
    (1, 48, 24, 96, 64, 16, None),          # the demo 50% model's routing shape, one token (decode)
    (8, 48, 24, 96, 64, 16, None),
    (64, 56, 24, 96, 32, 8, None),          # the 25% model's shape
    (300, 8, 20, 64, 0, 2, [20, 19, 20, 13, 20, 20, 7, 20]),  # unequal widths, zero-padded; no shared expert
    (37, 9, 16, 48, 40, 3, [16, 16, 15, 15, 16, 16, 15, 16, 15]),
    (5, 4, 8, 32, 0, 4, None),              # K == E: every expert on
    (1, 10, 24, 96, 64, 2, None),           # one token, few experts (the 50% recipe's E10 K2): rows in place
    (1, 13, 24, 96, 0, 1, [24] * 12 + [9]),  # the same without a shared expert, top-1, unequal widths
]


@pytest.mark.parametrize("T,E,F,D,S,K,widths", CASES)
@pytest.mark.parametrize("path", cpu_moe.PATHS)
def test_paths_equal_the_reference(T, E, F, D, S, K, widths, path):
    gate, up, down, shared = make(E, F, D, S, widths)
    w, ids = routing(T, E, K)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    ref = reference.moe_ffn(x, gate, up, down, w, ids, shared)
    out = cpu_moe.moe_ffn(x, gate, up, down, w, ids, shared, path=path)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL)


def test_spans_join_narrow_gaps_and_cut_long_runs(monkeypatch):
    monkeypatch.setattr(cpu_moe, "MAX_ROWS", 1024)
    monkeypatch.setattr(cpu_moe, "MIN_GAP_ROWS", 192)
    # experts of 192 gate/up rows: any unused expert is a gap worth skipping; runs of at most 5 experts
    assert cpu_moe.spans([True] * 10, 192) == [(0, 5), (5, 10)]
    assert cpu_moe.spans([1, 1, 0, 1, 1, 1, 0, 0, 1, 1], 192) == [(0, 2), (3, 6), (8, 10)]
    assert cpu_moe.spans([0, 0, 1], 192) == [(2, 3)]
    assert cpu_moe.spans([0, 0, 0], 192) == []
    # experts of 48 rows: gaps of fewer than 4 experts are read through, never a trailing or leading one
    assert cpu_moe.spans([0, 1, 0, 1, 0, 0, 1, 0], 48) == [(1, 7)]
    assert cpu_moe.spans([1, 0, 0, 0, 0, 1], 48) == [(0, 1), (5, 6)]
    # 48 experts of 48 rows: 2,304 rows in 3 near-equal pieces of at most 1,024
    assert cpu_moe.spans([True] * 48, 48) == [(0, 16), (16, 32), (32, 48)]
    # every used expert is covered exactly once
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        used = (torch.rand(20, generator=g) < 0.6).tolist()
        cover = [e for a, b in cpu_moe.spans(used, 64) for e in range(a, b)]
        assert len(cover) == len(set(cover)) and {e for e, u in enumerate(used) if u} <= set(cover)


@pytest.mark.parametrize("max_rows,min_gap", [(64, 1), (100000, 100000), (16, 40)])
def test_masked_path_with_gaps_and_pieces_equals_the_reference(monkeypatch, max_rows, min_gap):
    """The masked path cut into pieces of a few experts and skipping every gap, or in one piece reading
    through every gap: the same function."""
    monkeypatch.setattr(cpu_moe, "MAX_ROWS", max_rows)
    monkeypatch.setattr(cpu_moe, "MIN_GAP_ROWS", min_gap)
    gate, up, down, shared = make(12, 8, 32, 40)
    for T, K in ((3, 2), (9, 1), (16, 3)):
        w, ids = routing(T, 12, K, seed=T)
        x = torch.randn(T, 32, generator=torch.Generator().manual_seed(T))
        torch.testing.assert_close(cpu_moe.moe_ffn(x, gate, up, down, w, ids, shared, path="masked"),
                                   reference.moe_ffn(x, gate, up, down, w, ids, shared), **TOL)


def test_auto_goes_from_gather_to_grouped_as_tokens_grow():
    order = ["gather", "masked", "sorted", "grouped"]
    for E, K, F in ((48, 16, 24), (56, 8, 24), (8, 2, 20), (10, 2, 96), (13, 1, 96), (40, 8, 24)):
        assert cpu_moe.choose_path(1, E, K, F) == "gather"
        assert cpu_moe.choose_path(8192, E, K, F) == "grouped"
        # Monotone in T: a path once left is not taken again.
        paths = [order.index(cpu_moe.choose_path(T, E, K, F)) for T in range(1, 8193)]
        assert paths == sorted(paths)
    # Every expert selected by every token (E1 K1: the dense FFN of a heads-only conversion): the masked path,
    # a dense FFN's work, at any T (grouped would gather and scatter every token for nothing).
    assert {cpu_moe.choose_path(T, E, E, 24) for T in (1, 8, 4096) for E in (1, 4)} == {"masked"}


def test_grouped_starts_earlier_for_wider_experts():
    """Per-expert products pay once they are large: by rows of hidden units per expert (T * K / E * F), so
    96-wide experts go grouped at a 512-token prefill and 24-wide ones (four times the calls) later."""
    assert cpu_moe.choose_path(512, 10, 2, 96) == "grouped"
    assert cpu_moe.choose_path(512, 40, 8, 24) == "sorted"
    assert cpu_moe.choose_path(4096, 40, 8, 24) == "grouped"
    assert cpu_moe.choose_path(64, 10, 2, 96) == "sorted"
    for E, K, F in ((10, 2, 96), (40, 8, 24), (13, 1, 96)):
        first = next(T for T in range(2, 8193) if cpu_moe.choose_path(T, E, K, F) == "grouped")
        assert first * K / E * F >= cpu_moe.GROUPED_MIN_ROWS > (first - 1) * K / E * F


def test_packing_is_reused_and_follows_in_place_changes():
    gate, up, down, shared = make(6, 8, 32, 16)
    w, ids = routing(10, 6, 2)
    x = torch.randn(10, 32)
    first = cpu_moe.pack(gate, up, down, shared)
    assert cpu_moe.pack(gate, up, down, shared) is first
    with torch.no_grad():
        down.mul_(2)
        shared[2].mul_(2)  # the output doubles: every term ends in a down projection
    assert cpu_moe.pack(gate, up, down, shared) is not first
    ref = reference.moe_ffn(x, gate, up, down, w, ids, shared)
    torch.testing.assert_close(cpu_moe.moe_ffn(x, gate, up, down, w, ids, shared), ref, **TOL)


def test_bad_path_is_refused():
    gate, up, down, _ = make(4, 8, 16, 0)
    w, ids = routing(3, 4, 2)
    with pytest.raises(ValueError, match="path must be one of"):
        cpu_moe.moe_ffn(torch.randn(3, 16), gate, up, down, w, ids, path="fast")


def test_ops_auto_takes_the_cpu_path_only_without_gradients(monkeypatch):
    gate, up, down, shared = make(8, 8, 32, 16)
    w, ids = routing(12, 8, 2)
    x = torch.randn(12, 32)
    calls = []
    real = cpu_moe.moe_ffn
    monkeypatch.setattr(cpu_moe, "moe_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ops.moe_ffn(x, gate, up, down, w, ids, shared)
    assert calls == [1]
    gate.requires_grad_(True)
    y = ops.moe_ffn(x, gate, up, down, w, ids, shared)  # autograd on: the differentiable reference
    assert calls == [1] and y.requires_grad
    y.sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_converted_model_logits_match_the_reference_path(tiny_llama, tmp_path):
    import surgery
    from surgery.convert import ConvertConfig, convert
    from surgery.moe import set_impl

    convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=4, top_k=2, shared_experts=1), progress=False)
    model = surgery.load(tmp_path / "moe")
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    calls = []
    real = cpu_moe.moe_block
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_moe, "moe_block", lambda *a, **k: calls.append(1) or real(*a, **k))
        with torch.no_grad():
            fast = model(input_ids=ids).logits
            fast_one = model(input_ids=ids[:1, :1]).logits  # one token: the gather path
        blocks = [m for m in model.modules() if hasattr(m, "last_router_logits")]
        assert len(calls) == 2 * len(blocks)  # every block took the one-call inference path, twice
        assert all(b.last_router_logits is not None for b in blocks)  # kept for expert_load and the losses
        model(input_ids=ids[:1, :4])  # autograd on: the differentiable path, not the inference one
        assert len(calls) == 2 * len(blocks)
    with torch.no_grad():
        set_impl(model, "reference")
        ref = model(input_ids=ids).logits
        ref_one = model(input_ids=ids[:1, :1]).logits
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast_one, ref_one, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("score_func,renormalize,scale", [("softmax", True, 1.0), ("softmax", True, 16.0),
                                                          ("softmax", False, 2.0), ("sigmoid", True, 1.0)])
def test_route_equals_the_reference(score_func, renormalize, scale):
    logits = torch.randn(200, 48, generator=torch.Generator().manual_seed(3)) * 3
    w, ids = cpu_moe.route(logits, 16, score_func, renormalize, scale)
    rw, rids = reference.route(logits, 16, score_func, renormalize, scale)
    assert torch.equal(ids, rids)  # same experts, same order (largest first)
    torch.testing.assert_close(w, rw, atol=1e-6 * scale, rtol=1e-5)


def test_compiled_on_cpu_one_graph_equal_to_eager():
    """Under torch.compile on CPU the MoE FFN is the masked function: no graph break (the CPU path's packing
    and host syncs would split the graph), and the compiled output equals the eager CPU path's (1e-5)."""
    import torch._dynamo

    gate, up, down, shared = make(6, 16, 32, 24)

    def ffn(x, w, ids):
        return ops.moe_ffn(x, gate, up, down, w, ids, shared)

    for T in (8, 1):  # the masked function; one token: its experts gathered
        w, ids = routing(T, 6, 2)
        x = torch.randn(T, 32, generator=torch.Generator().manual_seed(3))
        torch._dynamo.reset()
        with torch.no_grad():
            eager = ffn(x, w, ids)
            explained = torch._dynamo.explain(ffn)(x, w, ids)
            compiled = torch.compile(ffn, backend="eager")(x, w, ids)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch.testing.assert_close(compiled, eager, **TOL)
        torch.testing.assert_close(compiled, reference.moe_ffn(x, gate, up, down, w, ids, shared), **TOL)
    # the one-token function on its own, with routing weights not summing to one and an expert repeated nowhere
    w, ids = routing(1, 6, 3)
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(reference.moe_ffn_one_token(x, gate, up, down, w * 0.7, ids, None),
                               reference.moe_ffn(x, gate, up, down, w * 0.7, ids, None), **TOL)
