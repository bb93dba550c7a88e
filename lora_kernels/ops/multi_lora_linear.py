"""multi_lora_linear: y[i] = x[i] W0ᵀ + b + scales[j] · (x[i] A[j]ᵀ) B[j]ᵀ, j = adapter_ids[i] (-1: none).

Layers: public function (validate, flatten, group rows by adapter) -> registered ops
``lora_kernels::multi_lora_linear`` / ``lora_kernels::multi_lora_linear_backward`` (C++'s with the
extension, csrc/: schemas, CPU kernels, CPU autograd; else torch.library custom ops; fake impls, the
other devices' kernels and autograd from here) -> backend (_dispatch.implementation: Triton launchers or
the torch backend, both given the AdapterBatch's tensors). The base layer is torch's own GEMM in both backends
(the split strategy), so rows of no adapter equal F.linear's output bit for bit.
Routes of a call (_dispatch.route), as in lora_linear: inside a torch.compile trace -> the registered
op; forward-mode AD / torch.func -> the differentiable composition (_composite); with the profiler on
-> the registered op; CPU tensors with the extension -> the registered op through its binding; an
input requiring grad -> the eager fast path; else the forward directly; DTensors (tensor parallelism,
_tensor_parallel) take them with each rank's shards.
add_multi_lora_ (inference only): the registered op inside a trace, under the profiler or on CPU with
the extension, else direct.
A backward recorded with create_graph=True computes its gradients with the composition's formulas,
so second derivatives are exact on the eager and registered-op routes (torch.compile's AOT autograd
refuses double backward itself).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from .._backend import resolve_backend
from ..metadata import AdapterBatch, BatchTensors
from .._dtensor import any_dtensor, replicated_local
from . import _composite, _tensor_parallel
from ._autograd import carries_tangent, check_x_saved_for_second_derivative, eager_fast_path, in_transform, op_backward
from ._dispatch import cpp_entry, define_op, implementation, route, rows, unflatten
from .._checks import (
    check_same_dtype_and_device,
    check_scales,
    check_shape,
    check_tensor,
    describe,
    has_internal_overlap,
    hidden_dtype,
)


# The AdapterBatch reaches the registered ops as its tensors (metadata.BatchTensors' fields, in order):
# custom ops take tensors and numbers, not objects.
_BATCH_FIELDS = len(BatchTensors._fields)


def _forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scales: Tensor,
    sorted_rows: Tensor, adapter_starts: Tensor, segment_rows: Tensor, segment_starts: Tensor,
    segment_adapters: Optional[Tensor], ranks: Optional[Tensor], segment_tiles: Tensor, adapter_tiles: Tensor,
    active_adapters: Tensor, row_tile: int, need_hidden: bool,
) -> tuple[Tensor, Tensor]:
    """x (M, K) last stride 1 -> (y (M, N), T = x A[j]ᵀ (M, R) in hidden dtype when need_hidden, else (M, 0)).
    The AdapterBatch comes as its tensors (see lora_kernels.metadata)."""
    m, n, max_rank = x.shape[0], weight.shape[0], lora_a.shape[1]
    if m == 0 or n == 0 or x.is_meta:   # meta tensors: shapes only (their ids have no values to group by)
        return (x.new_empty((m, n)),
                x.new_zeros((m, max_rank if need_hidden else 0), dtype=hidden_dtype(x.dtype)))
    batch = BatchTensors(sorted_rows, adapter_starts, segment_rows, segment_starts, segment_adapters, ranks,
                         segment_tiles, adapter_tiles, active_adapters, row_tile)
    return implementation(resolve_backend(x.device, x.dtype)).multi_lora_linear_forward(
        x, weight, bias, lora_a, lora_b, scales, batch, need_hidden)


def _backward_grads(
    grad_y: Tensor, x: Optional[Tensor], weight: Tensor, lora_a: Tensor, lora_b: Tensor,
    lora_hidden: Optional[Tensor], scales: Tensor,
    sorted_rows: Tensor, adapter_starts: Tensor, segment_rows: Tensor, segment_starts: Tensor,
    segment_adapters: Optional[Tensor], ranks: Optional[Tensor], segment_tiles: Tensor, adapter_tiles: Tensor,
    active_adapters: Tensor, row_tile: int, need_x: bool, need_a: bool, need_b: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX (M, K), dA (L, R, K), dB (L, N, R)); a gradient not asked for comes back empty.
    backend: the one that served the forward."""
    grads = (None, None, None)
    if grad_y.shape[0] > 0 and not grad_y.is_meta:
        batch = BatchTensors(sorted_rows, adapter_starts, segment_rows, segment_starts, segment_adapters, ranks,
                             segment_tiles, adapter_tiles, active_adapters, row_tile)
        grads = implementation(backend).multi_lora_linear_backward(
            grad_y, x, weight, lora_a, lora_b, lora_hidden, scales, batch, need_x, need_a, need_b)
    shapes = _grad_shapes(grad_y, weight, lora_a, lora_b, need_x, need_a, need_b)
    return tuple(g if g is not None else grad_y.new_zeros(shape) for g, shape in zip(grads, shapes))


# C++'s ops when the extension is loaded (csrc/library.cpp), with the same schemas
multi_lora_linear_op = define_op("multi_lora_linear", _forward)
multi_lora_linear_backward_op = define_op("multi_lora_linear_backward", _backward_grads)


@torch.library.register_fake("lora_kernels::multi_lora_linear")
def _(x, weight, bias, lora_a, lora_b, scales, *batch_and_need_hidden):
    hidden_width = lora_a.shape[1] if batch_and_need_hidden[-1] else 0
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], hidden_width), dtype=hidden_dtype(x.dtype)))


def _grad_shapes(grad_y, weight, lora_a, lora_b, need_x, need_a, need_b):
    return ((grad_y.shape[0], weight.shape[1]) if need_x else (0,),
            tuple(lora_a.shape) if need_a else (0,),
            tuple(lora_b.shape) if need_b else (0,))


@torch.library.register_fake("lora_kernels::multi_lora_linear_backward")
def _(grad_y, x, weight, lora_a, lora_b, lora_hidden, scales, *batch_and_flags):
    need_x, need_a, need_b, _backend = batch_and_flags[_BATCH_FIELDS:]
    shapes = _grad_shapes(grad_y, weight, lora_a, lora_b, need_x, need_a, need_b)
    return tuple(grad_y.new_empty(shape) for shape in shapes)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scales = inputs[:6]
    batch = inputs[6:6 + _BATCH_FIELDS]
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    ctx.mark_non_differentiable(output[1])
    ctx.need = (need_x, need_w, need_bias, need_a, need_b)
    # the backend that served the forward serves the backward (it may run outside a use_backend block)
    ctx.backend = resolve_backend(x.device, x.dtype)
    ctx.row_tile = batch[-1]
    # weight and the adapter stacks are parameters (saving them costs no memory); of the
    # activations, only what the requested gradients read
    ctx.save_for_backward(x if (need_a or need_w) else None, weight, lora_a, lora_b,
                          output[1] if need_b else None, scales, *batch[:-1])


def _backward(ctx, grad_y, _grad_hidden):
    x, weight, lora_a, lora_b, lora_hidden, scales, *batch_tensors = ctx.saved_tensors
    batch = BatchTensors(*batch_tensors, ctx.row_tile)
    need_x, _, _, need_a, need_b = ctx.need
    grad_y = rows(grad_y, grad_y.shape[-1])

    def differentiable():   # create_graph=True: torch ops
        return _differentiable_grads(grad_y, x, weight, lora_a, lora_b, lora_hidden, scales, batch.sorted_rows,
                                     batch.adapter_starts, batch.ranks, need_x, need_a, need_b)

    grads = op_backward(
        ctx, grad_y, x, (x, weight, lora_a, lora_b), differentiable, _backward_grads, multi_lora_linear_backward_op,
        (grad_y, x, weight, lora_a, lora_b, lora_hidden, scales, *batch, need_x, need_a, need_b, ctx.backend))
    return grads + (None,) * (2 + _BATCH_FIELDS)


def _differentiable_grads(grad_y, x, weight, lora_a, lora_b, lora_hidden, scales, sorted_rows, adapter_starts,
                          ranks, need_x, need_a, need_b):
    """(dX, dA, dB) as torch ops (create_graph=True): autograd differentiates them again. Also the C++
    autograd's (csrc/autograd.cpp)."""
    check_x_saved_for_second_derivative("multi_lora_linear", "dB[j] = s_j·dY_jᵀ·X_j A[j]ᵀ", x, need_x, need_b)
    return _composite.multi_lora_linear_grads(grad_y, x, weight, lora_a, lora_b, lora_hidden, scales, sorted_rows,
                                              adapter_starts, ranks, need_x, need_a, need_b)


torch.library.register_autograd("lora_kernels::multi_lora_linear", _backward, setup_context=_setup_context)
if _extension.module is not None:
    _extension.module.set_python_kernel("multi_lora_linear_grads", _differentiable_grads)


_MultiLoRALinearFunction = eager_fast_path("_MultiLoRALinearFunction", _forward, _setup_context, _backward)


def validate_multi_lora_linear(x, weight, bias, lora_a, lora_b, scales) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    check_tensor("bias", bias, ndim=1, optional=True)
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x ({describe(x)}) must have last dim K={k}, the in_features of "
                         f"weight ({describe(weight)})")
    if bias is not None:
        check_shape("bias", bias, (n,), "(N,) with N = weight.shape[0]")
    _validate_adapters(x, lora_a, lora_b, scales, n, k, {"weight": weight, "bias": bias})


def _validate_adapters(x, lora_a, lora_b, scales, n: int, k: int, others: dict) -> None:
    """lora_a (L, r_max, K), lora_b (L, N, r_max), scales (L,) against x and the layer's N, K."""
    check_tensor("lora_a", lora_a, ndim=3)
    check_tensor("lora_b", lora_b, ndim=3)
    check_tensor("scales", scales, ndim=1)
    num_adapters, max_rank = lora_a.shape[0], lora_a.shape[1]
    if num_adapters < 1 or max_rank < 1:
        raise ValueError(f"lora_a ({describe(lora_a)}) must be (L, r_max, K) with L >= 1 adapters and r_max >= 1")
    check_shape("lora_a", lora_a, (num_adapters, max_rank, k), f"(L, r_max, K) with K = {k}, x's last dim")
    check_shape("lora_b", lora_b, (num_adapters, n, max_rank),
                f"(L, N, r_max) with L, r_max from lora_a (L, r_max, K) and N = {n}, the layer's out_features")
    check_shape("scales", scales, (num_adapters,), "(L,), one scale per adapter of lora_a (L, r_max, K)")
    check_same_dtype_and_device("x", {"x": x, **others, "lora_a": lora_a, "lora_b": lora_b})
    if scales.device != x.device:
        raise ValueError(f"scales ({describe(scales)}) is on {scales.device} but x is on {x.device}: "
                         "all tensors must be on one device")
    if scales.requires_grad:
        raise ValueError(f"scales ({describe(scales)}) must not require grad: LoRA scaling is a constant, "
                         "not a parameter")
    # finite, |s| <= float32's largest: checked where the values are in host memory (not inside a
    # torch.compile trace: no values there); on a GPU reading them would be a host sync per layer
    if scales.is_cpu and not torch.compiler.is_compiling():
        check_scales(replicated_local(scales, "scales"))


def _adapter_batch(adapter_ids, num_rows: int, num_adapters: int, max_rank: int,
                   device: torch.device) -> AdapterBatch:
    batch = adapter_ids if isinstance(adapter_ids, AdapterBatch) else AdapterBatch(adapter_ids, num_adapters)
    if batch.num_adapters != num_adapters:
        raise ValueError(f"{batch!r} was built for {batch.num_adapters} adapters but lora_a stacks "
                         f"L={num_adapters}")
    if batch.num_rows != num_rows:
        raise ValueError(f"adapter_ids ({batch!r}) has {batch.num_rows} rows but x has M={num_rows} rows "
                         "(x flattened to (M, K)): one id per row")
    if batch.device != device:
        raise ValueError(f"adapter_ids ({batch!r}) is on {batch.device} but x is on {device}: "
                         "all tensors must be on one device")
    if batch.max_rank is not None and batch.max_rank > max_rank:
        raise ValueError(f"{batch!r} has an adapter of rank {batch.max_rank} but the stacks hold "
                         f"r_max={max_rank} (lora_a (L, r_max, K)): ranks must be <= r_max")
    return batch


def _dense_scales(scales: Tensor, dtype: torch.dtype) -> Tensor:
    """(L,) in the rank intermediate's dtype (fp32; fp64 for fp64 x), contiguous: the kernels index it
    densely (a strided or expanded view would be misread)."""
    return scales.to(hidden_dtype(dtype)).contiguous()


def multi_lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
    adapter_ids: Tensor | AdapterBatch,
) -> Tensor:
    """y[i] = x[i] W0ᵀ + b + scales[j] · (x[i] A[j]ᵀ) B[j]ᵀ with j = adapter_ids[i]; j = -1 leaves
    row i exactly as the base layer (F.linear) computes it. Differentiable in x, lora_a, lora_b
    (adapters with no rows get zero gradients), and in weight / bias when they require grad.
    Second derivatives (create_graph=True) and forward-mode AD / torch.func (jvp, dual tensors, vmap)
    run plain torch ops: exact, slower.

    x (..., K), weight (N, K), bias (N,) | None, lora_a (L, r_max, K), lora_b (L, N, r_max),
    scales (L,) floating tensor, adapter_ids (M,) int32/int64 over x's rows flattened to (M, K),
    or an AdapterBatch built once per batch (with per-adapter true ranks, or from segments).
    scales must be finite with |s| <= float32's largest: checked (ValueError) for CPU scales, not read
    back on a GPU. NaN / ±inf in the tensors propagate as in the float64 reference (README,
    "Non-finite values"). Routes: inside torch.compile, or with the profiler on, the registered ops
    lora_kernels::multi_lora_linear (and ::multi_lora_linear_backward); under forward-mode AD /
    torch.func, plain torch ops (a Python loop over adapters); CPU tensors with the C++ extension
    loaded, the registered op in C++; else, an input requiring grad, the eager autograd.Function (no
    dispatcher), or the forward directly. DTensor inputs (tensor parallelism:
    README, "Distributed training") take these routes with each rank's shards; the AdapterBatch is the
    same on every rank.

    >>> import torch, lora_kernels
    >>> x, w = torch.randn(4, 8), torch.randn(6, 8)
    >>> a, b, s = torch.randn(3, 2, 8), torch.randn(3, 6, 2), torch.tensor([0.5, 1.0, 2.0])
    >>> y = lora_kernels.multi_lora_linear(x, w, None, a, b, s, torch.tensor([2, -1, 0, 2]))
    >>> torch.allclose(y[0], x[0] @ w.T + 2.0 * (x[0] @ a[2].T) @ b[2].T, atol=1e-5)
    True
    >>> torch.equal(y[1], (x @ w.T)[1])
    True
    """
    validate_multi_lora_linear(x, weight, bias, lora_a, lora_b, scales)
    num_adapters, _, k = lora_a.shape
    x2d = rows(x, k)                                                            # (M, K)
    batch = _adapter_batch(adapter_ids, x2d.shape[0], num_adapters, lora_a.shape[1], x.device)
    scales = _dense_scales(scales, x.dtype)
    tensors = (x2d, weight, bias, lora_a, lora_b)
    grad_wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    need_hidden = grad_wanted and lora_b.requires_grad
    args = (*tensors, scales, *batch.tensors(), need_hidden)
    labelled = None
    if any_dtensor(*tensors, scales):   # tensor parallelism: each rank's shards
        local, labelled = _tensor_parallel.multi_lora_linear_args(*tensors, scales, batch)
        tensors, scales, args = local[:5], local[5], (*local, need_hidden)

    def composite() -> Tensor:
        return _composite.multi_lora_linear(*tensors, scales, batch.sorted_rows, batch.adapter_starts, batch.ranks)

    y2d = route(multi_lora_linear_op, _MultiLoRALinearFunction, _forward, composite, args, grad_wanted, "multi_lora_linear")
    return unflatten(y2d if labelled is None else labelled(y2d), x)


# ---- the LoRA term alone, added in place into an existing base output (serving) ---------------

def _add(out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
         sorted_rows: Tensor, adapter_starts: Tensor, segment_rows: Tensor, segment_starts: Tensor,
         segment_adapters: Optional[Tensor], ranks: Optional[Tensor], segment_tiles: Tensor, adapter_tiles: Tensor,
         active_adapters: Tensor, row_tile: int) -> None:
    if x.shape[0] == 0 or out.shape[1] == 0 or x.is_meta:
        return
    batch = BatchTensors(sorted_rows, adapter_starts, segment_rows, segment_starts, segment_adapters, ranks,
                         segment_tiles, adapter_tiles, active_adapters, row_tile)
    implementation(resolve_backend(x.device, x.dtype)).multi_lora_add_(out, x, lora_a, lora_b, scales, batch)


add_multi_lora_op = define_op("add_multi_lora_", _add, mutates_args=("out",))


def add_multi_lora_(
    out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor, adapter_ids: Tensor | AdapterBatch,
) -> Tensor:
    """out[i] += scales[j] · (x[i] A[j]ᵀ) B[j]ᵀ in place, j = adapter_ids[i]; rows with j = -1 are not
    touched. For serving: `out` may be any strided view with the base output already in it, such as
    one projection's column slice of a fused qkv GEMM's output; it is updated without a copy — but
    not one whose elements share memory (an expand()ed tensor): ValueError.
    Inference only (no autograd): multi_lora_linear is the differentiable op.

    out (..., N) with the leading dims of x (..., K); lora_a (L, r_max, K), lora_b (L, N, r_max),
    scales (L,), adapter_ids (M,) or an AdapterBatch. Returns out.

    >>> import torch, lora_kernels
    >>> x, w = torch.randn(4, 8), torch.randn(18, 8)
    >>> a, b, s = torch.randn(3, 2, 8), torch.randn(3, 6, 2), torch.tensor([0.5, 1.0, 2.0])
    >>> qkv = x @ w.T                                       # fused q, k, v projections: (4, 3 * 6)
    >>> ids = torch.tensor([2, -1, 0, 2])
    >>> _ = lora_kernels.add_multi_lora_(qkv[:, 6:12], x, a, b, s, ids)   # LoRA on k only
    >>> torch.allclose(qkv[0, 6:12], x[0] @ w[6:12].T + 2.0 * (x[0] @ a[2].T) @ b[2].T, atol=1e-5)
    True
    """
    check_tensor("out", out)
    check_tensor("x", x)
    if out.dim() != x.dim() or out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"out ({describe(out)}) must have the leading dims of x ({describe(x)}): one output "
                         "row per row of x")
    _validate_adapters(x, lora_a, lora_b, scales, out.shape[-1], x.shape[-1], {"out": out})
    if has_internal_overlap(out):
        raise ValueError(f"out ({describe(out)}, strides {out.stride()}) has internal overlap (an expand()ed "
                         "tensor, say): several of its elements share one memory location, so an in-place "
                         "update cannot be right; pass a tensor with distinct elements")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, x, lora_a, lora_b)):
        raise ValueError("add_multi_lora_ is inference-only (no autograd through an in-place update): "
                         "call it under torch.no_grad(), or use multi_lora_linear to train")
    if in_transform() and any(carries_tangent(t) for t in (out, x, lora_a, lora_b, scales)):
        raise ValueError("add_multi_lora_ is inference-only: no forward-mode AD tangents or torch.func "
                         "transforms (jvp, vmap, ...) through an in-place update; use multi_lora_linear")
    num_adapters, _, k = lora_a.shape
    x2d = rows(x, k)                                                            # (M, K)
    try:
        out2d = out if out.dim() == 2 else out.view(-1, out.shape[-1])   # must be a view: updated in place
    except RuntimeError as exc:
        raise ValueError(f"out ({describe(out)}, strides {out.stride()}) cannot be viewed as (M, N) rows "
                         "without a copy; pass it 2-D") from exc
    batch = _adapter_batch(adapter_ids, x2d.shape[0], num_adapters, lora_a.shape[1], x.device)
    scales = _dense_scales(scales, x.dtype)
    args = (out2d, x2d, lora_a, lora_b, scales, *batch.tensors())
    if any_dtensor(out2d, x2d, lora_a, lora_b, scales):   # tensor parallelism: local shards
        args = _tensor_parallel.add_multi_lora_args(*args[:5], batch)
    # routes: the registered op inside a compile trace or with the profiler on, or on CPU with the C++
    # extension (its kernel, through its binding), else the direct call (inference only: no autograd route;
    # forward-mode AD and torch.func were refused above)
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
        fn = add_multi_lora_op
    else:
        fn = cpp_entry("add_multi_lora_", args) or _add
    fn(*args)
    return out
