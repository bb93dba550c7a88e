"""CUDA only: the Triton backend on real-model shapes, bf16 included (the interpreter cannot run
bf16), against the float64 reference; 64-bit offsets into an x of more than 2**31 elements; CUDA-graph
capture of a decode step and of a training step. Skipped without a GPU; the CPU grid runs everywhere."""

from __future__ import annotations

import gc

import pytest
import torch

import lora_kernels
from lora_kernels import tuning
from lora_kernels.reference import lora_linear_reference, multi_lora_linear_reference
from lora_kernels.tuning import MatmulConfig, Plan

from .helpers import DEVICE
from .test_lora_linear import check_against_reference, make_params, make_x
from .tolerance import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (M, K, N, r): Llama-3-8B q/o (r 16 and 128), k/v, gate/up and down projections, SmolLM2; decode to prefill
SHAPES = [
    (1, 4096, 4096, 16),
    (256, 4096, 4096, 128),
    (16, 4096, 1024, 8),
    (77, 4096, 14336, 64),
    (1024, 14336, 4096, 16),
    (2048, 576, 1536, 128),
    (333, 4095, 130, 12),
    (64, 576, 576, 256),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_triton_real_model_shapes(dtype, shape):
    lora_kernels.set_backend("triton")
    m, k, n, r = shape
    gen = torch.Generator().manual_seed(m + r)
    x = make_x(m, k, "3d", dtype, gen)
    w, bias, a, b = make_params(n, k, r, dtype, True, gen)
    check_against_reference(x, w, bias, a, b, 2.0)


def test_triton_dropout_bf16():
    lora_kernels.set_backend("triton")
    gen = torch.Generator().manual_seed(0)
    x = make_x(512, 1024, "2d", torch.bfloat16, gen)
    w, bias, a, b = make_params(2048, 1024, 16, torch.bfloat16, False, gen)
    torch.manual_seed(0)
    y1 = lora_kernels.lora_linear(x, w, bias, a, b, 2.0, dropout_p=0.1)
    torch.manual_seed(0)
    y2 = lora_kernels.lora_linear(x, w, bias, a, b, 2.0, dropout_p=0.1)
    assert torch.equal(y1, y2) and y1.device.type == "cuda" and torch.isfinite(y1).all()
    assert DEVICE.type == "cuda"


# (M, K, N, L, r_max, ranks or None, ids distribution): decode over many adapters, prefill over few
MULTI_CASES = [
    (64, 4096, 4096, 64, 16, None, "row_per_adapter"),
    (64, 4096, 1024, 8, 16, None, "random"),
    (1024, 4096, 14336, 4, 64, [64, 8, 16, 1], "zipf"),
    (777, 576, 1536, 8, 64, [8, 64, 12, 1, 16, 32, 0, 64], "base_mixed"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: "M{}_K{}_N{}_L{}_r{}_{}".format(*c[:5], c[6]))
def test_triton_multi_real_model_shapes(dtype, case):
    from .multi_lora_linear.test_forward_backward import check_against_reference as check_multi
    from .multi_lora_linear.test_forward_backward import ids_for, make_stacks

    lora_kernels.set_backend("triton")
    m, k, n, num_adapters, r_max, ranks, dist = case
    gen = torch.Generator().manual_seed(m + num_adapters)
    ids = ids_for(dist, m, num_adapters, gen).to(DEVICE)
    x = make_x(m, k, "3d", dtype, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, n, k, r_max, dtype, True, gen, ranks)
    batch = lora_kernels.AdapterBatch(ids, num_adapters, ranks=ranks)
    check_multi(x, w, bias, a, b, scales, ids, adapters=batch, ranks=ranks)


def bf16_multi_inputs(m, k, n, num_adapters, r, gen):
    """weight (N, K), lora_a (L, r, K), lora_b (L, N, r) bf16, scales (L,) fp32, x (M, K) bf16, ids (M,)."""
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, torch.bfloat16)
    a = (torch.randn(num_adapters, r, k, generator=gen) / k**0.5).to(DEVICE, torch.bfloat16)
    b = torch.randn(num_adapters, n, r, generator=gen).to(DEVICE, torch.bfloat16)
    scales = torch.rand(num_adapters, generator=gen).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    ids = torch.randint(-1, num_adapters, (m,), generator=gen).to(DEVICE)
    return w, a, b, scales, x, ids


def capture(fn):
    """fn captured in a CUDA graph, torch's recipe: two warm-up calls on a side stream first (kernels
    compiled, cuBLAS and autograd set up outside the capture). Returns (graph, fn's captured output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_triton_multi_cuda_graph_capture_and_replay():
    """The AdapterBatch build and the op need no host sync (the id check is off during capture):
    a decode step captures in a CUDA graph, and replays with new ids and new inputs correctly."""
    lora_kernels.set_backend("triton")
    m, k, n, num_adapters, r = 64, 1024, 2048, 16, 16
    gen = torch.Generator().manual_seed(5)
    w, a, b, scales, x, ids = bf16_multi_inputs(m, k, n, num_adapters, r, gen)

    def step():
        batch = lora_kernels.AdapterBatch(ids, num_adapters)
        return lora_kernels.multi_lora_linear(x, w, None, a, b, scales, batch)

    graph, y = capture(step)
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        x.copy_(torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16))
        ids.copy_(torch.randint(-1, num_adapters, (m,), generator=g).to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, step()), f"replay {seed} differs from an eager run"


def test_triton_multi_bf16_bitwise_deterministic_and_row_order_free():
    lora_kernels.set_backend("triton")
    m, k, n, num_adapters, r = 512, 4096, 1024, 8, 16
    gen = torch.Generator().manual_seed(6)
    w, a, b, scales, x, ids = bf16_multi_inputs(m, k, n, num_adapters, r, gen)
    y1 = lora_kernels.multi_lora_linear(x, w, None, a, b, scales, ids)
    y2 = lora_kernels.multi_lora_linear(x, w, None, a, b, scales, ids)
    assert torch.equal(y1, y2)
    perm = torch.randperm(m, generator=gen).to(DEVICE)
    # the base GEMM (cuBLAS) may round a row differently at another position; compare the LoRA
    # term alone, which our kernels compute per row, through add_multi_lora_ on a zero base
    zeros = torch.zeros(m, n, device=DEVICE, dtype=torch.bfloat16)
    lora = lora_kernels.add_multi_lora_(zeros.clone(), x, a, b, scales, ids)
    lora_perm = lora_kernels.add_multi_lora_(zeros.clone(), x[perm], a, b, scales, ids[perm])
    assert torch.equal(lora[perm], lora_perm)


@pytest.mark.parametrize("m", [1, 7, 16])
def test_triton_cuda_graph_decode_step(m):
    """A decode step, lora_linear on M = 1..16 rows (bf16, no dropout), captured in a CUDA graph: each
    replay reads the new x copied into the captured input, matches float64, and equals an eager call."""
    lora_kernels.set_backend("triton")
    k, n, r = 4096, 4096, 16
    gen = torch.Generator().manual_seed(20 + m)
    w, bias, a, b = make_params(n, k, r, torch.bfloat16, True, gen)
    x = torch.zeros(m, k, device=DEVICE, dtype=torch.bfloat16)

    def step():
        return lora_kernels.lora_linear(x, w, bias, a, b, 2.0)

    with torch.no_grad():
        graph, y = capture(step)
        for replay in range(3):
            x.copy_(torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16))
            graph.replay()
            torch.cuda.synchronize()
            ref = lora_linear_reference(x.double(), w.double(), bias.double(), a.double(), b.double(), 2.0)
            assert_close(y, ref, lora_linear_reference(x, w, bias, a, b, 2.0), f"y of replay {replay}")
            assert torch.equal(y, step()), f"replay {replay} differs from an eager call"


def test_triton_cuda_graph_training_step():
    """Forward, backward and an SGD update of lora_a and lora_b captured in one CUDA graph (bf16, no
    dropout), replayed on a new x each step: after every step the adapter equals the same steps run
    eagerly, bit for bit. The loss <y, G> is linear in y, so dY = G however cuBLAS rounds the base GEMM:
    the updates depend on our kernels (deterministic) alone."""
    lora_kernels.set_backend("triton")
    m, k, n, r, steps = 256, 1024, 2048, 16, 3
    lr = 1e-4       # moves lora_a by about its own size and lora_b by ~1 % per step: visible in bf16, stable
    gen = torch.Generator().manual_seed(30)
    w, bias, a0, b0 = make_params(n, k, r, torch.bfloat16, True, gen)
    g = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16)
    xs = [torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(steps)]

    def train_step(x, a, b):
        y = lora_kernels.lora_linear(x, w, bias, a, b, 2.0)
        grad_a, grad_b = torch.autograd.grad((y.float() * g.float()).sum(), [a, b])
        with torch.no_grad():
            a.sub_(lr * grad_a)
            b.sub_(lr * grad_b)

    static_x = torch.zeros_like(xs[0])
    graphed = [a0.clone().requires_grad_(), b0.clone().requires_grad_()]
    eager = [a0.clone().requires_grad_(), b0.clone().requires_grad_()]
    graph, _ = capture(lambda: train_step(static_x, *graphed))
    with torch.no_grad():           # undo the warm-up steps (the capture itself runs nothing)
        graphed[0].copy_(a0)
        graphed[1].copy_(b0)
    for step, x in enumerate(xs):
        before = [t.detach().clone() for t in eager]
        static_x.copy_(x)
        graph.replay()
        train_step(x, *eager)
        torch.cuda.synchronize()
        for name, got, want, old in zip(("lora_a", "lora_b"), graphed, eager, before):
            assert not torch.equal(want, old), f"step {step} left {name} unchanged: the check would be vacuous"
            assert torch.equal(got, want), f"{name} after replay {step} differs from the eager step"


# ---- 64-bit offsets: an x of more than 2**31 elements -----------------------------------------------

# Row i of x (M, K) starts at element i·K: from row 2**31 // K on, that offset no longer fits in 32 bits.
INT64_K = 4096
INT64_BOUNDARY = 2**31 // INT64_K       # 524,288: the first row past element 2**31
INT64_M = INT64_BOUNDARY + 64           # x: 2**31 + 262,144 elements, 4.3 GB in bf16 (and as much for dX)
# the rows checked against float64: 64 at the start (small offsets: a control) and 64 on each side of the boundary
INT64_ROWS = [*range(64), *range(INT64_BOUNDARY - 64, INT64_M)]
CHUNK = 2**16                           # rows of x converted to float64 at a time (2 GB; all of x would be 17 GB)

needs_memory = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 32 * 2**30,
    reason="needs 32 GB of GPU memory: x and dX take 4.3 GB each, the float64 checks ~3 GB more")


@pytest.fixture
def release_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()            # back to the other test processes (pytest-xdist) sharing the GPU


def rows_and_grad(fn, x_rows, grad_rows, *args):
    """fn(x_rows, *args) and its gradient in x_rows for grad_rows: y and dX of some rows alone (row-local)."""
    x_rows = x_rows.detach().requires_grad_()
    y = fn(x_rows, *args)
    return y.detach(), torch.autograd.grad(y, x_rows, grad_rows)[0]


def float64_outer_sum(u64, x, rows=None):
    """u64ᵀ · x[rows] in float64, (r, K), for u64 (R, r) and R rows of x (all of x when rows is None)."""
    out = torch.zeros(u64.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, u64.shape[0], CHUNK):
        part = slice(start, start + CHUNK)
        out += u64[part].T @ (x[part] if rows is None else x[rows[part]]).double()
    return out


@needs_memory
@pytest.mark.parametrize("plan", [Plan("split"), Plan("fused"),
                                  Plan("fused", MatmulConfig(block_m=64, block_n=64, block_k=64, block_r=16, group_m=8,
                                                             num_warps=8, num_stages=3, split_k=2))],
                         ids=["split", "fused", "fused-splitk2"])
def test_triton_int64_offsets_lora_linear(release_memory, plan):
    """lora_linear forward and backward in bf16 on an x of more than 2**31 elements: y and dX on the rows
    around and past element 2**31 against float64, and dA, a sum over every row of x, against a float64
    sum taken in chunks. Under each strategy (an untuned GPU runs split): the fused GEMM's and the split-K
    sum's offsets too (split-K's fp32 partials of dX, (2, M, K): 17 GB more)."""
    lora_kernels.set_backend("triton")
    with tuning.forced_plan(plan):   # carried to the backward by the op (ctx.plan)
        _int64_offsets_lora_linear()


def _int64_offsets_lora_linear():
    n, r, scale = 64, 16, 2.0
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(INT64_M, INT64_K, generator=gen, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    grad_y = torch.randn(INT64_M, n, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    w, bias, a, b = make_params(n, INT64_K, r, torch.bfloat16, True, torch.Generator().manual_seed(1))
    a.requires_grad_()
    y = lora_kernels.lora_linear(x, w, bias, a, b, scale)
    grad_x, grad_a = torch.autograd.grad(y, [x, a], grad_y)
    x, a = x.detach(), a.detach()

    rows = torch.tensor(INT64_ROWS, device=DEVICE)
    y64, dx64 = rows_and_grad(lora_linear_reference, x[rows].double(), grad_y[rows].double(), w.double(),
                              bias.double(), a.double(), b.double(), scale)
    y_base, dx_base = rows_and_grad(lora_linear_reference, x[rows], grad_y[rows], w, bias, a, b, scale)
    assert_close(y[rows].detach(), y64, y_base, "y (rows around element 2**31)")
    assert_close(grad_x[rows], dx64, dx_base, "dX (rows around element 2**31)")
    # dA = s · (dY B)ᵀ x, over all M rows
    da64 = float64_outer_sum(scale * (grad_y.double() @ b.double()), x)
    assert_close(grad_a, da64, (scale * (grad_y @ b)).T @ x, "dA (a sum over every row)")


@needs_memory
def test_triton_int64_offsets_multi_lora_linear(release_memory):
    """multi_lora_linear forward and backward in bf16 on an x of more than 2**31 elements, the rows reached
    through indices sorted by adapter: y and dX on the rows around element 2**31 against float64, and each
    adapter's dA (a sum over its ~131k rows, spread over all of x) against a float64 sum in chunks."""
    lora_kernels.set_backend("triton")
    n, num_adapters, r = 64, 4, 16
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(INT64_M, INT64_K, generator=gen, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    grad_y = torch.randn(INT64_M, n, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randint(-1, num_adapters, (INT64_M,), generator=gen, device=DEVICE)
    host = torch.Generator().manual_seed(3)
    w = (torch.randn(n, INT64_K, generator=host) / INT64_K**0.5).to(DEVICE, torch.bfloat16)
    bias = torch.randn(n, generator=host).to(DEVICE, torch.bfloat16)
    a = (torch.randn(num_adapters, r, INT64_K, generator=host) / INT64_K**0.5).to(DEVICE, torch.bfloat16)
    b = (torch.randn(num_adapters, n, r, generator=host) / r**0.5).to(DEVICE, torch.bfloat16)
    scales = torch.tensor([0.5, 1.0, 1.5, 2.0], device=DEVICE)
    a.requires_grad_()
    y = lora_kernels.multi_lora_linear(x, w, bias, a, b, scales, lora_kernels.AdapterBatch(ids, num_adapters))
    grad_x, grad_a = torch.autograd.grad(y, [x, a], grad_y)
    x, a = x.detach(), a.detach()

    rows = torch.tensor(INT64_ROWS, device=DEVICE)
    y64, dx64 = rows_and_grad(multi_lora_linear_reference, x[rows].double(), grad_y[rows].double(), w.double(),
                              bias.double(), a.double(), b.double(), scales.double(), ids[rows])
    y_base, dx_base = rows_and_grad(multi_lora_linear_reference, x[rows], grad_y[rows], w, bias, a, b, scales,
                                    ids[rows])
    assert_close(y[rows].detach(), y64, y_base, "y (rows around element 2**31)")
    assert_close(grad_x[rows], dx64, dx_base, "dX (rows around element 2**31)")
    for j in range(num_adapters):      # dA[j] = s_j · (dY[rows_j] B[j])ᵀ x[rows_j]
        rows_j = (ids == j).nonzero().squeeze(1)
        u64 = scales[j].double() * (grad_y[rows_j].double() @ b[j].double())
        baseline = (scales[j] * (grad_y[rows_j] @ b[j])).T @ x[rows_j]         # bf16 throughout
        assert_close(grad_a[j], float64_outer_sum(u64, x, rows_j), baseline, f"dA[{j}]")
