"""The second quality round's methods: the masked CPU path, the transition schedule, multi-epoch windows,
bf16 autocast selection, snapshots, and the baselines (oracle, gate-decided sparsity, static pruning)."""

import math

import pytest
import torch
import torch.nn.functional as Fn

import surgery
from surgery import losses
from surgery import calibrate as calibrate_mod
from surgery import compiled
from surgery.calibrate import EndToEndConfig, _epoch_order, _routing_at, run_end_to_end
from surgery.convert import ConvertConfig, convert_model
from surgery.errors import SurgeryError
from surgery.moe import moe_blocks, set_impl
from surgery.precision import autocast_on, fast_bf16, precision_plan
from surgery.router import RoutingConfig, expert_output_sq_norms
from surgery_evals.baselines import apply_baseline, static_keep
from surgery_kernels import reference

from helpers import make_llama, relative_error, run_compiled_in_fresh_process


def _experts(E=6, F=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(E, F, D, generator=g) * 0.3, torch.randn(E, F, D, generator=g) * 0.3
    down = torch.randn(E, D, F, generator=g) * 0.3
    down[1, :, 3:] = 0  # a narrower, zero-padded expert
    gate[1, 3:] = 0
    up[1, 3:] = 0
    return gate, up, down


@pytest.mark.parametrize("path", ["masked", "sorted"])
@pytest.mark.parametrize("K,score_func,shared", [(1, "softmax", False), (3, "softmax", True), (2, "sigmoid", True)])
def test_training_paths_equal_grouped_reference(path, K, score_func, shared):
    """The masked and sorted calibration paths: same output and same gradients (routing logits, every weight,
    the input) as the grouped reference, including an expert no token picks (6 experts, 40 tokens, K = 1)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g)
    logits = torch.randn(40, 6, generator=g)
    logits[:, 5] -= 50  # expert 5 is never selected: the sorted path skips its empty slice
    sh = tuple(torch.randn(*s, generator=g) * 0.3 for s in ((7, 16), (7, 16), (16, 7))) if shared else None
    fn = {"masked": reference.moe_ffn_masked, "sorted": reference.moe_ffn_sorted}[path]
    outs, grads = [], []
    for f in (reference.moe_ffn, fn):
        ws = [t.clone().requires_grad_() for t in (*_experts(), x, logits)]
        w, ids = reference.route(ws[4], K, score_func, True, float(K))
        y = f(ws[3], *ws[:3], w, ids, sh)
        outs.append(y)
        grads.append(torch.autograd.grad(y.pow(2).sum(), ws))
    assert relative_error(outs[1], outs[0]) < 1e-5
    for name, a, b in zip(("gate", "up", "down", "x"), grads[1], grads[0]):
        assert relative_error(a, b) < 1e-5, name
    # K=1 renormalised: the weight is constant, both logit gradients are ~0 (absolute bound then)
    assert (grads[1][4] - grads[0][4]).abs().max() <= 1e-4 * max(1.0, grads[0][4].abs().max().item())


def test_sorted_path_keeps_routed_experts_float32_under_cpu_autocast():
    """Under CPU bf16 autocast the sorted path's routed experts run in float32 (their matmul shapes change every
    step): without a shared expert the output and gradients equal the float32 run's; the shared expert follows
    autocast (bf16 tolerance)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g)
    w, ids = reference.route(torch.randn(40, 6, generator=g), 2, "softmax", True, 2.0)
    sh = tuple(torch.randn(*s, generator=g) * 0.3 for s in ((7, 16), (7, 16), (16, 7)))
    for shared, tol in ((None, 1e-6), (sh, 2e-2)):
        res = []
        for ac in (False, True):
            ws = [t.clone().requires_grad_() for t in (*_experts(), x)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
                y = reference.moe_ffn_sorted(ws[3], *ws[:3], w, ids, shared)
            res.append((y, torch.autograd.grad(y.float().pow(2).sum(), ws)))
        if shared is None:
            assert res[1][0].dtype == torch.float32
        assert relative_error(res[1][0].float(), res[0][0]) < tol
        for a, b in zip(res[1][1], res[0][1]):
            assert relative_error(a, b) < tol


def test_transition_schedule_starts_at_k_start_and_ends_at_top_k():
    base = RoutingConfig(top_k=2, scale=2.0)
    cfg = EndToEndConfig(k_start=8, transition=0.5)
    sched = [_routing_at(s, 100, cfg, base, 8) for s in range(100)]
    ks, mixes = [r for r, _ in sched], [m for _, m in sched]
    assert ks[0].top_k == 8 and mixes[0] == 1.0  # every expert, unit weights: the dense model
    assert all(a.top_k >= b.top_k for a, b in zip(ks, ks[1:]))  # never rises
    assert all(a >= b for a, b in zip(mixes, mixes[1:]))
    assert all(r.top_k == 2 and r.scale == 2.0 for r in ks[50:])  # target k from the end of the transition
    assert all(m == 0.0 for m in mixes[50:])
    assert _routing_at(0, 100, EndToEndConfig(), base, 8) == (base, 0.0)  # off by default
    # k_start above the number of experts is clamped
    assert _routing_at(0, 100, EndToEndConfig(k_start=99, transition=0.2), base, 4)[0].top_k == 4


def test_transition_start_is_the_dense_model(tmp_path):
    src = make_llama(tmp_path / "dense", ffn=96, layers=2)
    dense = surgery.load(src)
    model = convert_model(surgery.load(src), ConvertConfig(experts=6, top_k=2, seed=1, shared_experts=2))
    ids = torch.randint(1, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    for b in moe_blocks(model):
        b.routing, b.unit_mix = _routing_at(0, 10, EndToEndConfig(k_start=6, transition=0.5), b.routing, 6)
    with torch.no_grad():
        assert relative_error(model(input_ids=ids).logits, dense(input_ids=ids).logits) < 1e-5


def test_epoch_order_repeats_the_data_evenly():
    order = _epoch_order(5, steps=6, batch_size=2, g=torch.Generator().manual_seed(0))
    assert order.numel() == 12
    assert torch.equal(torch.sort(order[:5]).values, torch.arange(5))  # a full pass before any repeat
    assert torch.equal(torch.sort(order[5:10]).values, torch.arange(5))


def test_autocast_setting():
    assert autocast_on("off", torch.device("cpu")) is False
    assert autocast_on("on", torch.device("cpu")) is True
    assert autocast_on("auto", torch.device("cpu")) == fast_bf16(torch.device("cpu"))
    with pytest.raises(SurgeryError, match="autocast"):
        autocast_on("maybe", torch.device("cpu"))


@pytest.fixture
def tiny(tmp_path):
    return make_llama(tmp_path / "dense", ffn=96, layers=2)


def test_e2e_precision_plan():
    cpu = torch.device("cpu")
    off = precision_plan("off", cpu)
    assert (off.student_autocast, off.teacher_autocast, off.teacher_dtype, off.head_dtype) == \
        (False, False, None, torch.float32)
    on = precision_plan("on", cpu)  # "on" is autocast for both models, as before
    assert on.student_autocast and on.teacher_autocast and on.head_dtype == torch.bfloat16
    auto = precision_plan("auto", cpu)
    if fast_bf16(cpu):  # a bf16 teacher copy and lm_head, the student under autocast, layer-wise float32
        assert (auto.student_autocast, auto.teacher_autocast, auto.teacher_dtype, auto.head_dtype,
                auto.layerwise_autocast) == (True, False, torch.bfloat16, torch.bfloat16, False)
    else:
        assert auto == off
    assert not off.layerwise_autocast and on.layerwise_autocast
    assert precision_plan("auto", cpu, sharded=True) == off  # CPU torchrun: float32 under auto
    assert precision_plan("on", cpu, sharded=True) == on
    gpu = precision_plan("auto", torch.device("cuda"))
    assert gpu.student_autocast and gpu.layerwise_autocast


def test_e2e_chunked_kd_trains_like_the_logits_path(tiny, monkeypatch):
    """The single-process e2e stage computes its KD from final hidden states in row chunks; the logits path
    (chunked_kd false; torchrun, heads it cannot read) must give the same losses and the same trained weights."""
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    calls = []
    real = calibrate_mod.losses.kd_from_hidden
    monkeypatch.setattr(calibrate_mod.losses, "kd_from_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for chunked in (True, False):
        cfg = EndToEndConfig(tokens=256, ctx=32, batch_size=2, lr=1e-3, autocast="off", train="all",
                             chunked_kd=chunked)
        teacher = surgery.load(tiny)
        student = convert_model(surgery.load(tiny), ConvertConfig(experts=8, top_k=2, seed=1))
        set_impl(student, "sorted")
        steps = []
        res = run_end_to_end(student, teacher, ids, cfg, progress=False, on_step=lambda: steps.append(1))
        assert len(steps) == 4 and len(calls) == 4  # the chunked run's four steps, none from the logits run
        runs.append((res["history"], student.state_dict()))
    (h1, s1), (h2, s2) = runs
    assert len(h1) == 4
    for a, b in zip(h1, h2):
        assert abs(a["kd"] - b["kd"]) < 1e-4 * max(1.0, b["kd"]) and abs(a["ce"] - b["ce"]) < 1e-4 * b["ce"]
    start = surgery.load(tiny).state_dict()
    moved = [k for k in s1 if k in start and not torch.equal(s1[k], start[k])]
    assert moved  # the run trained something
    # four Adam steps of lr 1e-3 move a weight by up to ~4e-3; the two paths' float32 sums differ in order, and on
    # an AVX2 CPU that left up to 2.6e-6 between them (AVX-512: under 1e-6), so atol 1e-5 still catches a wrong path
    for k in s1:
        assert torch.allclose(s1[k], s2[k], rtol=1e-4, atol=1e-5), k


def test_e2e_ce_weight_trains_like_the_logits_path(tiny):
    """e2e.ce_weight adds the student's cross-entropy to the KD loss: the chunked path and the logits path
    train the same weights (1e-4), and differently from KD alone."""
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    states = {}
    for chunked, w in ((True, 0.5), (False, 0.5), (True, 0.0)):
        cfg = EndToEndConfig(tokens=256, ctx=32, batch_size=2, lr=1e-3, autocast="off", train="all",
                             chunked_kd=chunked, ce_weight=w)
        student = convert_model(surgery.load(tiny), ConvertConfig(experts=8, top_k=2, seed=1))
        set_impl(student, "sorted")
        run_end_to_end(student, surgery.load(tiny), ids, cfg, progress=False)
        states[chunked, w] = student.state_dict()
    a, b, kd_only = states[True, 0.5], states[False, 0.5], states[True, 0.0]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert any(not torch.allclose(a[k], kd_only[k], rtol=1e-4, atol=1e-6) for k in a)


def test_e2e_average_tail_ends_on_the_mean_of_the_last_steps(tiny):
    """e2e.average_tail: the stage ends with the uniform mean of the weights after each of its last
    round(fraction * steps) steps (here 3 of 6); the steps themselves are those of a run without it."""
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    ends = {}
    for tail in (0.0, 0.5):
        cfg = EndToEndConfig(tokens=384, ctx=32, batch_size=2, lr=1e-3, autocast="off", train="moe",
                             average_tail=tail)
        student = convert_model(surgery.load(tiny), ConvertConfig(experts=8, top_k=2, seed=1))
        set_impl(student, "masked")
        seen = []
        run_end_to_end(student, surgery.load(tiny), ids, cfg, progress=False,
                       on_step=lambda: seen.append({n: p.detach().clone() for n, p in student.named_parameters()
                                                    if ".mlp." in n}))
        assert len(seen) == 6
        ends[tail] = (seen, {n: p.detach().clone() for n, p in student.named_parameters() if ".mlp." in n})
    path, last = ends[0.0]
    _, averaged = ends[0.5]
    for n in last:
        assert torch.allclose(last[n], path[5][n])
        want = torch.stack([path[i][n] for i in (3, 4, 5)]).mean(0)
        assert torch.allclose(averaged[n], want, rtol=1e-5, atol=1e-7), n
    assert any(not torch.allclose(averaged[n], last[n]) for n in last)
    with pytest.raises(SurgeryError, match="average_tail"):
        run_end_to_end(convert_model(surgery.load(tiny), ConvertConfig(experts=8, top_k=2, seed=1)),
                       surgery.load(tiny), ids, EndToEndConfig(tokens=384, ctx=32, batch_size=2, average_tail=1.5),
                       progress=False)


def test_expert_output_sq_norms_equal_each_experts_output_norm():
    gate, up, down = _experts()
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    want = torch.stack([(Fn.silu(x @ gate[e].T) * (x @ up[e].T) @ down[e].T).pow(2).sum(-1)
                        for e in range(gate.shape[0])], 1)
    got = expert_output_sq_norms(x, gate, up, down)
    assert got.shape == (7, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_moe_block_keeps_oracle_scores_only_while_asked_and_differentiating(tiny):
    block = moe_blocks(convert_model(surgery.load(tiny), ConvertConfig(experts=8, top_k=2, seed=1)))[0]
    x = torch.randn(2, 5, block.hidden, generator=torch.Generator().manual_seed(0))
    e = block.experts
    block(x)
    assert block.last_oracle_scores is None  # off by default
    block.oracle_on = True
    with torch.no_grad():
        block(x)
    assert block.last_oracle_scores is None  # inference never pays for it
    block(x)
    want = expert_output_sq_norms(x.reshape(-1, block.hidden), e.gate_proj, e.up_proj, e.down_proj)
    assert block.last_oracle_scores.shape == (10, 8) and not block.last_oracle_scores.requires_grad
    torch.testing.assert_close(block.last_oracle_scores, want)


def test_e2e_prior_weight_trains_routers_towards_the_oracle(tiny):
    """e2e.prior_weight: each step's aux is the weight times losses.oracle_prior of the blocks' router logits and
    oracle scores (recomputed by hand from what the step left), it falls as the routers train, it is 0 without
    the weight, and the blocks stop computing oracle scores when the stage ends."""
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    for w in (0.0, 2.0):
        cfg = EndToEndConfig(tokens=640, ctx=32, batch_size=2, lr=1e-2, autocast="off", train="router",
                             prior_weight=w)
        student = convert_model(surgery.load(tiny), ConvertConfig(experts=8, top_k=2, seed=1))
        blocks = moe_blocks(student)
        by_hand = []

        def after_step():
            scores = [b.last_oracle_scores for b in blocks]
            if w:
                by_hand.append(w * losses.oracle_prior([b.last_router_logits for b in blocks], scores, [2, 2]).item())
            else:
                assert scores == [None, None]

        aux = [h["aux"] for h in run_end_to_end(student, surgery.load(tiny), ids, cfg, progress=False,
                                                on_step=after_step)["history"]]
        assert len(aux) == 10
        assert all(not b.oracle_on and b.last_oracle_scores is None for b in blocks)
        if not w:
            assert aux == [0.0] * 10
            continue
        for a, b in zip(aux, by_hand):
            assert abs(a - b) < 1e-5 * b
        assert sum(aux[-3:]) < sum(aux[:3])
    with pytest.raises(SurgeryError, match="prior_weight"):
        EndToEndConfig(prior_weight=-1.0)


@pytest.mark.parametrize("impl", ["masked", "sorted"])
def test_router_ste_keeps_the_output_and_gives_top1_routers_the_log_prob_gradient(tiny, impl):
    """Top-1 softmax routing renormalised: every weight is exactly `scale`, so the router gets no gradient. With
    router_ste the block computes the same output, and d loss / d logits_t = g_t (onehot(i_t) - p_t), where
    g_t = scale * <d loss / d y_t, expert_i(x_t)> (the gradient of log p_i times the chosen expert's effect)."""
    block = moe_blocks(convert_model(surgery.load(tiny), ConvertConfig(experts=4, top_k=1, seed=1)))[0]
    block.impl = impl
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, block.hidden, generator=g)
    r = torch.randn(9, block.hidden, generator=g)  # loss = <y, r>: d loss / d y = r
    grads, outs = {}, {}
    for ste in (False, True):
        block.router_ste = ste
        block.router.weight.grad = None
        y = block(x)
        (y * r).sum().backward()
        outs[ste], grads[ste] = y.detach(), block.router.weight.grad.clone()
    assert torch.equal(outs[True], outs[False])
    assert grads[False].abs().max() < 1e-3 * grads[True].abs().max()
    with torch.no_grad():
        logits = x @ block.router.weight.T
        p = torch.softmax(logits, -1)
        i = logits.argmax(-1)
        e = block.experts
        y_i = torch.stack([(Fn.silu(x[t] @ e.gate_proj[i[t]].T) * (x[t] @ e.up_proj[i[t]].T)) @ e.down_proj[i[t]].T
                           for t in range(9)])
        g_t = block.routing.scale * (y_i * r).sum(-1)
        dlogits = g_t[:, None] * (Fn.one_hot(i, 4).float() - p)
        want = dlogits.T @ x
    torch.testing.assert_close(grads[True] - grads[False], want, rtol=1e-4, atol=1e-4)


def test_e2e_router_ste_moves_top1_routers_only_when_on(tiny):
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    for ste in (False, True):
        cfg = EndToEndConfig(tokens=256, ctx=32, batch_size=2, lr=1e-2, autocast="off", train="router",
                             router_ste=ste)
        student = convert_model(surgery.load(tiny), ConvertConfig(experts=4, top_k=1, seed=1))
        blocks = moe_blocks(student)
        w0 = [b.router.weight.detach().clone() for b in blocks]
        run_end_to_end(student, surgery.load(tiny), ids, cfg, progress=False)
        moved = max(float((b.router.weight - w).abs().max()) for b, w in zip(blocks, w0))
        assert (moved > 1e-3) if ste else (moved < 1e-3), (ste, moved)
        assert not any(b.router_ste for b in blocks)


def test_compile_setting_decides_where_layers_compile(monkeypatch):
    """e2e.compile auto: CPU, single process, long enough to repay the compile, plain converted models, no
    transition schedule, a C++ compiler; on: always (refused under torchrun); off: never."""
    cpu, gpu, n = torch.device("cpu"), torch.device("cuda"), compiled.MIN_STEPS
    monkeypatch.setattr(compiled, "have_compiler", lambda: True)
    assert compiled.compile_on("auto", cpu, n)
    assert not compiled.compile_on("auto", cpu, n - 1)
    assert not compiled.compile_on("auto", gpu, n)
    for flag in ("sharded", "transition", "lora", "heads"):
        assert not compiled.compile_on("auto", cpu, n, **{flag: True}), flag
    for flag in ("transition", "lora", "heads"):  # "on" compiles them all the same
        assert compiled.compile_on("on", cpu, 1, **{flag: True}), flag
    assert compiled.compile_on("on", cpu, 1) and not compiled.compile_on("off", cpu, 10 * n)
    with pytest.raises(SurgeryError, match="torchrun"):
        compiled.compile_on("on", cpu, n, sharded=True)
    monkeypatch.setattr(compiled, "have_compiler", lambda: False)
    assert not compiled.compile_on("auto", cpu, n)
    with pytest.raises(SurgeryError, match="C\\+\\+ compiler"):
        compiled.compile_on("on", cpu, n)
    with pytest.raises(SurgeryError, match="e2e.compile 'yes'"):
        EndToEndConfig(compile="yes")


def test_compiled_layers_are_eager_again_after_the_context(tiny):
    model = surgery.load(tiny)
    layers = compiled.decoder_layers(model)
    assert len(layers) == 2
    with pytest.raises(RuntimeError, match="inside"):
        with compiled.compiled_layers([model]):
            assert all(l._compiled_call_impl is not None for l in layers)
            raise RuntimeError("inside")
    assert all(l._compiled_call_impl is None for l in layers)
    with compiled.compiled_layers([model], on=False) as on:
        assert not on and all(l._compiled_call_impl is None for l in layers)


_COMPILED_VS_EAGER = """
import json, sys
import torch
import surgery
from surgery import compiled
from surgery.calibrate import EndToEndConfig, run_end_to_end
from surgery.convert import ConvertConfig, convert_model
from surgery.moe import set_impl

tiny, impl = sys.argv[1], sys.argv[2]
ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
runs = {}
for mode in ("off", "on"):
    cfg = EndToEndConfig(tokens=256, ctx=32, batch_size=2, lr=1e-3, autocast="off", train="all", compile=mode)
    student = convert_model(surgery.load(tiny), ConvertConfig(experts=8, shared_experts=1, top_k=2, seed=1))
    set_impl(student, impl)
    res = run_end_to_end(student, surgery.load(tiny), ids, cfg, progress=False)
    eager_after = all(l._compiled_call_impl is None for l in compiled.decoder_layers(student))
    runs[mode] = ([h["kd"] for h in res["history"]], student.state_dict(), eager_after)
start = surgery.load(tiny).state_dict()
(kd0, s0, _), (kd1, s1, eager_after) = runs["off"], runs["on"]
print(json.dumps({"kd_eager": kd0, "kd_compiled": kd1, "eager_after": eager_after,
                  "moved": sum(not torch.equal(s1[k], start[k]) for k in s1 if k in start),
                  "worst": max(((s1[k] - s0[k]).abs() - 1e-4 * s0[k].abs()).max().item() for k in s0)}))
"""


@pytest.mark.skipif(not compiled.have_compiler(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("impl", ["sorted", "masked"])
def test_e2e_compiled_trains_like_eager(tiny, impl):
    """The compiled stage (every decoder layer of student and teacher compiled; the sorted path's per-expert
    loop eager inside it) trains the same weights as eager, float32, within rtol 1e-4 + atol 1e-6; the layers
    are eager afterwards."""
    r = run_compiled_in_fresh_process(_COMPILED_VS_EAGER, tiny, impl)
    assert r["kd_compiled"] == pytest.approx(r["kd_eager"], rel=1e-4, abs=1e-7)  # a near-uniform random model
    assert r["eager_after"] and r["moved"] > 0  # it trained, and left the layers eager
    assert r["worst"] <= 1e-6  # every weight: |compiled - eager| <= 1e-4 |eager| + 1e-6


def _moved_after_e2e(tiny, convert: ConvertConfig, **e2e) -> dict[str, float]:
    """How far each parameter of a freshly converted tiny student moves (norm of the change) over a short
    end-to-end stage with these EndToEndConfig fields; the same data, seed and settings every call."""
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    student = convert_model(surgery.load(tiny), convert)
    set_impl(student, "masked")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = EndToEndConfig(tokens=256, ctx=32, batch_size=2, lr=1e-4, autocast="off", train="moe", **e2e)
    run_end_to_end(student, surgery.load(tiny), ids, cfg, progress=False)
    after = dict(student.named_parameters())
    return {n: (after[n] - before[n]).norm().item() for n in before}


@pytest.mark.parametrize("scale", [0.0, 30.0])
def test_e2e_router_lr_scale_sets_the_routers_step(tiny, scale):
    """e2e.router_lr_scale multiplies the routers' learning rate only: at 0 the routers stay as converted while
    the experts train; at 30 the routers move further than at 1 over the same steps."""
    moved = {s: _moved_after_e2e(tiny, ConvertConfig(experts=8, top_k=2, seed=1), router_lr_scale=s)
             for s in (1.0, scale)}
    routers = [n for n in moved[1.0] if n.endswith("router.weight")]
    experts = [n for n in moved[1.0] if ".experts." in n]
    assert routers and experts
    assert all(moved[1.0][n] > 0 for n in routers) and all(moved[scale][n] > 0 for n in experts)
    if scale == 0.0:
        assert all(moved[0.0][n] == 0 for n in routers)
    else:
        assert sum(moved[scale][n] for n in routers) > 5 * sum(moved[1.0][n] for n in routers)


def test_e2e_expert_lr_scale_sets_the_routed_experts_step_only(tiny):
    """e2e.expert_lr_scale multiplies the routed experts' learning rate only: at 0 they stay as converted while
    the routers and the shared expert train; at 3 they move further than at 1 over the same steps."""
    convert = ConvertConfig(experts=8, shared_experts=2, top_k=2, seed=1)
    moved = {s: _moved_after_e2e(tiny, convert, expert_lr_scale=s) for s in (1.0, 0.0, 3.0)}
    experts = [n for n in moved[1.0] if ".experts." in n]
    others = [n for n in moved[1.0] if "router.weight" in n or "shared_expert" in n]
    assert experts and any("shared_expert" in n for n in others)
    assert all(moved[0.0][n] == 0 for n in experts) and all(moved[0.0][n] > 0 for n in others)
    assert sum(moved[3.0][n] for n in experts) > 2 * sum(moved[1.0][n] for n in experts)


def test_e2e_transition_ends_at_target_k_and_restores_routing(tiny, tmp_path):
    teacher = surgery.load(tiny)
    student = convert_model(surgery.load(tiny), ConvertConfig(experts=8, top_k=2, seed=1))
    before = [b.routing for b in moe_blocks(student)]
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    cfg = EndToEndConfig(tokens=640, ctx=32, batch_size=2, k_start=8, transition=0.5, snapshots=[0.5],
                         autocast="off")
    set_impl(student, "masked")
    res = run_end_to_end(student, teacher, ids, cfg, ckpt=tmp_path / "ckpt", progress=False)
    ks = [h["top_k"] for h in res["history"]]
    assert ks[0] == 8 and ks[-1] == 2 and ks == sorted(ks, reverse=True)
    assert [b.routing for b in moe_blocks(student)] == before
    assert all(b.unit_mix == 0.0 for b in moe_blocks(student))
    assert len(res["snapshots"]) == 1 and res["snapshots"][0]["step"] == 5
    snap = torch.load(res["snapshots"][0]["path"], weights_only=True)
    assert any(".mlp.experts.gate_proj" in k for k in snap)


# ---- baselines -----------------------------------------------------------------------------------------

class _Stats:
    """Stand-in for profile.LayerStats: sampled inputs and per-neuron importance."""

    def __init__(self, inputs, importance):
        self.inputs, self.importance = inputs, importance

    def activations(self, gate, up, limit=None):
        x = self.inputs[:limit].float()
        return torch.nn.functional.silu(x @ gate.float().T) * (x @ up.float().T)


def _stats_for(model, n=64):
    g = torch.Generator().manual_seed(3)
    out = {}
    for l, layer in enumerate(model.model.layers):
        x = torch.randn(n, model.config.hidden_size, generator=g)
        st = _Stats(x, torch.zeros(1))
        h = st.activations(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)
        st.importance = h.pow(2).mean(0) * layer.mlp.down_proj.weight.pow(2).sum(0)
        out[l] = st
    return out


@pytest.mark.parametrize("kind,granularity", [("oracle", 1), ("oracle", 8), ("gate-sparsity", 1), ("static", 1)])
def test_baselines_keeping_every_neuron_are_the_dense_model(tiny, kind, granularity):
    dense = surgery.load(tiny)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        stats = _stats_for(dense)
        model = apply_baseline(surgery.load(tiny), kind, 1.0, stats, granularity=granularity, compensate=True)
        got = model(input_ids=ids).logits
    assert relative_error(got, ref) < 1e-5


@pytest.mark.parametrize("kind", ["oracle", "gate-sparsity", "static"])
def test_baselines_at_half_change_the_model_and_keep_half(tiny, kind):
    dense = surgery.load(tiny)
    ids = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        model = apply_baseline(surgery.load(tiny), kind, 0.5, _stats_for(dense), granularity=4)
        got = model(input_ids=ids).logits
    assert relative_error(got, ref) > 1e-3
    mlp = model.model.layers[0].mlp
    kept = {"oracle": lambda m: m.k * m.G, "gate-sparsity": lambda m: m.k,
            "static": lambda m: m.gate_proj.weight.shape[0]}[kind](mlp)
    assert kept == 48


def test_per_neuron_oracle_keeps_the_largest_contributions():
    torch.manual_seed(0)
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 6, bias=False)
    mlp.down_proj = torch.nn.Linear(6, 8, bias=False)
    from surgery_evals.baselines import OracleFFN

    oracle = OracleFFN(mlp, [torch.tensor([i]) for i in range(6)], k=2)
    x = torch.randn(5, 8)
    with torch.no_grad():
        h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        contrib = h.abs() * mlp.down_proj.weight.norm(dim=0)
        keep = torch.zeros_like(h).scatter_(1, contrib.topk(2, -1).indices, 1.0)
        want = mlp.down_proj(h * keep)
        assert torch.allclose(oracle(x), want, atol=1e-6)


def test_static_compensation_is_the_dropped_neurons_mean_output():
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(2, 3, bias=False)
    mlp.down_proj = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        mlp.up_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]))
        mlp.down_proj.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    st = _Stats(x, torch.tensor([3.0, 1.0, 2.0]))  # keep neurons 0 and 2, drop neuron 1
    kept, bias = static_keep(mlp, st, keep=2 / 3, compensate=True)
    assert kept.tolist() == [0, 2]
    silu = torch.nn.functional.silu
    h1 = torch.tensor([silu(torch.tensor(1.0)) * 2.0, silu(torch.tensor(0.0)) * 0.0])  # neuron 1 on both tokens
    want = torch.tensor([0.0, 1.0]) * h1.mean()  # its down column times its mean activation
    assert torch.allclose(bias, want, atol=1e-6)
    _, none = static_keep(mlp, st, keep=2 / 3, compensate=False)
    assert none is None


def test_baseline_errors():
    with pytest.raises(SurgeryError, match="baseline 'magic'"):
        apply_baseline(None, "magic", 0.5)
    with pytest.raises(SurgeryError, match="--keep"):
        apply_baseline(None, "static", 0.0)


def test_interleave_alternates_blocks_and_keeps_everything():
    from surgery.data import interleave

    a, b = torch.arange(0, 10), torch.arange(100, 105)
    out = interleave(a, b, 4)
    assert out.tolist() == [0, 1, 2, 3, 100, 101, 102, 103, 4, 5, 6, 7, 104, 8, 9]


def test_mix_calibration_is_half_file_half_sampled(tmp_path, monkeypatch):
    import surgery.data as data
    from surgery.profile import MIX_BLOCK, calibration_ids

    monkeypatch.setattr(data, "sample_corpus", lambda model, tok, n, **kw: torch.full((n,), -1))
    monkeypatch.setattr(data, "tokenize_file", lambda tok, path, n: torch.arange(n))
    ids = calibration_ids(None, "mix", 4 * MIX_BLOCK, model=object())
    assert ids.numel() == 4 * MIX_BLOCK and (ids == -1).sum() == 2 * MIX_BLOCK
    assert (ids[:MIX_BLOCK] >= 0).all() and (ids[MIX_BLOCK:2 * MIX_BLOCK] == -1).all()
    with pytest.raises(SurgeryError, match="mix needs the dense model"):
        calibration_ids(None, "mix", 16)


def test_static_baseline_calibrates_on_the_data_it_is_given(tiny, text_file):
    from surgery_evals.baselines import run_baseline

    with pytest.raises(SurgeryError, match="--data .* goes with --calibrate-tokens"):
        run_baseline(tiny, "static", 0.5, calibrate_data="mix", progress=False)
    r = run_baseline(tiny, "static", 0.5, calibrate_tokens=256, calibrate_ctx=32, lr=1e-3,
                     datasets={str(text_file): 256}, ctx=64, progress=False, calibrate_data=str(text_file))
    cal = r["calibration"]
    assert cal["data"] == str(text_file) and cal["tokens"] == 256 and math.isfinite(cal["last_kd"])
    assert math.isfinite(r["evaluations"][str(text_file)]["perplexity"])


@pytest.mark.parametrize("compensate", [True, False])
def test_static_baseline_saves_a_stock_llama(tiny, text_file, tmp_path, compensate):
    """--save writes the pruned model as a plain Llama checkpoint (narrower FFN, mlp_bias when compensated)
    that stock transformers loads to the same logits; other baselines and an existing folder are refused."""
    import json

    from transformers import AutoModelForCausalLM

    from surgery_evals.baselines import run_baseline

    out = tmp_path / "static"
    r = run_baseline(tiny, "static", 0.5, compensate=compensate, datasets={str(text_file): 128}, ctx=64,
                     progress=False, save=out)
    assert r["saved"]["max_abs_logit_diff"] < 1e-5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 48 and cfg["mlp_bias"] is compensate and (out / "tokenizer.json").is_file()
    stock = AutoModelForCausalLM.from_pretrained(str(out))
    assert stock.model.layers[0].mlp.gate_proj.weight.shape == (48, 64)
    with pytest.raises(SurgeryError, match="already exists"):
        run_baseline(tiny, "static", 0.5, datasets={str(text_file): 128}, ctx=64, progress=False, save=out)
    with pytest.raises(SurgeryError, match="only the static baseline"):
        run_baseline(tiny, "oracle", 0.5, progress=False, save=tmp_path / "o")


@pytest.mark.parametrize("E,F,K,expected", [(10, 96, 2, "sorted"), (13, 96, 1, "sorted"), (40, 24, 8, "masked"),
                                             (48, 24, 16, "masked"), (8, 96, 4, "masked")])
def test_training_path_follows_the_block_shape(E, F, K, expected):
    from surgery.moe import MoEBlock, training_impl

    block = MoEBlock(32, E, F, 0, RoutingConfig(top_k=K))
    assert training_impl(block) == expected


@pytest.mark.parametrize("E,F,K,expected", [(10, 96, 2, "masked"), (13, 96, 1, "sorted"), (16, 96, 2, "sorted"),
                                             (48, 32, 16, "masked")])
def test_bf16_training_path_prefers_masked_until_e_is_8k(E, F, K, expected):
    """Under bf16 autocast the masked path's large matmuls are ~4x faster, the sorted path's experts are not."""
    from surgery.moe import MoEBlock, training_impl

    assert training_impl(MoEBlock(32, E, F, 0, RoutingConfig(top_k=K)), bf16=True) == expected


def test_calibration_trains_wide_experts_on_the_sorted_path(tiny, tmp_path):
    """A block of 4 experts x 64 neurons with top-1 trains through the sorted path, then goes back to auto."""
    from surgery.calibrate import CalibrateConfig, calibrate

    big = make_llama(tmp_path / "wide", ffn=256, layers=2)
    teacher = surgery.load(big)
    student = convert_model(surgery.load(big), ConvertConfig(experts=4, top_k=1, seed=1))
    seen = []
    orig = reference.moe_ffn_sorted

    def spy(*a, **k):
        seen.append(torch.is_grad_enabled())
        return orig(*a, **k)

    reference.moe_ffn_sorted = spy
    try:
        # autocast off: on a CPU with AMX, "auto" trains the student in bf16, where E4 K1 takes the masked path
        cfg = CalibrateConfig(layerwise=None, e2e=EndToEndConfig(tokens=64, ctx=16, batch_size=2, lr=1e-3, train="moe",
                                                                 autocast="off"))
        r = calibrate(student, teacher, None, cfg, ids=torch.randint(0, 128, (256,)), progress=False)
    finally:
        reference.moe_ffn_sorted = orig
    assert seen and any(seen), "the e2e stage did not train through the sorted path"
    assert all(b.impl == "auto" for b in moe_blocks(student))
    assert r["e2e"]["history"][-1]["kd"] > 0


def test_e2e_stage_picks_the_bf16_training_path_under_autocast_and_restores(tmp_path):
    """Under autocast on a CPU the e2e stage re-chooses each block's path for bf16 (E4 K1 of 64 wide: masked,
    not the float32 choice, sorted), runs it under autocast, and gives the blocks their paths back."""
    from surgery.calibrate import run_end_to_end
    from surgery.moe import set_training_impl

    big = make_llama(tmp_path / "wide", ffn=256, layers=2)
    teacher = surgery.load(big)
    student = convert_model(surgery.load(big), ConvertConfig(experts=4, top_k=1, seed=1))
    set_training_impl(student)
    assert all(b.impl == "sorted" for b in moe_blocks(student))
    seen = []
    orig = reference.moe_ffn_masked

    def spy(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return orig(*a, **k)

    reference.moe_ffn_masked = spy
    try:
        cfg = EndToEndConfig(tokens=64, ctx=16, batch_size=2, lr=1e-3, train="moe", autocast="on")
        r = run_end_to_end(student, teacher, torch.randint(0, 128, (256,)), cfg, progress=False)
    finally:
        reference.moe_ffn_masked = orig
    assert seen and all(seen)
    assert all(b.impl == "sorted" for b in moe_blocks(student))
    assert math.isfinite(r["history"][-1]["kd"])


def test_router_logits_stay_float32_under_autocast_and_work_on_meta():
    """Which experts (and heads) run is decided in float32 even under bf16 autocast; on meta tensors (shape-only
    passes) the guard is a no-op instead of torch.autocast's error."""
    from surgery.attention.router import learned_logits
    from surgery.moe import MoEBlock

    block = MoEBlock(16, 4, 8, 0, RoutingConfig(top_k=1))
    torch.nn.init.normal_(block.router.weight)
    x = torch.randn(5, 16)
    want = x @ block.router.weight.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, heads = block.router_logits(x), learned_logits(x, block.router.weight, None)
    assert got.dtype == heads.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(heads, want, atol=1e-5)
    meta = torch.empty(5, 16, device="meta")
    assert block.router_logits(meta).shape == (5, 4)
