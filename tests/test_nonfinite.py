"""Non-finite values follow IEEE like the float64 reference, on both backends, single and multi.

The rule (README, "Non-finite values"): a scale must be a finite number with |s| <= float32's largest
(the kernels hold it in fp32), else ValueError on every backend; NaN / ±inf in x, weight, bias, lora_a,
lora_b (and add_multi_lora_'s out) propagate as in the reference: NaN where it has NaN, ±inf where it
has ±inf — also at scale 0 (0 · inf = NaN: no shortcut skips the LoRA term) — and the scale multiplies
the finished rank product, as the reference does. Finite entries meet the usual tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

import lora_kernels
from lora_kernels import AdapterBatch
from lora_kernels.reference import lora_linear_reference, multi_lora_linear_reference

from .helpers import DEVICE, skip_unless_backend_serves
from .tolerance import assert_close

M, K, N, R = 5, 8, 6, 3
L = 4
IDS = [1, -1, 2, 1, 0]                    # row 1: no adapter; adapter 1 has rows 0 and 3; adapter 3 none
RANKS = [3, 2, 3, 3]                      # adapter 1 pads its rank: B[1][:, 2], A[1][2] are never read
DTYPES = [torch.float32, torch.float16]
VALUES = [math.nan, math.inf, -math.inf]
NAN, INF = math.nan, math.inf
MAX_SCALE = torch.finfo(torch.float32).max


def assert_ieee_like(actual: torch.Tensor, reference64: torch.Tensor, baseline: torch.Tensor, name: str) -> None:
    """NaN exactly where the reference (rounded to actual's dtype) has NaN, +inf / -inf exactly where it has
    them; the finite entries within the tolerance helper's bound. baseline: plain torch in actual's dtype."""
    expected = reference64.to(actual.dtype)
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, want = test(actual), test(expected)
        assert torch.equal(got, want), (f"{name}: {what} at {got.nonzero().tolist()}, the reference has "
                                        f"it at {want.nonzero().tolist()}")
    finite = torch.isfinite(expected)
    assert torch.isfinite(baseline[finite]).all(), f"{name}: the baseline is not finite where the reference is"
    assert_close(actual[finite], reference64[finite], baseline[finite], name)


def _single_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (M, K), "weight": (N, K), "bias": (N,), "lora_a": (R, K), "lora_b": (N, R)}
    return {name: torch.randn(shape, generator=g).to(DEVICE, dtype) for name, shape in shapes.items()}


# one entry per tensor: where the non-finite value goes
SINGLE_SPOTS = {"x": (2, 3), "weight": (4, 1), "bias": (5,), "lora_a": (1, 6), "lora_b": (3, 2)}


# ---------------------------------------------------------------------------------------------
# the scale rule: finite, |s| <= float32's largest, else ValueError, on every backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [NAN, INF, -INF, 1e39, -3.5e38, 10**39, 10**400,
                                   torch.tensor(1e39, dtype=torch.float64), torch.tensor(INF),
                                   torch.tensor(NAN)],
                         ids=["nan", "inf", "-inf", "1e39", "-3.5e38", "int_1e39", "int_1e400", "tensor_1e39",
                              "tensor_inf", "tensor_nan"])
def test_scale_not_finite_in_float32_raises(backend, scale):
    skip_unless_backend_serves(backend, torch.float32)
    args = _single_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"scale must be finite with \|scale\| <= 3\.402823e\+38"):
        lora_kernels.lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], scale)


@pytest.mark.parametrize("scale", [True, torch.tensor(True), 1j, torch.tensor(0.5 + 1j)],
                         ids=["bool", "tensor_bool", "complex", "tensor_complex"])
def test_scale_not_a_real_number_raises(scale):
    """A bool or complex scale is a TypeError, as a python value and as a 0-d tensor alike (a bool tensor
    was taken as 1.0, a complex one failed with "cannot be converted to type double without overflow")."""
    args = _single_inputs(torch.float32)
    with pytest.raises(TypeError, match="scale"):
        lora_kernels.lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], scale)


def test_largest_float32_scale_is_accepted(backend):
    skip_unless_backend_serves(backend, torch.float32)
    args = _single_inputs(torch.float32)
    y = lora_kernels.lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], MAX_SCALE)
    assert y.shape == (M, N)
    with pytest.raises(ValueError, match="scale must be finite"):
        lora_kernels.lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                                 math.nextafter(MAX_SCALE, math.inf))


@pytest.mark.parametrize("op", ["multi", "add"])
@pytest.mark.parametrize("bad", [NAN, INF, -1e39], ids=["nan", "inf", "-1e39"])
def test_multi_scales_not_finite_in_float32_raise(backend, op, bad):
    """CPU scales are checked (their values are in host memory); the message names the first bad one."""
    skip_unless_backend_serves(backend, torch.float32)
    if DEVICE.type != "cpu":
        pytest.skip("scales on a GPU are not read back (a sync per layer): the kernels' IEEE arithmetic applies")
    x, w, bias, a, b, _ = _multi_inputs(torch.float32)
    scales = torch.tensor([0.5, 1.0, bad, 3.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scales \(.*\) must be finite .* got scales\[2\] = "):
        if op == "multi":
            lora_kernels.multi_lora_linear(x, w, bias, a, b, scales, torch.tensor(IDS))
        else:
            with torch.no_grad():
                lora_kernels.add_multi_lora_(x @ w.T, x, a, b, scales, torch.tensor(IDS))


def test_unread_nan_scale_follows_the_reference(backend):
    """Scales the public function does not read (a GPU's; here the registered op, below the checks, gets
    them): the kernels' arithmetic makes a NaN scale's adapter rows NaN, as in the reference, and
    leaves every other row alone."""
    skip_unless_backend_serves(backend, torch.float32)
    x, w, bias, a, b, _ = _multi_inputs(torch.float32)
    scales = torch.tensor([0.5, NAN, -2.0, 3.0], device=DEVICE)
    ids = torch.tensor(IDS, device=DEVICE)
    ranks = torch.tensor(RANKS, device=DEVICE)
    batch = AdapterBatch(ids, L, ranks)
    y, _ = torch.ops.lora_kernels.multi_lora_linear(
        x, w, bias, a, b, scales, *batch.tensors(), False)
    tensors = (x, w, bias, a, b, scales)
    reference = multi_lora_linear_reference(*(t.double() for t in tensors), ids, ranks)
    assert_ieee_like(y, reference, multi_lora_linear_reference(*tensors, ids, ranks), "y")
    assert torch.isnan(y[[0, 3]]).all()


# ---------------------------------------------------------------------------------------------
# single adapter: NaN / ±inf in each input, forward and gradients
# ---------------------------------------------------------------------------------------------

def _single_case(dtype, name, value):
    args = _single_inputs(dtype)
    args[name][SINGLE_SPOTS[name]] = value
    return args


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("scale", [0.0, -1.5], ids=["scale0", "scale-1.5"])
@pytest.mark.parametrize("name", list(SINGLE_SPOTS))
def test_single_forward_nonfinite_like_reference(single_backend, dtype, scale, name):
    """Scale 0 with inf in lora_b gave a finite output on the torch backend (BLAS skips the product at
    alpha = 0) where the reference has NaN."""
    backend = single_backend   # the Triton backend under each strategy too
    skip_unless_backend_serves(backend, dtype)
    for value in VALUES:
        args = _single_case(dtype, name, value)
        tensors = [args[n] for n in ("x", "weight", "bias", "lora_a", "lora_b")]
        y = lora_kernels.lora_linear(*tensors, scale)
        reference = lora_linear_reference(*(t.double() for t in tensors), scale)
        assert_ieee_like(y, reference, lora_linear_reference(*tensors, scale), f"y ({name} = {value})")


def test_single_huge_finite_scale_applied_after_the_rank_product(single_backend):
    """T = [4, 4] and B's rows cancel: (T Bᵀ) = [0, 0.5], so 1e38 · (T Bᵀ) = [0, 5e37] is finite, but 1e38 · T
    overflows float32 to [inf, inf] and (inf, inf) · (1, -1) = NaN. The Triton kernels scaled T before
    the product. (The torch backend hands the scale to BLAS as addmm's alpha; where a BLAS applies
    alpha is its own business, so only the kernels we write are held to the order here.)"""
    backend = single_backend   # the Triton backend under each strategy too
    if backend == "torch":
        pytest.skip("the torch backend's order at huge scales is the BLAS library's (addmm alpha)")
    skip_unless_backend_serves(backend, torch.float32)
    x = torch.tensor([[1.0, 0.0]], device=DEVICE)
    w = torch.zeros(2, 2, device=DEVICE)
    a = torch.tensor([[4.0, 0.0], [4.0, 0.0]], device=DEVICE)
    b = torch.tensor([[1.0, -1.0], [1.0, -0.875]], device=DEVICE)
    y = lora_kernels.lora_linear(x, w, None, a, b, 1e38)
    reference = lora_linear_reference(x.double(), w.double(), None, a.double(), b.double(), 1e38)
    assert_ieee_like(y, reference, lora_linear_reference(x, w, None, a, b, 1e38), "y")


@pytest.mark.parametrize("scale", [0.0, -1.5], ids=["scale0", "scale-1.5"])
@pytest.mark.parametrize("name", ["x", "lora_a", "lora_b"])
def test_single_gradients_nonfinite_like_reference(single_backend, scale, name):
    """dX, dA, dB when x, lora_a or lora_b hold a NaN / ±inf: the reference's autograd, in float64."""
    backend = single_backend   # the Triton backend under each strategy too
    skip_unless_backend_serves(backend, torch.float32)
    for value in VALUES:
        args = _single_case(torch.float32, name, value)
        grads = {}
        for label, cast in (("actual", torch.clone), ("ref64", torch.Tensor.double), ("baseline", torch.clone)):
            tensors = {n: cast(t) for n, t in args.items()}
            leaves = {n: tensors[n].requires_grad_() for n in ("x", "lora_a", "lora_b")}
            fn = lora_kernels.lora_linear if label == "actual" else lora_linear_reference
            y = fn(tensors["x"], tensors["weight"], tensors["bias"], tensors["lora_a"], tensors["lora_b"], scale)
            grad_y = torch.linspace(-1.0, 1.0, y.numel(), device=DEVICE).reshape(y.shape).to(y.dtype)
            grads[label] = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), grad_y)))
        for leaf in ("x", "lora_a", "lora_b"):
            assert_ieee_like(grads["actual"][leaf], grads["ref64"][leaf], grads["baseline"][leaf],
                             f"d{leaf} ({name} = {value})")


# ---------------------------------------------------------------------------------------------
# many adapters: multi_lora_linear and add_multi_lora_
# ---------------------------------------------------------------------------------------------

def _multi_inputs(dtype):
    """x (M, K), weight (N, K), bias (N,), lora_a (L, R, K), lora_b (L, N, R), scales (L,) fp32."""
    g = torch.Generator().manual_seed(1)
    shapes = [(M, K), (N, K), (N,), (L, R, K), (L, N, R)]
    tensors = [torch.randn(shape, generator=g).to(DEVICE, dtype) for shape in shapes]
    return (*tensors, torch.tensor([0.5, 1.0, -2.0, 3.0], device=DEVICE))


# where the non-finite value goes: (tensor, index). The LoRA factors' spots are adapter 1's (rows 0
# and 3), within its true rank 2; *_padding: past that rank (never read); *_unused: adapter 3 (no rows).
MULTI_SPOTS = {"x": ("x", (3, 5)), "weight": ("weight", (2, 0)), "bias": ("bias", (4,)),
               "lora_a": ("lora_a", (1, 1, 2)), "lora_b": ("lora_b", (1, 3, 0)),
               "lora_a_padding": ("lora_a", (1, 2, 2)), "lora_b_padding": ("lora_b", (1, 3, 2)),
               "lora_b_unused": ("lora_b", (3, 1, 1))}
MULTI_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "scales")


def _multi_case(dtype, spot, value, scale):
    """The inputs (by name, in call order) with `value` at MULTI_SPOTS[spot] (None: nowhere), and
    adapter 1's scale."""
    tensors = dict(zip(MULTI_NAMES, _multi_inputs(dtype)))
    if spot is not None:
        name, index = MULTI_SPOTS[spot]
        tensors[name][index] = value
    tensors["scales"][1] = scale
    return tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("scale", [0.0, -1.5], ids=["scale0", "scale-1.5"])
@pytest.mark.parametrize("name", list(MULTI_SPOTS))
def test_multi_forward_nonfinite_like_reference(backend, dtype, scale, name):
    skip_unless_backend_serves(backend, dtype)
    ids = torch.tensor(IDS, device=DEVICE)
    ranks = torch.tensor(RANKS, device=DEVICE)
    for value in VALUES:
        t = _multi_case(dtype, name, value, scale)
        y = lora_kernels.multi_lora_linear(*t.values(), AdapterBatch(ids, L, ranks))
        reference = multi_lora_linear_reference(*(v.double() for v in t.values()), ids, ranks)
        baseline = multi_lora_linear_reference(*t.values(), ids, ranks)
        assert_ieee_like(y, reference, baseline, f"y ({name} = {value})")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("scale", [0.0, -1.5], ids=["scale0", "scale-1.5"])
@pytest.mark.parametrize("name", ["out", "x", "lora_a", "lora_b", "lora_b_padding"])
def test_add_multi_lora_nonfinite_like_reference(backend, dtype, scale, name):
    skip_unless_backend_serves(backend, dtype)
    ids = torch.tensor(IDS, device=DEVICE)
    ranks = torch.tensor(RANKS, device=DEVICE)
    for value in VALUES:
        t = _multi_case(dtype, None if name == "out" else name, value, scale)
        out = t["x"] @ t["weight"].T                                        # (M, N) base output
        if name == "out":
            out[1, 2], out[3, 4] = value, value                             # a row of no adapter, a row of adapter 1
        expected_from = out.clone()
        adapters = (t["x"], t["lora_a"], t["lora_b"], t["scales"])
        with torch.no_grad():
            lora_kernels.add_multi_lora_(out, *adapters, AdapterBatch(ids, L, ranks))
        zero_w = torch.zeros(N, K, device=DEVICE, dtype=torch.float64)
        lora64 = multi_lora_linear_reference(t["x"].double(), zero_w, None, *(v.double() for v in adapters[1:]),
                                             ids, ranks)
        lora = multi_lora_linear_reference(t["x"], zero_w.to(dtype), None, *adapters[1:], ids, ranks)
        # rows of no adapter are not touched (their bits kept); the others are out + the LoRA term
        reference = torch.where((ids < 0)[:, None], expected_from.double(), expected_from.double() + lora64)
        baseline = torch.where((ids < 0)[:, None], expected_from, expected_from + lora)
        assert_ieee_like(out, reference, baseline, f"out ({name} = {value})")


@pytest.mark.parametrize("scale", [0.0, -1.5], ids=["scale0", "scale-1.5"])
@pytest.mark.parametrize("name", ["x", "lora_a", "lora_b", "lora_b_padding"])
def test_multi_gradients_nonfinite_like_reference(backend, scale, name):
    skip_unless_backend_serves(backend, torch.float32)
    ids = torch.tensor(IDS, device=DEVICE)
    ranks = torch.tensor(RANKS, device=DEVICE)
    for value in VALUES:
        t = _multi_case(torch.float32, name, value, scale)
        grads = {}
        for label, cast in (("actual", torch.clone), ("ref64", torch.Tensor.double), ("baseline", torch.clone)):
            tensors = {n: cast(v) for n, v in t.items()}
            leaves = [tensors[n].requires_grad_() for n in ("x", "lora_a", "lora_b")]
            if label == "actual":
                y = lora_kernels.multi_lora_linear(*tensors.values(), AdapterBatch(ids, L, ranks))
            else:
                y = multi_lora_linear_reference(*tensors.values(), ids, ranks)
            grad_y = torch.linspace(-1.0, 1.0, y.numel(), device=DEVICE).reshape(y.shape).to(y.dtype)
            grads[label] = torch.autograd.grad(y, leaves, grad_y)
        for leaf, actual, ref64, baseline in zip(("x", "lora_a", "lora_b"), *grads.values()):
            assert_ieee_like(actual, ref64, baseline, f"d{leaf} ({name} = {value})")


@pytest.mark.parametrize("scale", [NAN, INF, 1e39], ids=["nan", "inf", "1e39"])
def test_multi_lora_module_checks_a_scale_when_loaded(scale):
    """MultiLoRALinear's scales live on the layer's device, unread per call: each is checked when loaded."""
    layer = lora_kernels.MultiLoRALinear(torch.nn.Linear(K, N), num_slots=2, max_rank=R)
    with pytest.raises(ValueError, match="scale must be finite"):
        layer.load_adapter(1, torch.randn(2, K), torch.randn(N, 2), scale=scale)
    assert layer.scales.tolist() == [0.0, 0.0] and layer.ranks.tolist() == [0, 0]   # nothing loaded
