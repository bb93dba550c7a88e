"""lora_linear: y = x W0ᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ.

Layers: public function (validate, flatten, draw the dropout seed) -> registered ops
``lora_kernels::lora_linear`` / ``lora_kernels::lora_linear_backward`` (C++'s with the extension:
schemas, CPU kernels and CPU autograd in csrc/; else torch.library custom ops; fake impls for
torch.compile and the other devices' kernels and autograd from here) -> backend
(_dispatch.implementation: the Triton launchers, which pick the fused or split strategy per shape
(lora_kernels.tuning), or the torch backend, whose CPU maths csrc/ runs in C++).
Routes of a call (_dispatch.route): inside a torch.compile trace -> the registered op; forward-mode
AD / torch.func -> the differentiable composition (_composite); with the profiler on -> the registered
op; CPU tensors with the extension (and triton not requested) -> the registered op through the
extension's binding; an input requiring grad -> the eager fast path (autograd.Function, no
dispatcher); else the forward directly; DTensors (tensor parallelism, _tensor_parallel) take them
with each rank's shards.
A backward recorded with create_graph=True computes its gradients with the composition's formulas,
so second derivatives are exact on the eager and registered-op routes (torch.compile's AOT autograd
refuses double backward itself).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from .._backend import resolve_backend, scoped_choice
from ..tuning import current_forced_plan, forced_plan
from .._dtensor import any_dtensor
from . import _composite, _tensor_parallel
from ._dispatch import define_op, implementation, route, rows, unflatten
from ._autograd import check_x_saved_for_second_derivative, eager_fast_path, in_transform, op_backward
from .._checks import (
    FLOAT_DTYPES,
    check_dropout_p,
    check_same_dtype_and_device,
    check_scale,
    check_shape,
    check_tensor,
    describe,
    hidden_dtype,
)

SEED_BOUND = 2**31 - 1


def _forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    scale: float, dropout_p: float, seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """x (M, K) last stride 1 -> (y (M, N), lora_hidden T = dropout(x) Aᵀ (M, r), fp32 (fp64 for fp64 x)).
    seed: 0-d int64 tensor (None without dropout) where _dropout_seed draws it; the dropout mask is a
    function of its value alone, read by the backend (on the device by the Triton kernels)."""
    m, n, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    if dropout_p > 0.0 and (seed is None or seed.shape != () or seed.dtype != torch.int64):
        # only a direct call of the registered op can get here (lora_linear draws the seed)
        raise ValueError(f"dropout_p={dropout_p} needs seed, a 0-d int64 tensor; got "
                         f"{'None' if seed is None else describe(seed)}")
    if m == 0 or n == 0:
        return x.new_empty((m, n)), x.new_zeros((m, r), dtype=hidden_dtype(x.dtype))
    return implementation(resolve_backend(x.device, x.dtype)).lora_linear_forward(
        x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)


def _backward_grads(
    grad_y: Tensor, x: Optional[Tensor], weight: Optional[Tensor], lora_a: Optional[Tensor],
    lora_b: Optional[Tensor], lora_hidden: Optional[Tensor], scale: float, dropout_p: float, seed: Optional[Tensor],
    need_x: bool, need_a: bool, need_b: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX (M, K), dA (r, K), dB (N, r)); a gradient not asked for comes back as an empty tensor.
    backend: the one that served the forward (its dropout mask is the one to regenerate)."""
    m = grad_y.shape[0]
    grads = (None, None, None)
    if m > 0:
        grads = implementation(backend).lora_linear_backward(
            grad_y, x, weight, lora_a, lora_b, lora_hidden, scale, dropout_p, seed, need_x, need_a, need_b)
    shapes = _grad_shapes(grad_y, x, weight, lora_b, lora_hidden, need_x, need_a, need_b)
    return tuple(g if g is not None else grad_y.new_zeros(shape) for g, shape in zip(grads, shapes))


# The registered ops: what torch.compile traces, opcheck checks and the profiler names (C++'s when the
# extension is loaded, csrc/library.cpp, with the same schemas).
lora_linear_op = define_op("lora_linear", _forward)
lora_linear_backward_op = define_op("lora_linear_backward", _backward_grads)


@torch.library.register_fake("lora_kernels::lora_linear")
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_a.shape[0]), dtype=hidden_dtype(x.dtype)))


def _grad_shapes(grad_y, x, weight, lora_b, lora_hidden, need_x, need_a, need_b):
    m, n = grad_y.shape
    shape_x = (m, weight.shape[1]) if need_x else (0,)
    shape_a = (lora_b.shape[1], x.shape[1]) if need_a else (0,)
    shape_b = (n, lora_hidden.shape[1]) if need_b else (0,)
    return shape_x, shape_a, shape_b


@torch.library.register_fake("lora_kernels::lora_linear_backward")
def _(grad_y, x, weight, lora_a, lora_b, lora_hidden, scale, dropout_p, seed, need_x, need_a, need_b, backend):
    shapes = _grad_shapes(grad_y, x, weight, lora_b, lora_hidden, need_x, need_a, need_b)
    return tuple(grad_y.new_empty(shape) for shape in shapes)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed = inputs
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    ctx.mark_non_differentiable(output[1])
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.need = (need_x, need_w, need_bias, need_a, need_b)
    # The backend that served the forward serves the backward: another one's dropout mask differs, and
    # the backward may run outside the forward's use_backend block, or on autograd's device thread
    # (which does not see it). Under torch.compile: the backend current when the graph was traced.
    ctx.backend = resolve_backend(x.device, x.dtype)
    # likewise a plan forced around the forward (tuning.forced_plan, a ContextVar too): the tuner's or a
    # test's choice reaches dX on autograd's device thread
    ctx.plan = current_forced_plan()
    # save only what the requested gradients read; lora_a (a parameter: no memory) also for dB,
    # whose second derivative differentiates T = dropout(x) Aᵀ in A
    ctx.save_for_backward(
        x if (need_a or need_w) else None,
        weight if need_x else None,
        lora_a if (need_x or need_b) else None,
        lora_b if (need_x or need_a) else None,
        output[1] if need_b else None,
        seed,
    )


def _backward(ctx, grad_y, _grad_hidden):
    x, weight, lora_a, lora_b, lora_hidden, seed = ctx.saved_tensors
    need_x, _, _, need_a, need_b = ctx.need
    grad_y = rows(grad_y, grad_y.shape[-1])
    with forced_plan(ctx.plan) if ctx.plan is not None else contextlib.nullcontext():
        grads = op_backward(
            ctx, grad_y, x, (x, weight, lora_a, lora_b),
            lambda: _differentiable_grads(grad_y, x, weight, lora_a, lora_b, lora_hidden, seed, ctx.scale,
                                          ctx.dropout_p, ctx.backend, need_x, need_a, need_b),
            _backward_grads, lora_linear_backward_op,
            (grad_y, x, weight, lora_a, lora_b, lora_hidden, ctx.scale, ctx.dropout_p, seed,
             need_x, need_a, need_b, ctx.backend))
    return grads + (None, None, None)


def _keep_mask(m: int, k: int, dropout_p: float, seed: Optional[Tensor], backend: str,
               device: torch.device) -> Optional[Tensor]:
    """The (M, K) bool dropout keep-mask `backend` derives from seed; None without dropout."""
    if dropout_p == 0.0:
        return None
    with torch._C._DisableFuncTorch():   # a constant: a plain tensor even under torch.func (a kernel writes it)
        return implementation(backend).dropout_keep_mask(m, k, dropout_p, seed, device)


def _differentiable_grads(grad_y, x, weight, lora_a, lora_b, lora_hidden, seed, scale, dropout_p, backend,
                          need_x, need_a, need_b):
    """(dX, dA, dB) as torch ops (create_graph=True): autograd differentiates them again. Also the C++
    autograd's (csrc/autograd.cpp), which passes None for what it did not save."""
    check_x_saved_for_second_derivative("lora_linear", "dB = s·dYᵀ·dropout(x)Aᵀ", x, need_x, need_b)
    m, k = grad_y.shape[0], next(t.shape[1] for t in (x, weight, lora_a) if t is not None)
    keep = _keep_mask(m, k, dropout_p, seed, backend, grad_y.device)
    hidden = None                                                               # T = dropout(x) Aᵀ (M, r)
    if need_b:
        if x is not None:   # lora_a is saved with dB
            hidden = _composite.dropped(x, keep, dropout_p) @ lora_a.T
        else:               # x was not saved (dA not asked for): the fp32 T of forward, a constant
            hidden = lora_hidden.to(grad_y.dtype)
    return _composite.lora_linear_grads(grad_y, x, weight, lora_a, lora_b, hidden, scale, dropout_p,
                                        keep, need_x, need_a, need_b)


torch.library.register_autograd("lora_kernels::lora_linear", _backward, setup_context=_setup_context)
if _extension.module is not None:
    _extension.module.set_python_kernel("lora_linear_grads", _differentiable_grads)


_LoRALinearFunction = eager_fast_path("_LoRALinearFunction", _forward, _setup_context, _backward)


def _dropout_seed(dropout_p: float, x: Tensor) -> Optional[Tensor]:
    """The dropout seed of a call on x: a 0-d int64 tensor drawn from torch's generator of x's device,
    or None without dropout (no tensor: a CPU tensor in a compiled CUDA graph makes Inductor skip CUDA
    graphs under mode="reduce-overhead"). On a GPU it comes from CUDA's generator: the Triton kernels
    read it there (no host sync), and each replay of a captured CUDA graph draws a new one; the torch
    backend reads it on the host (one sync per forward and per backward). On the CPU it comes from the
    CPU generator, as always. torch.manual_seed and activation checkpointing (which restores the CPU and
    CUDA RNG states) reproduce it."""
    if dropout_p > 0.0:
        return torch.randint(SEED_BOUND, (), device=x.device, dtype=torch.int64)
    return None


def _obviously_valid(x, weight, bias, lora_a, lora_b) -> bool:
    """The common case in a handful of attribute reads (a decode step pays for every µs); anything
    else goes through the checks that name what is wrong."""
    try:
        dtype, device = x.dtype, x.device
        n, k = weight.shape
        rank, k_a = lora_a.shape
        n_b, rank_b = lora_b.shape
        return (dtype in FLOAT_DTYPES and x.dim() > 0 and x.shape[-1] == k == k_a and n == n_b
                and rank == rank_b > 0
                and weight.dtype is dtype and lora_a.dtype is dtype and lora_b.dtype is dtype
                and weight.device == device and lora_a.device == device and lora_b.device == device
                and (bias is None or (bias.dtype is dtype and bias.shape == (n,) and bias.device == device)))
    except (AttributeError, TypeError, ValueError):
        return False


def validate_lora_linear(x, weight, bias, lora_a, lora_b) -> None:
    if _obviously_valid(x, weight, bias, lora_a, lora_b):
        return
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    check_tensor("bias", bias, ndim=1, optional=True)
    check_tensor("lora_a", lora_a, ndim=2)
    check_tensor("lora_b", lora_b, ndim=2)
    n, k = weight.shape
    rank = lora_a.shape[0]
    if x.dim() == 0:
        raise ValueError(f"x ({describe(x)}) must have at least 1 dim, the last being K={k}")
    if x.shape[-1] != k:
        raise ValueError(f"x ({describe(x)}) must have last dim K={k}, the in_features of "
                         f"weight ({describe(weight)})")
    if rank < 1:
        raise ValueError(f"lora_a ({describe(lora_a)}) must have rank r >= 1 rows")
    check_shape("lora_a", lora_a, (rank, k), "(r, K) with K = weight.shape[1]")
    check_shape("lora_b", lora_b, (n, rank), "(N, r) with N = weight.shape[0] and r = lora_a.shape[0]")
    if bias is not None:
        check_shape("bias", bias, (n,), "(N,) with N = weight.shape[0]")
    check_same_dtype_and_device(
        "x", {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b})


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    scale: float | Tensor = 1.0, *, dropout_p: float = 0.0,
) -> Tensor:
    """y = x W0ᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ, fused; differentiable in every input that
    requires grad, computing only the gradients asked for. Second derivatives (create_graph=True)
    and forward-mode AD / torch.func (jvp, dual tensors, vmap) run plain torch ops: exact, slower.

    x (..., K), weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r) -> y (..., N).
    dropout_p > 0 drops entries of x on the LoRA branch only (PEFT semantics), always: the caller
    decides training vs eval. The mask derives from a seed drawn from torch's generator: CUDA's for the
    Triton kernels on a GPU (a captured CUDA graph draws a new one at each replay), else the CPU's.
    scale: a python number or 0-d tensor, finite with |scale| <= float32's largest, else ValueError.
    NaN / ±inf in the tensors propagate as in the float64 reference (README, "Non-finite values").
    Routes: inside torch.compile, or with the profiler on, the registered ops lora_kernels::lora_linear
    (and ::lora_linear_backward); under forward-mode AD / torch.func, plain torch ops; CPU tensors with
    the C++ extension loaded (lora_kernels.extension_status()), the registered op in C++ (kernels and
    autograd); else, an input requiring grad, the eager autograd.Function (no dispatcher), or the
    forward directly. DTensor inputs (tensor
    parallelism: README, "Distributed training") take these routes with each rank's shards. On the
    Triton backend each matmul carrying the LoRA term runs the strategy of lora_kernels.tuning (README,
    "Strategies").

    >>> import torch, lora_kernels
    >>> x, w, a, b = torch.randn(3, 5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    >>> y = lora_kernels.lora_linear(x, w, None, a, b, 0.5)
    >>> torch.allclose(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, atol=1e-5)
    True
    """
    # The C++ extension takes a plain CPU call whole (checks, flattening, seed, op: csrc/library.cpp,
    # lora_linear_eager) and gives None for anything else; that skips ~15 µs of Python per call. C++ sees
    # use_backend blocks open anywhere, not a context copied from one (an asyncio task outliving it).
    cpp = _extension.eager_module()
    if (cpp is not None and type(x) is Tensor and type(scale) is float and type(dropout_p) is float
            and not torch.compiler.is_compiling() and not in_transform() and scoped_choice() != "triton"):
        y = cpp.lora_linear_eager(x, weight, bias, lora_a, lora_b, scale, dropout_p)
        if y is not None:
            return y
    validate_lora_linear(x, weight, bias, lora_a, lora_b)
    scale = check_scale(scale)
    dropout_p = check_dropout_p(dropout_p)
    k = weight.shape[1]
    x2d = rows(x, k)                                                            # (M, K)
    seed = _dropout_seed(dropout_p, x2d)
    args = (x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    labelled = None
    if any_dtensor(x2d, weight, bias, lora_a, lora_b):   # tensor parallelism: local shards
        args, labelled = _tensor_parallel.lora_linear_args(*args, SEED_BOUND)

    def composite() -> Tensor:   # args: this rank's shards and seed under tensor parallelism
        x_rows, call_seed = args[0], args[-1]
        backend = resolve_backend(x_rows.device, x_rows.dtype)
        keep = _keep_mask(*x_rows.shape, dropout_p, call_seed, backend, x_rows.device)
        return _composite.lora_linear(*args[:-1], keep)

    grad_wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5])
    y2d = route(lora_linear_op, _LoRALinearFunction, _forward, composite, args, grad_wanted, "lora_linear")
    return unflatten(y2d if labelled is None else labelled(y2d), x)
