"""lora_linear on every backend against the float64 reference: forward and every gradient.

Grid: K in {1, 17, 64, 255, 4095}, N in {1, 11, 64, 130}, r in {1, 8, 12, 16, 64, 72, 100},
M in {0, 1, 7, 64, 300},
2-D / 3-D / transposed / row-sliced x, bias or None, scale 0.5 / 0 / negative. Shapes are small
enough for the Triton interpreter; on a GPU the same grid runs with bf16 too.
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels import lora_linear
from lora_kernels.reference import lora_linear_reference

from .helpers import DEVICE, skip_unless_backend_serves
from .tolerance import assert_close, assert_same_maths

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (M, K, N, r): every value of each axis appears; odd sizes where masks matter
SHAPES = [
    (0, 17, 11, 8),
    (1, 1, 1, 1),
    (1, 64, 130, 16),
    (7, 17, 11, 12),
    (7, 4095, 11, 1),
    (64, 64, 64, 64),
    (64, 255, 11, 12),
    (300, 17, 130, 8),
    (300, 64, 1, 16),
    (33, 64, 64, 16),
    (100, 40, 50, 100),   # rank past one rank tile: the shrink and the epilogue loop over r
    (300, 33, 20, 72),
]
LAYOUTS = ["2d", "3d", "transposed", "row_sliced"]


def make_x(m: int, k: int, layout: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """x with M rows of K features in the requested memory layout, a leaf tensor's view."""
    if layout == "2d":
        return torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    if layout == "3d":          # (batch, seq, K) with the rows split over two leading dims
        if m % 2:
            return torch.randn(1, m, k, generator=gen).to(DEVICE, dtype)
        return torch.randn(2, m // 2, k, generator=gen).to(DEVICE, dtype)
    if layout == "transposed":  # last stride != 1: the op must copy it
        return torch.randn(k, m, generator=gen).to(DEVICE, dtype).T
    if layout == "row_sliced":  # a column slice of a wider activation: rows strided, last stride 1
        return torch.randn(m, k + 5, generator=gen).to(DEVICE, dtype)[:, 3:3 + k]
    raise ValueError(layout)


def make_params(n, k, r, dtype, has_bias, gen):
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen) if has_bias else None
    a = torch.randn(r, k, generator=gen) / k**0.5
    b = torch.randn(n, r, generator=gen) / r**0.5
    return [t.to(DEVICE, dtype) if t is not None else None for t in (w, bias, a, b)]


def check_against_reference(x, w, bias, a, b, scale, grad_w=False):
    """Runs lora_linear with grads on x, a, b (and w, bias when grad_w) and compares output and
    gradients with the float64 reference, the baseline being plain torch in x's dtype."""
    leaves = {"x": x, "lora_a": a, "lora_b": b}
    if grad_w:
        leaves["weight"] = w
        if bias is not None:
            leaves["bias"] = bias

    def run(fn, cast):
        args = {name: (cast(t) if t is not None else None) for name, t in
                {"x": x, "weight": w, "bias": bias, "lora_a": a, "lora_b": b}.items()}
        for name in leaves:
            args[name] = args[name].detach().requires_grad_(True)
        y = fn(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], scale)
        return y, args

    y, args = run(lora_linear, lambda t: t)
    y64, args64 = run(lora_linear_reference, lambda t: t.detach().double())
    y_base, args_base = run(lora_linear_reference, lambda t: t.detach())
    assert y.shape == (*x.shape[:-1], w.shape[0])
    assert y.dtype == x.dtype and y.device == x.device
    assert_close(y, y64, y_base, "y")

    grad_y64 = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grad_y = grad_y64.to(y.device, y.dtype)
    names = list(leaves)
    grads = torch.autograd.grad(y, [args[n] for n in names], grad_y, allow_unused=False)
    grads64 = torch.autograd.grad(y64, [args64[n] for n in names], grad_y64.to(y64.device))
    grads_base = torch.autograd.grad(y_base, [args_base[n] for n in names], grad_y)
    for name, g, g64, g_base in zip(names, grads, grads64, grads_base):
        assert_close(g, g64, g_base, f"d{name}")



@pytest.fixture
def backend(single_backend):
    """This module's tests run on the torch backend and on the Triton backend under both strategies."""
    return single_backend

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_shapes(backend, dtype, shape):
    skip_unless_backend_serves(backend, dtype)
    m, k, n, r = shape
    case = SHAPES.index(shape)
    gen = torch.Generator().manual_seed(case)
    layout = LAYOUTS[case % len(LAYOUTS)]
    has_bias = case % 3 != 1
    scale = (0.5, -1.25, 2.0)[case % 3]
    x = make_x(m, k, layout, dtype, gen)
    w, bias, a, b = make_params(n, k, r, dtype, has_bias, gen)
    check_against_reference(x, w, bias, a, b, scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("scale", [0.5, 0.0, -2.0])
def test_layouts_bias_scale(backend, layout, has_bias, scale):
    dtype = torch.float32
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(1)
    x = make_x(20, 40, layout, dtype, gen)
    w, bias, a, b = make_params(24, 40, 12, dtype, has_bias, gen)
    check_against_reference(x, w, bias, a, b, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_frozen_layer_gradients_when_asked(backend, dtype):
    """weight and bias get gradients too when they require grad (they usually do not)."""
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(2)
    x = make_x(30, 48, "3d", dtype, gen)
    w, bias, a, b = make_params(20, 48, 8, dtype, True, gen)
    check_against_reference(x, w, bias, a, b, 0.75, grad_w=True)


def test_only_requested_gradients(backend):
    """Frozen x (first layer): only dA and dB are computed, and they are right."""
    dtype = torch.float32
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(3)
    x = make_x(9, 33, "2d", dtype, gen)
    w, bias, a, b = make_params(14, 33, 4, dtype, True, gen)
    a.requires_grad_(True)
    y = lora_linear(x, w, bias, a, b, 1.5)
    (grad_a,) = torch.autograd.grad(y.sum(), [a])
    expected = (1.5 * (torch.ones(9, 14, dtype=torch.float64, device=DEVICE) @ b.double()).T @ x.double()).to(dtype)
    assert_close(grad_a, expected.double(), expected, "dA with frozen x, B")
    assert x.grad is None and b.grad is None


def test_scale_as_zero_dim_tensor(backend):
    dtype = torch.float32
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(4)
    x = make_x(5, 16, "2d", dtype, gen)
    w, bias, a, b = make_params(8, 16, 4, dtype, True, gen)
    y_tensor = lora_linear(x, w, bias, a, b, torch.tensor(0.25))
    y_float = lora_linear(x, w, bias, a, b, 0.25)
    torch.testing.assert_close(y_tensor, y_float, rtol=0, atol=0)


def test_bit_identical_repeats(backend):
    """Deterministic: no atomics, fixed reduction order."""
    dtype = torch.float32
    skip_unless_backend_serves(backend, dtype)
    gen = torch.Generator().manual_seed(5)
    x = make_x(70, 200, "2d", dtype, gen).requires_grad_(True)
    w, bias, a, b = make_params(40, 200, 16, dtype, True, gen)
    a.requires_grad_(True)
    b.requires_grad_(True)
    results = []
    for _ in range(2):
        y = lora_linear(x, w, bias, a, b, 0.5)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, a, b])))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_backends_agree_on_cpu_fp32():
    """Triton (interpreted) and torch give the same answer to fp32 rounding on the same input."""
    skip_unless_backend_serves("triton", torch.float32)
    gen = torch.Generator().manual_seed(6)
    x = make_x(33, 70, "2d", torch.float32, gen)
    w, bias, a, b = make_params(50, 70, 12, torch.float32, True, gen)
    outputs = {}
    for name in ("torch", "triton"):
        lora_kernels.set_backend(name)
        outputs[name] = lora_linear(x, w, bias, a, b, 0.3)
    assert_same_maths(outputs["triton"], outputs["torch"])


def test_gradcheck_float64_fallback():
    lora_kernels.set_backend("torch")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, -0.8), (x, w, bias, a, b))

    def with_dropout(*tensors):
        torch.manual_seed(0)   # the same mask at every evaluation
        return lora_linear(*tensors, 0.8, dropout_p=0.3)

    assert torch.autograd.gradcheck(with_dropout, (x, w, bias, a, b))


def test_float64_is_float64_exact_everywhere():
    """float64 (the torch backend) keeps every intermediate in float64: dB included."""
    lora_kernels.set_backend("torch")
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(37, 64, dtype=torch.float64, generator=gen, requires_grad=True)
    w, bias, a, b = (torch.randn(*s, dtype=torch.float64, generator=gen) for s in ((48, 64), (48,), (8, 64), (48, 8)))
    a.requires_grad_(True)
    b.requires_grad_(True)
    grad_y = torch.randn(37, 48, dtype=torch.float64, generator=gen)
    y = lora_linear(x, w, bias, a, b, 1.7)
    y_ref = lora_linear_reference(x, w, bias, a, b, 1.7)
    for ours, ref in zip((y, *torch.autograd.grad(y, [x, a, b], grad_y)),
                         (y_ref, *torch.autograd.grad(y_ref, [x, a, b], grad_y))):
        assert_same_maths(ours, ref)                    # float64: 1e-12


@pytest.mark.parametrize("bias_layout", ["strided", "expanded"])
def test_bias_any_stride(backend, bias_layout):
    """A bias that is a strided view or an expanded scalar is read through its stride."""
    skip_unless_backend_serves(backend, torch.float32)
    gen = torch.Generator().manual_seed(11)
    x = make_x(5, 32, "2d", torch.float32, gen)
    w, _, a, b = make_params(24, 32, 4, torch.float32, False, gen)
    if bias_layout == "strided":
        bias = torch.randn(24, 2, generator=gen).to(DEVICE)[:, 0]
    else:
        bias = torch.randn(1, generator=gen).to(DEVICE).expand(24)
    check_against_reference(x, w, bias, a, b, 0.5)


def _meta(tensors):
    return [t.detach().to("meta").requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_all_meta_lora_linear_infers_shapes_and_gradients(dropout_p):
    """With dropout too: the seed is drawn on x's device (meta), so the mask is a meta one, never read."""
    M, K, N, R = 7, 8, 6, 4
    x, w, bias = torch.randn(2, M, K), torch.randn(N, K), torch.randn(N)
    a, b = torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    x, w, bias, a, b = _meta([x, w, bias, a, b])
    y = lora_kernels.lora_linear(x, w, bias, a, b, 2.0, dropout_p=dropout_p)
    assert y.is_meta and y.shape == (2, M, N) and y.dtype == torch.float32
    grad_a, grad_b = torch.autograd.grad(y.sum(), [a, b])
    assert grad_a.is_meta and grad_a.shape == (R, K) and grad_b.shape == (N, R)
