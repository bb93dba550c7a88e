"""Second derivatives and forward-mode AD on every backend, against the float64 reference.

The kernels' gradients are constants to autograd: a backward recorded with create_graph=True
computes them with differentiable torch ops instead, and forward-mode AD / torch.func calls run the
differentiable composition (lora_kernels/ops/_composite.py). Checked: gradgradcheck (float64, the
torch backend, eager and registered-op routes), gradient penalties with a grad_output that is a
constant (a loss linear in y: once_differentiable let this through as silently wrong) or requires
grad, Hessian-vector products, and the tangents of dual tensors and torch.func.jvp.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.autograd import forward_ad

import lora_kernels
from lora_kernels import AdapterBatch, add_multi_lora_, lora_linear, multi_lora_linear
from lora_kernels.reference import lora_linear_reference, multi_lora_linear_reference

from .helpers import DEVICE, skip_unless_backend_serves
from .test_dropout import keep_mask, next_seed
from .tolerance import assert_close

SCALE = -0.8
# multi-adapter batch: adapter 1 has no rows, ranks below r_max = 3 trim adapters 0 and 2
IDS = [2, -1, 0, 2, 0, -1, 2]
RANKS = [2, 3, 1]


def route(name: str):
    """The call's route: the eager fast path, or the registered torch.library op (taken under the
    profiler, as under torch.compile)."""
    return torch.autograd.profiler.profile() if name == "registered" else contextlib.nullcontext()


def single_tensors(dtype, has_bias=True, m=7, k=12, n=10, r=4, seed=0):
    """{name: tensor} for lora_linear: x (M, K), weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r)."""
    gen = torch.Generator().manual_seed(seed)
    t = {"x": torch.randn(m, k, generator=gen), "weight": torch.randn(n, k, generator=gen) / k**0.5,
         "bias": torch.randn(n, generator=gen) if has_bias else None,
         "lora_a": torch.randn(r, k, generator=gen) / k**0.5, "lora_b": torch.randn(n, r, generator=gen) / r**0.5}
    return {name: v.to(DEVICE, dtype) if v is not None else None for name, v in t.items()}


def multi_tensors(dtype, has_bias=True, k=12, n=10, seed=0):
    """{name: tensor} for multi_lora_linear with L = 3 adapters of r_max = 3 over len(IDS) rows."""
    gen = torch.Generator().manual_seed(seed)
    t = {"x": torch.randn(len(IDS), k, generator=gen), "weight": torch.randn(n, k, generator=gen) / k**0.5,
         "bias": torch.randn(n, generator=gen) if has_bias else None,
         "lora_a": torch.randn(3, 3, k, generator=gen) / k**0.5, "lora_b": torch.randn(3, n, 3, generator=gen)}
    return {name: v.to(DEVICE, dtype) if v is not None else None for name, v in t.items()}


def scales_for(dtype):
    return torch.tensor([0.5, 2.0, -1.5], device=DEVICE, dtype=dtype)


def single_fn(dropout_p=0.0, keep=None, reference=False):
    """f(x, weight, bias, lora_a, lora_b) -> y: lora_linear (its dropout seed drawn after
    torch.manual_seed(5) at every call), or the reference with that seed's keep-mask."""
    def ours(x, weight, bias, lora_a, lora_b):
        torch.manual_seed(5)
        return lora_linear(x, weight, bias, lora_a, lora_b, SCALE, dropout_p=dropout_p)

    def ref(x, weight, bias, lora_a, lora_b):
        mask = None if keep is None else keep.to(x.device)
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, SCALE, dropout_mask=mask, dropout_p=dropout_p)

    return ref if reference else ours


def multi_fn(reference=False):
    ids = torch.tensor(IDS, device=DEVICE)
    if reference:
        ranks = torch.tensor(RANKS)
        return lambda x, weight, bias, a, b: multi_lora_linear_reference(
            x, weight, bias, a, b, scales_for(x.dtype), ids, ranks)
    batch = AdapterBatch(ids, 3, ranks=RANKS)
    return lambda x, weight, bias, a, b: multi_lora_linear(x, weight, bias, a, b, scales_for(x.dtype), batch)


def dropout_keep(backend, dropout_p, m, k):
    """The (M, K) keep-mask of single_fn's calls on `backend`; None without dropout."""
    return keep_mask(backend, m, k, dropout_p, next_seed(5)) if dropout_p > 0.0 else None


def op_case(op, dtype):
    """(tensors, ours, reference) for op "single" or "multi", without dropout."""
    if op == "single":
        return single_tensors(dtype), single_fn(), single_fn(reference=True)
    return multi_tensors(dtype), multi_fn(), multi_fn(reference=True)


# ---- gradgradcheck: the strongest check of second derivatives (float64, torch backend) -------------

def gradgradcheck_over(fn, tensors, trainable):
    """gradgradcheck of fn(**tensors) in the trainable tensors (the others held constant)."""
    names = list(tensors)

    def of_trainable(*leaves):
        args = dict(tensors, **dict(zip(trainable, leaves)))
        return fn(*(args[name] for name in names))

    inputs = tuple(tensors[name].detach().requires_grad_(True) for name in trainable)
    assert torch.autograd.gradgradcheck(of_trainable, inputs)


@pytest.mark.parametrize("route_name", ["eager", "registered"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("train_w", [False, True], ids=["frozen_w", "trainable_w"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradgradcheck_single(route_name, has_bias, train_w, dropout_p):
    lora_kernels.set_backend("torch")
    tensors = single_tensors(torch.float64, has_bias, m=5, k=6, n=5, r=3)
    trainable = ["x", "lora_a", "lora_b"] + (["weight"] + (["bias"] if has_bias else []) if train_w else [])
    with route(route_name):
        gradgradcheck_over(single_fn(dropout_p), tensors, trainable)


@pytest.mark.parametrize("route_name", ["eager", "registered"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("train_w", [False, True], ids=["frozen_w", "trainable_w"])
def test_gradgradcheck_multi(route_name, has_bias, train_w):
    lora_kernels.set_backend("torch")
    tensors = multi_tensors(torch.float64, has_bias, k=5, n=4)
    trainable = ["x", "lora_a", "lora_b"] + (["weight"] + (["bias"] if has_bias else []) if train_w else [])
    with route(route_name):
        gradgradcheck_over(multi_fn(), tensors, trainable)


# ---- gradient penalties on each backend (fp32) against the float64 reference ----------------------

def penalty_grads(fn, tensors, trainable, grad_y, grad_y_requires_grad):
    """First gradients of <y, grad_y> + ½‖x‖² in the trainable tensors with create_graph=True, then
    the gradients of the penalty Σ ‖first gradient‖² in every trainable tensor (and in grad_y when it
    requires grad): [(name, second derivative)]. The ½‖x‖² term keeps the penalty differentiable even
    where the op's gradients are constants: the silent case (zeros, not an error) once_differentiable
    let through when grad_y does not require grad."""
    leaves = {name: (t.detach().requires_grad_(True) if name in trainable else t) for name, t in tensors.items()}
    v = grad_y.detach().requires_grad_(grad_y_requires_grad)
    y = fn(*leaves.values())
    loss = (y * v).sum() + 0.5 * leaves["x"].square().sum()
    first = torch.autograd.grad(loss, [leaves[name] for name in trainable], create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    wrt = trainable + (["grad_y"] if grad_y_requires_grad else [])
    seconds = torch.autograd.grad(penalty, [leaves[name] for name in trainable] + ([v] if grad_y_requires_grad else []),
                                  materialize_grads=True)
    return list(zip(wrt, seconds))


def check_penalty(ours, ref, tensors, trainable, grad_y_requires_grad):
    """Second derivatives of ours (fp32) against ref in float64, the baseline being ref in fp32."""
    gen = torch.Generator().manual_seed(11)
    y_shape = (tensors["x"].shape[0], tensors["weight"].shape[0])
    grad_y = torch.randn(y_shape, generator=gen).to(DEVICE)
    actual = penalty_grads(ours, tensors, trainable, grad_y, grad_y_requires_grad)
    expected = penalty_grads(ref, {n: t.double() if t is not None else None for n, t in tensors.items()},
                             trainable, grad_y.double(), grad_y_requires_grad)
    baseline = penalty_grads(ref, tensors, trainable, grad_y, grad_y_requires_grad)
    for (name, g), (_, g64), (_, g_base) in zip(actual, expected, baseline):
        assert_close(g, g64, g_base, f"d(penalty)/d{name}")


@pytest.mark.parametrize("grad_y_requires_grad", [False, True], ids=["grad_y_constant", "grad_y_requires_grad"])
@pytest.mark.parametrize("train_w", [False, True], ids=["frozen_w", "trainable_w"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradient_penalty_single(backend, grad_y_requires_grad, train_w, dropout_p):
    skip_unless_backend_serves(backend, torch.float32)
    tensors = single_tensors(torch.float32)
    trainable = ["x", "lora_a", "lora_b"] + (["weight", "bias"] if train_w else [])
    keep = dropout_keep(backend, dropout_p, 7, 12)
    check_penalty(single_fn(dropout_p), single_fn(dropout_p, keep, reference=True), tensors, trainable,
                  grad_y_requires_grad)


@pytest.mark.parametrize("grad_y_requires_grad", [False, True], ids=["grad_y_constant", "grad_y_requires_grad"])
@pytest.mark.parametrize("train_w", [False, True], ids=["frozen_w", "trainable_w"])
def test_gradient_penalty_multi(backend, grad_y_requires_grad, train_w):
    skip_unless_backend_serves(backend, torch.float32)
    tensors = multi_tensors(torch.float32)
    trainable = ["x", "lora_a", "lora_b"] + (["weight", "bias"] if train_w else [])
    check_penalty(multi_fn(), multi_fn(reference=True), tensors, trainable, grad_y_requires_grad)


@pytest.mark.parametrize("op", ["single", "multi"])
def test_gradient_penalty_through_the_registered_op(backend, op):
    skip_unless_backend_serves(backend, torch.float32)
    tensors, ours, ref = op_case(op, torch.float32)
    with route("registered"):
        check_penalty(ours, ref, tensors, ["x", "lora_a", "lora_b"], grad_y_requires_grad=False)


@pytest.mark.parametrize("op", ["single", "multi"])
def test_second_derivatives_with_lora_a_frozen_raise(backend, op):
    """lora_a frozen, x and lora_b trainable: x is not saved (dA does not need it; LoRA-FA memory), so
    lora_b's gradient cannot be differentiated in x: a backward recording a second derivative raises
    (never a gradient missing its x-term). The ordinary backward still works."""
    skip_unless_backend_serves(backend, torch.float32)
    tensors, fn, _ = op_case(op, torch.float32)
    leaves = {n: t.detach().requires_grad_(n in ("x", "lora_b")) if t is not None else None for n, t in tensors.items()}
    y = fn(*leaves.values())
    with pytest.raises(RuntimeError, match="x requires grad and was not saved"):
        torch.autograd.grad(y.sum(), [leaves["x"], leaves["lora_b"]], create_graph=True)
    y = fn(*leaves.values())
    assert all(g is not None for g in torch.autograd.grad(y.sum(), [leaves["x"], leaves["lora_b"]]))


@pytest.mark.parametrize("op", ["single", "multi"])
def test_hessian_vector_product_float64(op):
    lora_kernels.set_backend("torch")
    tensors, ours, ref = op_case(op, torch.float64)
    gen = torch.Generator().manual_seed(3)
    params = (tensors["x"], tensors["lora_a"], tensors["lora_b"])
    vectors = tuple(torch.randn(p.shape, dtype=torch.float64, generator=gen).to(DEVICE) for p in params)

    def loss(fn):
        return lambda x, a, b: fn(x, tensors["weight"], tensors["bias"], a, b).tanh().sum()

    _, hvp = torch.autograd.functional.hvp(loss(ours), params, vectors)
    _, hvp64 = torch.autograd.functional.hvp(loss(ref), params, vectors)
    for name, h, h64 in zip(["x", "lora_a", "lora_b"], hvp, hvp64):
        assert_close(h, h64, h64, f"hvp {name}")


# ---- forward-mode AD: dual tensors and torch.func.jvp ---------------------------------------------

def tangents_of(fn, primals, tangents, api):
    """(y, dy) of fn at primals along tangents, by forward-AD dual tensors or torch.func.jvp."""
    if api == "jvp":
        return torch.func.jvp(fn, tuple(primals), tuple(tangents))
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        y, dy = forward_ad.unpack_dual(fn(*duals))
        assert dy is not None, "the tangent was dropped"
        return y, dy


def check_tangents(ours, ref, tensors, api, requires_grad):
    """Output and tangent (every input perturbed) of ours (fp32) against ref's in float64."""
    gen = torch.Generator().manual_seed(13)
    names = [n for n, t in tensors.items() if t is not None]
    primals = [tensors[n].detach().requires_grad_(requires_grad) for n in names]
    tangents = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in primals]

    def with_none(fn):
        def call(*given):
            args = dict(zip(names, given))
            return fn(*(args.get(n) for n in tensors))
        return call

    y, dy = tangents_of(with_none(ours), primals, tangents, api)
    primals64, tangents64 = [p.detach().double() for p in primals], [t.double() for t in tangents]
    y64, dy64 = tangents_of(with_none(ref), primals64, tangents64, "jvp")
    y32, dy32 = tangents_of(with_none(ref), [p.detach() for p in primals], tangents, "jvp")
    assert_close(y, y64, y32, "y")
    assert_close(dy, dy64, dy32, "tangent of y")


@pytest.mark.parametrize("api", ["dual", "jvp"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_mode_single(backend, api, requires_grad, dropout_p):
    skip_unless_backend_serves(backend, torch.float32)
    tensors = single_tensors(torch.float32)
    keep = dropout_keep(backend, dropout_p, 7, 12)
    check_tangents(single_fn(dropout_p), single_fn(dropout_p, keep, reference=True), tensors, api, requires_grad)


@pytest.mark.parametrize("api", ["dual", "jvp"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
def test_forward_mode_multi(backend, api, requires_grad, has_bias):
    skip_unless_backend_serves(backend, torch.float32)
    check_tangents(multi_fn(), multi_fn(reference=True), multi_tensors(torch.float32, has_bias), api, requires_grad)


@pytest.mark.parametrize("op", ["single", "multi"])
def test_forward_mode_through_the_profiler(backend, op):
    """Under the profiler a call takes the registered op, which has no forward-mode rule: a call with
    tangents goes to the composition first."""
    skip_unless_backend_serves(backend, torch.float32)
    tensors, ours, ref = op_case(op, torch.float32)
    with route("registered"):
        check_tangents(ours, ref, tensors, "dual", requires_grad=False)


@pytest.mark.parametrize("api", ["dual", "jvp"])
def test_add_multi_lora_refuses_tangents(backend, api):
    skip_unless_backend_serves(backend, torch.float32)
    tensors = multi_tensors(torch.float32)
    x, a, b = tensors["x"], tensors["lora_a"], tensors["lora_b"]
    ids = torch.tensor(IDS, device=DEVICE)

    def add(x):
        return add_multi_lora_(torch.zeros(x.shape[0], b.shape[1], device=DEVICE), x, a, b, scales_for(x.dtype), ids)

    with pytest.raises(ValueError, match="forward-mode AD"):
        tangents_of(add, [x], [torch.ones_like(x)], api)


@pytest.mark.parametrize("op", ["single", "multi"])
def test_torch_func_grad_and_vmap(backend, op):
    """torch.func.grad and vmap (the docstrings promise torch.func) run the composition too."""
    skip_unless_backend_serves(backend, torch.float32)
    tensors, ours, ref = op_case(op, torch.float32)
    x, weight, bias, a, b = tensors.values()

    def loss(fn, cast=lambda t: t):
        return lambda a, b: fn(cast(x), cast(weight), cast(bias), a, b).square().sum()

    grads = torch.func.grad(loss(ours), argnums=(0, 1))(a, b)
    grads64 = torch.func.grad(loss(ref, torch.Tensor.double), argnums=(0, 1))(a.double(), b.double())
    grads32 = torch.func.grad(loss(ref), argnums=(0, 1))(a, b)
    for name, g, g64, g32 in zip(["lora_a", "lora_b"], grads, grads64, grads32):
        assert_close(g, g64, g32, f"torch.func.grad {name}")

    xs = torch.stack([x, x.flip(0)])                                           # (2, M, K): vmap over dim 0
    y = torch.vmap(lambda x: ours(x, weight, bias, a, b))(xs)
    y64 = torch.stack([ref(xi.double(), weight.double(), bias.double(), a.double(), b.double()) for xi in xs])
    y32 = torch.stack([ref(xi, weight, bias, a, b) for xi in xs])
    assert_close(y, y64, y32, "vmap y")
