"""multi_lora_linear on every backend against the per-row float64 reference: forward and every gradient.

Covers adapter distributions (one adapter, one per row, random, Zipf-like, unused adapters, the last
slot, rows of no adapter, no adapter at all), true ranks (equal, heterogeneous in one stack, 1, 0, with
random garbage past every adapter's rank), M from 0 to 300 with unsorted ids and ragged segments,
2-D / 3-D / transposed / row-sliced x, fp32 / fp16 / bf16, weight and bias gradients, gradcheck in
float64, determinism, row-permutation equivariance, agreement with lora_linear per adapter, and the
two ways to build an AdapterBatch. Shapes are small enough for the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import AdapterBatch, lora_linear, multi_lora_linear
from lora_kernels.reference import multi_lora_linear_reference

from ..helpers import DEVICE, skip_unless_backend_serves
from ..test_lora_linear import make_x
from ..tolerance import assert_close, assert_same_maths

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_NAMES = {FP32: "fp32", FP16: "fp16", BF16: "bf16"}

# Scales are multiples of 1/8 (exact in every dtype): the plain-torch baseline, which rounds the
# scale to the tested dtype, then does the same maths as the kernels.
SCALE_CHOICES = [s / 8 for s in range(-16, 17) if s != 0]
# past an adapter's true rank the stacks hold large random values: any leak would be glaring
GARBAGE = 30.0


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def make_stacks(num_adapters, n, k, r_max, dtype, has_bias, gen, ranks=None):
    """weight (N, K), bias (N,) | None, lora_a (L, r_max, K), lora_b (L, N, r_max), scales (L,) fp32.
    Entries past each adapter's true rank are random garbage, GARBAGE times larger."""
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen) if has_bias else None
    a = torch.randn(num_adapters, r_max, k, generator=gen) / k**0.5
    b = torch.randn(num_adapters, n, r_max, generator=gen) / r_max**0.5
    if ranks is not None:
        for j, r in enumerate(ranks):
            a[j, r:] *= GARBAGE
            b[j, :, r:] *= GARBAGE
    picks = torch.randint(len(SCALE_CHOICES), (num_adapters,), generator=gen)
    scales = torch.tensor([SCALE_CHOICES[i] for i in picks.tolist()], dtype=torch.float32, device=DEVICE)
    w, bias, a, b = (t.to(DEVICE, dtype) if t is not None else None for t in (w, bias, a, b))
    return w, bias, a, b, scales


def ids_for(dist: str, m: int, num_adapters: int, gen: torch.Generator) -> torch.Tensor:
    """(M,) int64 adapter ids, unsorted, drawn according to `dist`."""
    if dist == "one_adapter":
        ids = torch.full((m,), num_adapters // 2, dtype=torch.int64)
    elif dist == "row_per_adapter":           # every row its own adapter, in shuffled order
        assert m == num_adapters
        ids = torch.randperm(m, generator=gen)
    elif dist == "random":
        ids = torch.randint(-1, num_adapters, (m,), generator=gen)
    elif dist == "zipf":                      # a few adapters own most rows; the tail gets one or none
        weights = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float64) ** 1.5
        order = torch.randperm(num_adapters, generator=gen)           # the popular ones anywhere
        ids = order[torch.multinomial(weights, m, replacement=True, generator=gen)]
    elif dist == "some_unused":               # adapters 0, 2, 3, 5, ... never appear
        used = torch.tensor([1, 4] + list(range(7, num_adapters, 3)))
        ids = used[torch.randint(len(used), (m,), generator=gen)]
    elif dist == "last_slot":                 # the last slot of the stack (and slot 0) in use
        ids = torch.where(torch.rand(m, generator=gen) < 0.7, num_adapters - 1, 0)
    elif dist == "base_mixed":                # half the rows have no adapter
        ids = torch.randint(0, num_adapters, (m,), generator=gen)
        ids[torch.rand(m, generator=gen) < 0.5] = -1
    elif dist == "all_base":
        ids = torch.full((m,), -1, dtype=torch.int64)
    else:
        raise ValueError(dist)
    return ids.to(DEVICE)


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """x flattened to (M, K) exactly as the op does (copied only when the last stride is not 1)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------

def check_against_reference(x, w, bias, a, b, scales, ids, *, adapters=None, ranks=None, grad_w=False,
                            grad_seed=7):
    """Runs multi_lora_linear (with `adapters`, default the raw ids) with grads on x, lora_a, lora_b
    (and weight, bias when grad_w); compares output and gradients with the per-row float64 reference,
    the baseline being the same reference in x's dtype. Also checks, exactly: rows of no adapter equal
    F.linear; unused adapters and entries past an adapter's rank get zero gradients.
    Returns (y, {name: grad})."""
    names = ["x", "lora_a", "lora_b"]
    if grad_w:
        names.append("weight")
        if bias is not None:
            names.append("bias")
    num_adapters, r_max = a.shape[0], a.shape[1]

    def run(fn, cast, adapter_arg, ref_ranks):
        args = {name: (cast(t) if t is not None else None) for name, t in
                {"x": x, "weight": w, "bias": bias, "lora_a": a, "lora_b": b}.items()}
        for name in names:
            args[name] = args[name].detach().requires_grad_(True)
        extra = {} if ref_ranks is None else {"ranks": ref_ranks}
        s = scales if cast(x).dtype != torch.float64 else scales.double()
        y = fn(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], s, adapter_arg, **extra)
        return y, args

    ref_ranks = None if ranks is None else torch.as_tensor(ranks)
    y, args = run(multi_lora_linear, lambda t: t, ids if adapters is None else adapters, None)
    y64, args64 = run(multi_lora_linear_reference, lambda t: t.detach().double(), ids, ref_ranks)
    y_base, args_base = run(multi_lora_linear_reference, lambda t: t.detach(), ids, ref_ranks)
    assert y.shape == (*x.shape[:-1], w.shape[0])
    assert y.dtype == x.dtype and y.device == x.device
    assert_close(y, y64, y_base, "y")

    # rows of no adapter: the base layer's own output, bit for bit
    base_rows = ids < 0
    if base_rows.any():
        expected = F.linear(flat_rows(x), w, bias)
        y2d = y.reshape(-1, w.shape[0])
        assert torch.equal(y2d[base_rows], expected[base_rows]), "rows with adapter -1 differ from F.linear"

    grad_y64 = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
    grad_y = grad_y64.to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [args[n] for n in names], grad_y)
    # the reference leaves the stacks out of the graph when no row uses an adapter: zero gradients
    grads64 = torch.autograd.grad(y64, [args64[n] for n in names], grad_y64.to(y64.device),
                                  allow_unused=True, materialize_grads=True)
    grads_base = torch.autograd.grad(y_base, [args_base[n] for n in names], grad_y,
                                     allow_unused=True, materialize_grads=True)
    for name, g, g64, g_base in zip(names, grads, grads64, grads_base):
        assert_close(g, g64, g_base, f"d{name}")

    # exact zeros: adapters with no rows, and everything past an adapter's true rank
    grads = dict(zip(names, grads))
    used = set(ids[ids >= 0].tolist())
    for j in range(num_adapters):
        r = r_max if ranks is None else min(int(ranks[j]), r_max)
        if j not in used:
            r = 0
        assert torch.count_nonzero(grads["lora_a"][j, r:]) == 0, f"dA[{j}, {r}:] must be zero"
        assert torch.count_nonzero(grads["lora_b"][j, :, r:]) == 0, f"dB[{j}, :, {r}:] must be zero"
    return y, grads


# ---------------------------------------------------------------------------------------------
# adapter distributions
# ---------------------------------------------------------------------------------------------

# dist -> (M, L)
DISTRIBUTIONS = {
    "one_adapter": (96, 5),
    "row_per_adapter": (40, 40),
    "random": (150, 7),
    "zipf": (200, 16),
    "some_unused": (96, 11),
    "last_slot": (64, 9),
    "base_mixed": (120, 6),
    "all_base": (50, 4),
}
LAYOUTS = ["2d", "3d", "transposed", "row_sliced"]


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_adapter_distributions(backend, dist):
    dtype = FP32
    skip_unless_backend_serves(backend, dtype)
    case = list(DISTRIBUTIONS).index(dist)
    m, num_adapters = DISTRIBUTIONS[dist]
    gen = torch.Generator().manual_seed(100 + case)
    ids = ids_for(dist, m, num_adapters, gen)
    x = make_x(m, 40, LAYOUTS[case % len(LAYOUTS)], dtype, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, 24, 40, 8, dtype, case % 2 == 0, gen)
    y, grads = check_against_reference(x, w, bias, a, b, scales, ids)
    if dist == "all_base":
        assert torch.equal(y.reshape(m, -1), F.linear(flat_rows(x), w, bias))
        assert torch.count_nonzero(grads["lora_a"]) == 0 and torch.count_nonzero(grads["lora_b"]) == 0


# ---------------------------------------------------------------------------------------------
# ranks
# ---------------------------------------------------------------------------------------------

# name -> (r_max, ranks or None, dtype)
RANK_CASES = {
    "equal": (8, None, FP32),
    "equal_explicit": (8, [8, 8, 8, 8], FP32),
    "heterogeneous": (16, [1, 8, 12, 16], FP32),
    "heterogeneous_fp16": (16, [1, 8, 12, 16], FP16),
    "heterogeneous_below_r_max": (20, [12, 1, 16, 8], FP32),
    "rank1": (1, None, FP32),
    "rank1_in_wide_stack": (16, [1, 1, 1, 1], FP32),
    "rank0_adapter": (8, [0, 8, 3, 5], FP32),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
def test_ranks(backend, case):
    r_max, ranks, dtype = RANK_CASES[case]
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(200 + list(RANK_CASES).index(case))
    m, k, n, num_adapters = 90, 33, 20, 4
    ids = ids_for("random", m, num_adapters, gen)
    x = make_x(m, k, "2d", dtype, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, n, k, r_max, dtype, True, gen, ranks)
    adapters = ids if ranks is None else AdapterBatch(ids, num_adapters, ranks=ranks)
    check_against_reference(x, w, bias, a, b, scales, ids, adapters=adapters, ranks=ranks)


@pytest.mark.parametrize("used", [1, 3, 4, 12])
def test_few_or_many_of_a_large_stack_with_ranks(backend, used):
    """Few adapters of a 12-adapter stack in use (the torch backend takes one view per active
    adapter below a third of the stack, bulk views from there on), ranks 1..16 mixed, some rows on
    no adapter: forward and gradients against the reference on either side of that threshold."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(230 + used)
    m, k, n, num_adapters, r_max = 70, 36, 22, 12, 16
    ranks = [1, 16, 8, 12, 3, 16, 5, 16, 2, 9, 16, 4]
    chosen = torch.randperm(num_adapters, generator=gen)[:used]
    ids = chosen[torch.randint(used, (m,), generator=gen)]
    ids[torch.rand(m, generator=gen) < 0.2] = -1
    ids = ids.to(DEVICE)
    x = make_x(m, k, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, n, k, r_max, FP32, True, gen, ranks)
    check_against_reference(x, w, bias, a, b, scales, ids, adapters=AdapterBatch(ids, num_adapters, ranks=ranks),
                            ranks=ranks)


def test_ranks_as_tensor_or_list_and_full_ranks_equal_none(backend):
    """ranks given as a list or an int64 tensor give the same result; ranks all r_max equals no ranks."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(210)
    ids = ids_for("random", 40, 3, gen)
    x = make_x(40, 24, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(3, 16, 24, 8, FP32, True, gen)
    y_list = multi_lora_linear(x, w, bias, a, b, scales, AdapterBatch(ids, 3, ranks=[2, 8, 5]))
    y_tensor = multi_lora_linear(x, w, bias, a, b, scales, AdapterBatch(ids, 3, ranks=torch.tensor([2, 8, 5])))
    assert torch.equal(y_list, y_tensor)
    y_full = multi_lora_linear(x, w, bias, a, b, scales, AdapterBatch(ids, 3, ranks=[8, 8, 8]))
    y_none = multi_lora_linear(x, w, bias, a, b, scales, ids)
    torch.testing.assert_close(y_full, y_none, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# sizes, layouts, dtypes
# ---------------------------------------------------------------------------------------------

# (M, K, N, L, r_max, layout, dtype): M from 0 to 300, odd sizes where masks matter
SHAPES = [
    (0, 17, 11, 3, 8, "2d", FP32),
    (0, 17, 11, 3, 8, "3d", FP16),
    (1, 1, 1, 2, 1, "2d", FP32),
    (1, 64, 130, 3, 16, "row_sliced", FP16),
    (7, 17, 11, 4, 12, "3d", FP32),
    (7, 17, 11, 4, 12, "transposed", BF16),
    (64, 64, 64, 8, 16, "transposed", FP32),
    (100, 40, 50, 3, 72, "2d", FP32),          # rank past one rank tile
    (257, 17, 130, 8, 4, "transposed", FP16),
    (300, 33, 20, 5, 8, "row_sliced", FP32),
    (300, 128, 96, 6, 16, "3d", FP16),
    (33, 64, 64, 6, 16, "row_sliced", BF16),
    (9, 4095, 11, 3, 12, "2d", FP32),          # K split over several programs
]


def _shape_id(s):
    return "M{}_K{}_N{}_L{}_r{}_{}_{}".format(*s[:6], DTYPE_NAMES[s[6]])


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_shapes_layouts_dtypes(backend, shape):
    m, k, n, num_adapters, r_max, layout, dtype = shape
    skip_unless_backend_serves(backend, dtype)
    case = SHAPES.index(shape)
    gen = torch.Generator().manual_seed(300 + case)
    ids = ids_for("random", m, num_adapters, gen)
    if case % 2:
        ids = ids.to(torch.int32)
    x = make_x(m, k, layout, dtype, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, n, k, r_max, dtype, case % 3 != 1, gen)
    check_against_reference(x, w, bias, a, b, scales, ids)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=lambda d: DTYPE_NAMES[d])
def test_frozen_layer_gradients_when_asked(backend, dtype):
    """weight and bias get gradients too when they require grad; heterogeneous ranks, -1 rows."""
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(400)
    ranks = [4, 1, 8, 0, 6]
    ids = ids_for("random", 60, 5, gen)
    x = make_x(60, 48, "3d", dtype, gen)
    w, bias, a, b, scales = make_stacks(5, 20, 48, 8, dtype, True, gen, ranks)
    check_against_reference(x, w, bias, a, b, scales, ids, adapters=AdapterBatch(ids, 5, ranks=ranks),
                            ranks=ranks, grad_w=True)


def test_only_requested_gradients(backend):
    """Frozen x, lora_a: only dB is computed, and it is right."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(410)
    ids = ids_for("base_mixed", 30, 4, gen)
    x = make_x(30, 24, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(4, 16, 24, 4, FP32, True, gen)
    b.requires_grad_(True)
    y = multi_lora_linear(x, w, bias, a, b, scales, ids)
    grad_y = torch.randn(y.shape, generator=gen).to(DEVICE)
    (grad_b,) = torch.autograd.grad(y, [b], grad_y)
    b64 = b.detach().double().requires_grad_(True)
    y64 = multi_lora_linear_reference(x.double(), w.double(), bias.double(), a.double(), b64, scales.double(), ids)
    (grad_b64,) = torch.autograd.grad(y64, [b64], grad_y.double())
    b32 = b.detach().clone().requires_grad_(True)
    y32 = multi_lora_linear_reference(x, w, bias, a, b32, scales, ids)
    (grad_b32,) = torch.autograd.grad(y32, [b32], grad_y)
    assert_close(grad_b, grad_b64, grad_b32, "dB with frozen x, A")
    assert x.grad is None and a.grad is None


def test_inference_path(backend):
    """Nothing requires grad, or everything does under torch.no_grad: the call works, builds no graph,
    and gives the same output as the training path."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(420)
    ids = ids_for("random", 45, 5, gen)
    x = make_x(45, 32, "3d", FP32, gen)
    w, bias, a, b, scales = make_stacks(5, 24, 32, 8, FP32, True, gen, ranks=[8, 3, 1, 8, 5])
    batch = AdapterBatch(ids, 5, ranks=[8, 3, 1, 8, 5])
    y_inference = multi_lora_linear(x, w, bias, a, b, scales, batch)
    assert not y_inference.requires_grad
    y64 = multi_lora_linear_reference(x.double(), w.double(), bias.double(), a.double(), b.double(),
                                      scales.double(), ids, ranks=[8, 3, 1, 8, 5])
    y_base = multi_lora_linear_reference(x, w, bias, a, b, scales, ids, ranks=[8, 3, 1, 8, 5])
    assert_close(y_inference, y64, y_base, "y (inference)")

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, bias, a, b)]
    with torch.no_grad():
        y_no_grad = multi_lora_linear(*leaves, scales, batch)
    assert y_no_grad.grad_fn is None and not y_no_grad.requires_grad
    assert torch.equal(y_no_grad, y_inference)
    y_train = multi_lora_linear(*leaves, scales, batch)
    assert y_train.requires_grad
    torch.testing.assert_close(y_train.detach(), y_inference, rtol=1e-6, atol=1e-6)


def test_gradcheck_float64_fallback():
    """Only the torch backend serves float64. Heterogeneous ranks (a zero one), -1 rows, an unused
    adapter, 3-D x, weight and bias gradients."""
    lora_kernels.set_backend("torch")
    gen = torch.Generator().manual_seed(430)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(True)

    x, w, bias = leaf(2, 4, 6), leaf(5, 6), leaf(5)
    a, b = leaf(4, 3, 6), leaf(4, 5, 3)
    scales = torch.tensor([0.5, -1.25, 2.0, 0.75], dtype=torch.float64)
    ids = torch.tensor([0, -1, 2, 1, 0, 1, -1, 2])            # adapter 3 unused
    batch = AdapterBatch(ids, 4, ranks=[3, 1, 0, 2])
    assert torch.autograd.gradcheck(lambda *t: multi_lora_linear(*t, scales, batch), (x, w, bias, a, b))
    assert torch.autograd.gradcheck(lambda *t: multi_lora_linear(*t, None, a, b, scales, ids), (x, w))
    assert torch.autograd.gradcheck(lambda *t: multi_lora_linear(x, w, bias, *t, scales, ids), (a, b))


def test_float64_matches_reference_tightly():
    lora_kernels.set_backend("torch")
    gen = torch.Generator().manual_seed(440)
    ids = ids_for("random", 37, 4, gen)
    x = make_x(37, 64, "2d", torch.float64, gen).requires_grad_(True)
    w, bias, a, b, scales = make_stacks(4, 48, 64, 8, torch.float64, True, gen, ranks=[8, 2, 5, 8])
    a.requires_grad_(True)
    b.requires_grad_(True)
    grad_y = torch.randn(37, 48, dtype=torch.float64, generator=gen)
    y = multi_lora_linear(x, w, bias, a, b, scales, AdapterBatch(ids, 4, ranks=[8, 2, 5, 8]))
    y_ref = multi_lora_linear_reference(x, w, bias, a, b, scales, ids, ranks=[8, 2, 5, 8])
    for ours, ref in zip((y, *torch.autograd.grad(y, [x, a, b], grad_y)),
                         (y_ref, *torch.autograd.grad(y_ref, [x, a, b], grad_y))):
        assert_same_maths(ours, ref)                    # float64: 1e-12


# ---------------------------------------------------------------------------------------------
# determinism, permutations, agreement with lora_linear and between backends
# ---------------------------------------------------------------------------------------------

def _forward_backward(x, w, bias, a, b, scales, adapters, grad_y):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    y = multi_lora_linear(leaves[0], w, bias, leaves[1], leaves[2], scales, adapters)
    return (y.detach(), *torch.autograd.grad(y, leaves, grad_y))


def test_bit_identical_repeats(backend):
    """Deterministic: no atomics, fixed reduction order; output and every gradient."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(500)
    ids = ids_for("zipf", 120, 6, gen)
    x = make_x(120, 64, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(6, 40, 64, 16, FP32, True, gen, ranks=[16, 4, 9, 1, 16, 12])
    batch = AdapterBatch(ids, 6, ranks=[16, 4, 9, 1, 16, 12])
    grad_y = torch.randn(120, 40, generator=gen).to(DEVICE)
    first = _forward_backward(x, w, bias, a, b, scales, batch, grad_y)
    second = _forward_backward(x, w, bias, a, b, scales, batch, grad_y)
    for name, one, two in zip(("y", "dx", "dA", "dB"), first, second):
        assert torch.equal(one, two), f"{name} differs between two identical calls"


def test_row_permutation_equivariance(backend):
    """Permuting rows and ids permutes y and dx; dA and dB (sums over rows) are unchanged up to
    rounding. y and dx are checked to a tight tolerance only: both backends compute the base layer
    (and dX's dY W0) with torch's GEMM, and a CPU BLAS is not bitwise equivariant: a plain fp32
    `X[p] @ A.T` differs from `(X @ A.T)[p]` by a few ulp for some shapes (about 1 in 15 random shapes
    with M < 70; which ones depends on the CPU: this test's y failed bitwise on one AMD EPYC and passed
    on another), and the torch backend runs each adapter's gathered rows through such small GEMMs.
    Triton on a GPU: the LoRA term alone (add_multi_lora_ into zeros: no base GEMM) is bitwise
    independent of where a row sits. Not under the interpreter: its tl.dot is numpy's matmul, whose
    BLAS rounds a row differently at another position in the tile (measured: 200 of 200 random
    (16, 48) @ (48, 8) products with numpy 2.4 on an AMD EPYC; CI had passed on another EPYC)."""
    dtype = FP32
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(510)
    m, num_adapters = 97, 5
    ids = ids_for("random", m, num_adapters, gen)
    x = make_x(m, 48, "2d", dtype, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, 36, 48, 8, dtype, True, gen, ranks=[8, 2, 5, 8, 1])
    ranks = [8, 2, 5, 8, 1]
    grad_y = torch.randn(m, 36, generator=gen).to(DEVICE)
    perm = torch.randperm(m, generator=gen).to(DEVICE)
    y, dx, da, db = _forward_backward(x, w, bias, a, b, scales, AdapterBatch(ids, num_adapters, ranks=ranks), grad_y)
    y_p, dx_p, da_p, db_p = _forward_backward(
        x[perm], w, bias, a, b, scales, AdapterBatch(ids[perm], num_adapters, ranks=ranks), grad_y[perm])
    assert_same_maths(y_p, y[perm])
    assert_same_maths(dx_p, dx[perm])
    if backend == "triton" and DEVICE.type == "cuda":   # the LoRA term alone (no base GEMM): bitwise
        with torch.no_grad():
            term = lora_kernels.add_multi_lora_(torch.zeros_like(y), x, a, b, scales,
                                                AdapterBatch(ids, num_adapters, ranks=ranks))
            term_p = lora_kernels.add_multi_lora_(torch.zeros_like(y), x[perm], a, b, scales,
                                                  AdapterBatch(ids[perm], num_adapters, ranks=ranks))
        assert torch.equal(term_p, term[perm]), "the LoRA term of a row depends on where the row sits"
    assert_same_maths(da_p, da)
    assert_same_maths(db_p, db)


def test_matches_lora_linear_per_adapter(backend):
    """Each adapter's rows give what lora_linear gives with that adapter's (rank-trimmed) weights;
    rows of no adapter give F.linear exactly."""
    dtype = FP32
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(520)
    m, k, n, num_adapters, ranks = 80, 40, 30, 4, [6, 1, 12, 9]
    ids = ids_for("base_mixed", m, num_adapters, gen)
    x = make_x(m, k, "row_sliced", dtype, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, n, k, 12, dtype, True, gen, ranks)
    y = multi_lora_linear(x, w, bias, a, b, scales, AdapterBatch(ids, num_adapters, ranks=ranks))
    for j, r in enumerate(ranks):
        rows = (ids == j).nonzero()[:, 0]
        assert rows.numel() > 0
        y_single = lora_linear(x[rows], w, bias, a[j, :r].contiguous(), b[j, :, :r].contiguous(), float(scales[j]))
        assert_same_maths(y[rows], y_single, msg=f"adapter {j}")
    base_rows = ids < 0
    assert torch.equal(y[base_rows], F.linear(x, w, bias)[base_rows])


def test_backends_agree_on_cpu_fp32():
    """Triton (interpreted) and torch give the same answer to fp32 rounding, gradients included."""
    skip_unless_backend_serves("triton", FP32)
    gen = torch.Generator().manual_seed(530)
    ids = ids_for("zipf", 70, 8, gen)
    x = make_x(70, 50, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(8, 44, 50, 12, FP32, True, gen, ranks=[12, 1, 4, 12, 8, 0, 7, 3])
    batch = AdapterBatch(ids, 8, ranks=[12, 1, 4, 12, 8, 0, 7, 3])
    grad_y = torch.randn(70, 44, generator=gen).to(DEVICE)
    results = {}
    for name in ("torch", "triton"):
        lora_kernels.set_backend(name)
        results[name] = _forward_backward(x, w, bias, a, b, scales, batch, grad_y)
    for what, ours, theirs in zip(("y", "dx", "dA", "dB"), results["triton"], results["torch"]):
        assert_same_maths(ours, theirs, msg=what)


# ---------------------------------------------------------------------------------------------
# AdapterBatch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_adapter_batch_metadata(index_dtype):
    ids = torch.tensor([2, -1, 0, 2, 1, 0, -1, 2], dtype=index_dtype)
    batch = AdapterBatch(ids, 4)
    assert batch.num_rows == 8 and batch.num_adapters == 4
    assert batch.sorted_rows.tolist() == [2, 5, 4, 0, 3, 7, 1, 6]      # stable by adapter, -1 last
    assert batch.adapter_starts.tolist() == [0, 2, 3, 6, 6]
    assert batch.counts.tolist() == [2, 1, 3, 0]
    assert batch.active.tolist() == [True, True, True, False]
    assert batch.adapter_ids.tolist() == ids.tolist()
    assert batch.ranks is None
    assert batch.segment_adapters is None and batch.num_segments == 4
    assert torch.equal(batch.segment_rows, batch.sorted_rows)
    assert torch.equal(batch.segment_starts, batch.adapter_starts)
    assert AdapterBatch(ids, 4, ranks=[3, 0, 1, 2]).ranks.tolist() == [3, 0, 1, 2]

    # segments: adapter 1 owns two segments, one -1 segment, an empty one
    seg = AdapterBatch.from_segments(torch.tensor([0, 2, 3, 3, 6], dtype=index_dtype),
                                     torch.tensor([1, -1, 0, 1], dtype=index_dtype), 3)
    assert seg.num_rows == 6 and seg.num_segments == 4
    assert seg.adapter_ids.tolist() == [1, 1, -1, 1, 1, 1]
    assert seg.sorted_rows.tolist() == [0, 1, 3, 4, 5, 2]
    assert seg.adapter_starts.tolist() == [0, 0, 5, 5]
    assert seg.counts.tolist() == [0, 5, 0]
    assert seg.active.tolist() == [False, True, False]
    assert seg.segment_rows.tolist() == list(range(6))
    assert seg.segment_starts.tolist() == [0, 2, 3, 3, 6]
    assert seg.segment_adapters.tolist() == [1, -1, 0, 1]
    # num_rows given explicitly, the same batch
    explicit = AdapterBatch.from_segments(torch.tensor([0, 2, 3, 3, 6]), torch.tensor([1, -1, 0, 1]), 3, num_rows=6)
    assert torch.equal(explicit.sorted_rows, seg.sorted_rows)
    # no rows at all
    empty = AdapterBatch(torch.empty(0, dtype=index_dtype), 3)
    assert empty.counts.tolist() == [0, 0, 0] and empty.sorted_rows.numel() == 0


def test_int32_and_int64_ids_agree(backend):
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(600)
    ids = ids_for("random", 50, 5, gen)
    x = make_x(50, 24, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(5, 20, 24, 4, FP32, True, gen)
    grad_y = torch.randn(50, 20, generator=gen).to(DEVICE)
    out64 = _forward_backward(x, w, bias, a, b, scales, ids, grad_y)
    out32 = _forward_backward(x, w, bias, a, b, scales, ids.to(torch.int32), grad_y)
    batch32 = _forward_backward(x, w, bias, a, b, scales, AdapterBatch(ids.to(torch.int32), 5), grad_y)
    for what, one, two, three in zip(("y", "dx", "dA", "dB"), out64, out32, batch32):
        assert torch.equal(one, two), what
        assert torch.equal(one, three), what


def _ragged_segments(gen):
    """Ragged segment lengths (empty ones too), adapters repeated across segments, -1 segments."""
    lengths = torch.tensor([5, 0, 17, 1, 33, 2, 0, 9, 24, 3, 11, 1])
    adapters = torch.tensor([3, 1, -1, 0, 3, 5, 2, -1, 1, 3, 0, 5])     # adapters 2 (empty) and 4 unused
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return starts.to(DEVICE), adapters.to(DEVICE), int(lengths.sum())


def test_from_segments_against_reference(backend):
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(610)
    starts, adapters, m = _ragged_segments(gen)
    num_adapters, ranks = 6, [4, 8, 2, 1, 8, 5]
    batch = AdapterBatch.from_segments(starts, adapters, num_adapters, ranks=ranks)
    ids = batch.adapter_ids
    x = make_x(m, 40, "3d", FP32, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, 30, 40, 8, FP32, True, gen, ranks)
    check_against_reference(x, w, bias, a, b, scales, ids, adapters=batch, ranks=ranks, grad_w=True)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=lambda d: DTYPE_NAMES[d])
def test_from_segments_equals_from_ids(backend, dtype):
    """The same rows, grouped by the caller (segments over rows in place) or by the library (from ids,
    raw or in an AdapterBatch): the same outputs and gradients. Bitwise on the torch backend (both
    walk the same by-adapter view); to a tight tolerance on triton (its forward walks segments)."""
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(620)
    starts, adapters, m = _ragged_segments(gen)
    num_adapters = 6
    ids = torch.repeat_interleave(adapters, starts[1:] - starts[:-1])
    x = make_x(m, 32, "2d", dtype, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, 24, 32, 8, dtype, True, gen)
    grad_y = torch.randn(m, 24, generator=gen).to(DEVICE, dtype)
    from_segments = _forward_backward(x, w, bias, a, b, scales,
                                      AdapterBatch.from_segments(starts, adapters, num_adapters), grad_y)
    from_batch = _forward_backward(x, w, bias, a, b, scales, AdapterBatch(ids, num_adapters), grad_y)
    from_ids = _forward_backward(x, w, bias, a, b, scales, ids, grad_y)
    for what, seg, bat, raw in zip(("y", "dx", "dA", "dB"), from_segments, from_batch, from_ids):
        assert torch.equal(bat, raw), what
        if backend == "torch":
            assert torch.equal(seg, bat), what
        else:
            assert_same_maths(seg, bat, msg=what)      # fp32 1e-5, fp16 2e-3


def test_batch_reused_for_two_layers(backend):
    """One AdapterBatch (with ranks) serves two stacked layers of different shapes; gradients flow
    through both to x and to both layers' adapters."""
    dtype = FP32
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(630)
    m, num_adapters, ranks = 72, 5, [4, 1, 8, 0, 6]
    ids = ids_for("random", m, num_adapters, gen)
    batch = AdapterBatch(ids, num_adapters, ranks=ranks)
    x = make_x(m, 32, "3d", dtype, gen)
    layer1 = make_stacks(num_adapters, 48, 32, 8, dtype, True, gen, ranks)
    layer2 = make_stacks(num_adapters, 20, 48, 8, dtype, False, gen, ranks)

    def run(fn, cast, adapter_arg, **extra):
        x_ = cast(x).requires_grad_(True)
        params = [[cast(t) if t is not None else None for t in layer[:4]] + [layer[4]] for layer in (layer1, layer2)]
        for p in params:
            p[2].requires_grad_(True)
            p[3].requires_grad_(True)
            if p[0].dtype == torch.float64:
                p[4] = p[4].double()
        h = fn(x_, *params[0], adapter_arg, **extra)
        y = fn(h, *params[1], adapter_arg, **extra)
        leaves = [x_, params[0][2], params[0][3], params[1][2], params[1][3]]
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y) / 3)
        return y, grads

    y, grads = run(multi_lora_linear, lambda t: t.detach().clone(), batch)
    y64, grads64 = run(multi_lora_linear_reference, lambda t: t.detach().double(), ids, ranks=ranks)
    y_base, grads_base = run(multi_lora_linear_reference, lambda t: t.detach().clone(), ids, ranks=ranks)
    assert_close(y, y64, y_base, "y")
    for name, g, g64, g_base in zip(("dx", "dA1", "dB1", "dA2", "dB2"), grads, grads64, grads_base):
        assert_close(g, g64, g_base, name)
    # the batch is not consumed: a third call gives the first layer's output again, bit for bit
    h_again = multi_lora_linear(x, *layer1, batch)
    assert torch.equal(h_again, multi_lora_linear(x, *layer1, batch))


# ---------------------------------------------------------------------------------------------
# strided parameters and metadata
# ---------------------------------------------------------------------------------------------

def _strided_params(gen, num_adapters, n, k, r, dtype):
    """weight a transposed view, bias a strided view, lora_a a slice of a wider buffer, lora_b a
    transposed view: none of them contiguous."""
    w = (torch.randn(k, n, generator=gen) / k**0.5).to(DEVICE, dtype).T
    bias = torch.randn(n, 2, generator=gen).to(DEVICE, dtype)[:, 0]
    a = (torch.randn(num_adapters, r + 3, k + 2, generator=gen) / k**0.5).to(DEVICE, dtype)[:, 1:r + 1, 2:]
    b = (torch.randn(num_adapters, r, n, generator=gen) / r**0.5).to(DEVICE, dtype).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (w, bias, a, b))
    return w, bias, a, b


def test_strided_weight_bias_and_stacks(backend):
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(700)
    ids = ids_for("random", 40, 4, gen)
    x = make_x(40, 24, "row_sliced", FP32, gen)
    w, bias, a, b = _strided_params(gen, 4, 20, 24, 8, FP32)
    scales = torch.tensor([0.5, -1.25, 2.0, 0.75], device=DEVICE)
    check_against_reference(x, w, bias, a, b, scales, ids, grad_w=True)


@pytest.mark.parametrize("scales_layout", ["strided", "expanded"])
def test_strided_scales(backend, scales_layout):
    """scales a strided view (every other entry of a longer tensor) or an expanded scalar (stride 0):
    read through its stride, like every other input."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(710)
    ids = ids_for("random", 40, 4, gen)
    x = make_x(40, 24, "2d", FP32, gen)
    w, bias, a, b, _ = make_stacks(4, 20, 24, 8, FP32, True, gen)
    if scales_layout == "strided":
        scales = torch.tensor([0.5, 9.0, -1.25, 9.0, 2.0, 9.0, 0.75, 9.0], device=DEVICE)[::2]
    else:
        scales = torch.tensor([0.75], device=DEVICE).expand(4)
    check_against_reference(x, w, bias, a, b, scales, ids)


def test_strided_int32_ranks(backend):
    """ranks an int32 strided view (AdapterBatch keeps int32 ranks without a copy)."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(720)
    ranks_view = torch.tensor([8, 99, 3, 99, 5, 99, 1, 99], dtype=torch.int32)[::2]
    ranks = ranks_view.tolist()
    ids = ids_for("random", 40, 4, gen)
    x = make_x(40, 24, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(4, 20, 24, 8, FP32, True, gen, ranks)
    check_against_reference(x, w, bias, a, b, scales, ids, adapters=AdapterBatch(ids, 4, ranks=ranks_view),
                            ranks=ranks)


def test_strided_int32_segment_starts(backend):
    """segment_starts an int32 strided view (it once reached the kernels as a view: misread there)."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(721)
    starts_view = torch.tensor([0, 99, 10, 99, 15, 99, 40, 99], dtype=torch.int32)[::2]
    seg_adapters = torch.tensor([1, -1, 3])
    ids = torch.repeat_interleave(seg_adapters, torch.tensor([10, 5, 25]))
    x = make_x(40, 24, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(4, 20, 24, 8, FP32, True, gen, None)
    batch = AdapterBatch.from_segments(starts_view.to(DEVICE), seg_adapters.to(DEVICE), 4)
    check_against_reference(x, w, bias, a, b, scales, ids.to(DEVICE), adapters=batch)


@pytest.mark.parametrize("segments", [False, True], ids=["from_ids", "from_segments"])
def test_many_segments(backend, segments):
    """Many short segments (101 over 160 rows: about a third empty, the others one to five rows, adapters
    repeated and -1), so most row tiles of the tile map are partial and belong to a segment far
    from the first: each program must find its own segment, not a neighbour's."""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(730)
    num_adapters, m, num_segments = 37, 160, 101
    x = make_x(m, 24, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, 20, 24, 8, FP32, True, gen)
    if segments:
        cuts = torch.sort(torch.randint(0, m + 1, (num_segments - 1,), generator=gen)).values
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), m)])
        seg_adapters = torch.randint(-1, num_adapters, (num_segments,), generator=gen)
        ids = torch.repeat_interleave(seg_adapters, starts[1:] - starts[:-1]).to(DEVICE)
        adapters = AdapterBatch.from_segments(starts.to(DEVICE), seg_adapters.to(DEVICE), num_adapters)
        assert (starts[1:] == starts[:-1]).sum() >= 20   # empty segments among them
    else:
        ids = ids_for("random", m, num_adapters, gen)
        adapters = ids
    check_against_reference(x, w, bias, a, b, scales, ids, adapters=adapters)


def test_rank_zero_adapter_rows_keep_their_bits(backend):
    """A rank-0 adapter adds nothing, and its rows are not rewritten: infinite factors on it (never
    read at rank 0: a 0 x inf) must not reach them, and they equal F.linear bit for bit. (This test
    once put an infinite scale on the adapter; scales must now be finite: tests/test_nonfinite.py.)"""
    skip_unless_backend_serves(backend, FP32)
    gen = torch.Generator().manual_seed(740)
    ids = ids_for("random", 50, 3, gen)
    x = make_x(50, 24, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(3, 20, 24, 8, FP32, True, gen)
    a[1], b[1] = float("inf"), float("inf")
    y = multi_lora_linear(x, w, bias, a, b, scales, AdapterBatch(ids, 3, ranks=[8, 0, 5]))
    rows = ids == 1
    assert rows.any()
    assert torch.equal(y[rows], torch.nn.functional.linear(x, w, bias)[rows])
    assert torch.isfinite(y).all()
