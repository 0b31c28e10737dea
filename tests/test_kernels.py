"""The MoE kernels against their references.

Shape legend: T tokens, D hidden, E experts, F expert width, K top-k, S shared width.

Layers of ground truth: naive per-token loops (float64) check the PyTorch reference; the reference checks
the Triton kernels. Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, float32
only: bf16 is garbage there); with one, the same tests run on CUDA and the bf16 tests run too.
Tolerances: float32 atol = rtol = 1e-4 (outputs are O(1)); bf16 5e-2 relative to the output's scale.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first import of a module with @triton.jit kernels: the decorator picks the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import require_triton  # noqa: E402
from surgery_kernels import ops, reference  # noqa: E402  (never imports triton)

DEV = "cuda" if CUDA else "cpu"
F32 = dict(atol=1e-4, rtol=1e-4)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tm():
    """The Triton modules, imported only when a test needs them (skipped cleanly without triton)."""
    require_triton(CUDA)
    from surgery_kernels import grouping, routing, triton_moe

    return dict(grouping=grouping, routing=routing, triton_moe=triton_moe)


def make_experts(E, F, D, S=0, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
    gate, up = r(E, F, D, scale=D ** -0.5), r(E, F, D, scale=D ** -0.5)
    down = r(E, D, F, scale=F ** -0.5 * 2)
    shared = (r(S, D, scale=D ** -0.5), r(S, D, scale=D ** -0.5), r(D, S, scale=S ** -0.5)) if S else None
    return gate, up, down, shared


def make_routing(T, E, K, device="cpu", seed=1, empty_expert=True):
    """Random routing; expert 0 gets no token when K < E (an expert with nothing to do must still work)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if empty_expert and K < E:
        logits[:, 0] = -1e4
    return reference.route(logits.to(device), K)


# ----------------------------------------------------------------------------------------------- reference

def naive_route(logits_TE, K, score_func, renormalize, scale):
    w, ids = [], []
    for row in logits_TE.double():
        s = torch.softmax(row, 0) if score_func == "softmax" else torch.sigmoid(row)
        order = sorted(range(len(s)), key=lambda e: -float(s[e]))[:K]
        top = torch.stack([s[e] for e in order])
        if renormalize:
            top = top / top.sum()
        w.append(top * scale)
        ids.append(order)
    return torch.stack(w), torch.tensor(ids)


def naive_moe(x, gate, up, down, w, ids, shared=None):
    """Per token, per k, in float64: the definition, differentiable."""
    x, gate, up, down, w = (t.double() for t in (x, gate, up, down, w))
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            y = y + w[t, k] * (down[e] @ (torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
        if shared is not None:
            sg, su, sd = (s.double() for s in shared)
            y = y + sd @ (torch.nn.functional.silu(sg @ x[t]) * (su @ x[t]))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize,scale", [(True, 1.0), (False, 1.0), (True, 2.5)])
def test_reference_route_matches_naive(score_func, renormalize, scale):
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(0)) * 3
    w, ids = reference.route(logits, 3, score_func, renormalize, scale)
    w_ref, ids_ref = naive_route(logits, 3, score_func, renormalize, scale)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w.double(), w_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("S", [0, 20])
def test_reference_moe_matches_naive_float64(S):
    T, D, E, F, K = 13, 32, 8, 24, 2
    gate, up, down, shared = make_experts(E, F, D, S)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    w, ids = make_routing(T, E, K)
    y = reference.moe_ffn(x, gate, up, down, w, ids, shared)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), naive_moe(x, gate, up, down, w, ids, shared), **F32)


def test_reference_gradients_match_naive():
    T, D, E, F, K, S = 6, 16, 4, 12, 2, 8
    gate, up, down, shared = make_experts(E, F, D, S)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    w, ids = make_routing(T, E, K)
    leaves = [t.clone().requires_grad_() for t in (x, gate, up, down, w, *shared)]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y = reference.moe_ffn(*leaves[:5], ids, shared=tuple(leaves[5:]))
    y_ref = naive_moe(*ref[:5], ids, shared=tuple(ref[5:]))
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(y_ref, ref, g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **F32)


# -------------------------------------------------------------------------------------------------- triton

@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (16, 4), (64, 8), (8, 8)])
@pytest.mark.parametrize("score_func,renormalize,scale", [("softmax", True, 1.0), ("sigmoid", False, 2.0)])
def test_triton_route(tm, E, K, score_func, renormalize, scale):
    logits = (torch.randn(150, E, generator=torch.Generator().manual_seed(E + K)) * 2).to(DEV)  # > 1 block
    w, ids = tm["routing"].route(logits, K, score_func, renormalize, scale)
    w_ref, ids_ref = reference.route(logits, K, score_func, renormalize, scale)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (7, 16, 4), (200, 64, 8), (64, 8, 8)])
def test_triton_grouping(tm, T, E, K):
    _, ids = make_routing(T, E, K, device=DEV)
    groups = tm["grouping"].group_by_expert(ids, E)
    flat = ids.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(groups.counts_E.cpu().long(), counts)
    assert torch.equal(groups.offsets_E1.cpu().long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(groups.sorted_N.cpu().long(), torch.argsort(flat, stable=True))  # stable: token order
    if K < E:
        assert counts[0] == 0


# T, D, E, F, K, S (shared width, 0 = none), decode (None: chosen by T). F is never a power of two, and
# expert 0 receives no token whenever K < E.
CASES = [
    (1, 32, 4, 24, 1, 0, None),
    (1, 48, 64, 40, 8, 16, None),
    (7, 32, 8, 24, 2, 16, None),
    (7, 48, 16, 40, 4, 0, False),  # the grouped kernels at tiny T: mostly empty tiles
    (64, 32, 16, 24, 4, 16, None),
    (64, 48, 8, 40, 2, 0, False),
    (64, 32, 8, 24, 8, 0, False),  # K == E: every expert on
    (200, 32, 64, 24, 8, 16, None),
    (200, 48, 4, 40, 1, 0, None),
    # the recipes' fine-grained shapes: 48 experts of 24 top-16 + 384 shared (50%), 56 of 24 top-8 (25%)
    (3, 576, 48, 24, 16, 384, None),
    (40, 64, 48, 24, 16, 32, False),
    (40, 64, 56, 24, 8, 32, None),
]


@pytest.mark.parametrize("T,D,E,F,K,S,decode", CASES)
def test_triton_moe_ffn_float32(tm, T, D, E, F, K, S, decode):
    gate, up, down, shared = make_experts(E, F, D, S, device=DEV)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(DEV)
    w, ids = make_routing(T, E, K, device=DEV)
    y = tm["triton_moe"].moe_ffn_forward(x, gate, up, down, w, ids, shared, decode=decode)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, reference.moe_ffn(x, gate, up, down, w, ids, shared), **F32)


@pytest.mark.parametrize("T,decode", [(5, True), (70, False)])
def test_triton_moe_ffn_gradients(tm, T, decode):
    D, E, F, K, S = 32, 8, 24, 2, 16
    gate, up, down, shared = make_experts(E, F, D, S, device=DEV)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(DEV)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(5)).to(DEV)
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(6)).to(DEV)

    def grads(moe, route):
        leaves = [t.clone().requires_grad_() for t in (x, gate, up, down, logits, *shared)]
        w, ids = route(leaves[4], K)
        y = moe(*leaves[:4], w, ids, shared=tuple(leaves[5:]))
        return [y, *torch.autograd.grad(y, leaves, g)]

    tri = tm["triton_moe"]
    got = grads(lambda *a, shared: tri.moe_ffn(*a, shared=shared, decode=decode), tri.route)
    want = grads(reference.moe_ffn, reference.route)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("decode", [True, False])
def test_triton_moe_ffn_strided_inputs(tm, decode):
    """Weights stored transposed (as views) and x a slice of a wider buffer: the kernels follow strides."""
    T, D, E, F, K = 70, 32, 8, 40, 2
    gate, up, down, _ = make_experts(E, F, D, device=DEV)
    gate_t = gate.transpose(1, 2).contiguous().transpose(1, 2)
    down_t = down.transpose(1, 2).contiguous().transpose(1, 2)
    assert gate_t.stride(-1) != 1 and down_t.stride(-1) != 1
    x = torch.randn(T, 2 * D, generator=torch.Generator().manual_seed(4)).to(DEV)[:, ::2]
    w, ids = make_routing(T, E, K, device=DEV)
    y = tm["triton_moe"].moe_ffn_forward(x, gate_t, up, down_t, w, ids, decode=decode)
    torch.testing.assert_close(y, reference.moe_ffn(x, gate, up, down, w, ids), **F32)


def test_triton_empty_batch(tm):
    gate, up, down, _ = make_experts(4, 24, 32, device=DEV)
    x = torch.zeros(0, 32, device=DEV)
    w, ids = tm["routing"].route(torch.zeros(0, 4, device=DEV), 2)
    assert w.shape == (0, 2)
    assert tm["triton_moe"].moe_ffn(x, gate, up, down, w, ids).shape == (0, 32)


# ----------------------------------------------------------------------------------------------------- ops

def test_ops_dispatch():
    gate, up, down, shared = make_experts(4, 24, 32, 8)
    x = torch.randn(5, 32)
    w, ids = ops.route(torch.randn(5, 4), 2)
    ref = reference.moe_ffn(x, gate, up, down, w, ids, shared)
    # auto on CPU with no gradient wanted: the CPU inference path (tests/test_cpu_moe.py), equal up to rounding
    torch.testing.assert_close(ops.moe_ffn(x, gate, up, down, w, ids, shared), ref, **F32)
    assert torch.equal(ops.moe_ffn(x, gate, up, down, w, ids, shared, impl="reference"), ref)
    # with autograd recording: the reference, bit for bit
    y = ops.moe_ffn(x.requires_grad_(), gate, up, down, w, ids, shared)
    assert y.requires_grad and torch.equal(y.detach(), ref)
    with pytest.raises(ValueError):
        ops.moe_ffn(x, gate, up, down, w, ids, impl="cuda")


def test_ops_triton_impl_matches_reference(tm):
    gate, up, down, shared = make_experts(8, 24, 32, 8, device=DEV)
    x = torch.randn(9, 32).to(DEV)
    logits = torch.randn(9, 8).to(DEV)
    w, ids = ops.route(logits, 2, impl="triton")
    torch.testing.assert_close(w, reference.route(logits, 2)[0], atol=1e-6, rtol=1e-5)
    y = ops.moe_ffn(x, gate, up, down, w, ids, shared, impl="triton")
    torch.testing.assert_close(y, reference.moe_ffn(x, gate, up, down, w, ids, shared), **F32)


def test_ops_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch; from surgery_kernels import ops\n"
            "assert not ops.triton_available()\n"
            "w, i = ops.route(torch.randn(3, 4), 2)\n"
            "g = torch.randn(4, 8, 16); d = torch.randn(4, 16, 8)\n"
            "print(ops.moe_ffn(torch.randn(3, 16), g, g, d, w, i).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([3, 16])" in r.stdout


# ----------------------------------------------------------------------------------------------------- GPU

COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from surgery_kernels import decode, expert_gemm, grouping, routing

def compile(kernel, types, constexprs):
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # autotuned: compile its first config
    cfg = kernel.configs[0] if hasattr(kernel, "configs") else None
    consts = dict(constexprs, **(cfg.kwargs if cfg else {}))
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg else {}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)

b, f, i = "*bf16", "*fp32", "*i32"
compile(routing._route_kernel, dict(logits_ptr=f, w_ptr=f, ids_ptr="*i64", scale="fp32"),
        dict(K=4, SIGMOID=False, RENORM=True, BLOCK_T=64, BLOCK_E=16, BLOCK_K=4))
compile(grouping._count_kernel, dict(ids_ptr="*i64", chunk_counts_ptr=i), dict(BLOCK_N=128, BLOCK_E=64))
compile(grouping._place_kernel, dict(ids_ptr="*i64", chunk_base_ptr=i, sorted_ptr=i), dict(BLOCK_N=128, BLOCK_E=64))
idx = dict(sorted_ptr=i, counts_ptr=i, offsets_ptr=i)
gemm = dict(PRECISION="tf32", BLOCK_E=16)
compile(expert_gemm._up_kernel, dict(x_ptr=b, gate_ptr=b, up_ptr=b, h_ptr=b, **idx), gemm)
compile(expert_gemm._down_kernel, dict(h_ptr=b, down_ptr=b, w_ptr=f, y_ptr=b, **idx), gemm)
compile(expert_gemm._combine_kernel, dict(y_ptr=b, shared_ptr=b, out_ptr=b),
        dict(HAS_SHARED=True, BLOCK_T=4, BLOCK_D=512))
compile(decode._decode_up_kernel, dict(x_ptr=b, gate_ptr=b, up_ptr=b, ids_ptr="*i64", h_ptr=f), {})
compile(decode._decode_down_kernel, dict(h_ptr=f, down_ptr=b, ids_ptr="*i64", w_ptr=f, shared_ptr=b, out_ptr=b),
        dict(HAS_SHARED=True))
print("compiled")
"""


def test_kernels_compile_for_hopper_without_a_gpu():
    """Every kernel compiles to an sm_90 binary for bf16 (ptxas ships with triton): catches GPU-only
    codegen errors on machines with no GPU, where the interpreter would accept them."""
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget API")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", COMPILE_CHECK], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,D,E,F,K,S", [(1, 1024, 16, 688, 4, 0), (48, 1024, 8, 1376, 2, 512),
                                         (1000, 1024, 16, 688, 4, 256), (4096, 512, 64, 344, 8, 0)])
def test_gpu_half_matches_reference(tm, dtype, T, D, E, F, K, S):
    """bf16/fp16 against the float32 reference on the same (rounded) weights: 5e-2 of the output's scale."""
    gate, up, down, shared = make_experts(E, F, D, S, dtype=dtype, device="cuda")
    x = torch.randn(T, D, device="cuda").to(dtype)
    w, ids = tm["triton_moe"].route(torch.randn(T, E, device="cuda"), K)
    y = ops.moe_ffn(x, gate, up, down, w, ids, shared, impl="triton")
    f = lambda t: t.float()  # noqa: E731
    y_ref = reference.moe_ffn(f(x), f(gate), f(up), f(down), w, ids,
                              tuple(map(f, shared)) if shared else None)
    assert y.dtype == dtype
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.float(), y_ref, atol=5e-2 * scale, rtol=5e-2)
    y2 = ops.moe_ffn(x, gate, up, down, w, ids, shared, impl="triton")
    assert torch.equal(y, y2)  # deterministic: no atomics anywhere


@needs_cuda
def test_gpu_bf16_gradients(tm):
    D, E, F, K, T = 256, 8, 200, 2, 300
    gate, up, down, _ = make_experts(E, F, D, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w, ids = tm["triton_moe"].route(torch.randn(T, E, device="cuda"), K)
    ops.moe_ffn(x, gate, up, down, w, ids, impl="triton").float().square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    reference.moe_ffn(x2, gate, up, down, w, ids).float().square().sum().backward()
    scale = x2.grad.float().abs().max().item()
    torch.testing.assert_close(x.grad.float(), x2.grad.float(), atol=5e-2 * scale, rtol=5e-2)
