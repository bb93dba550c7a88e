"""What the ops share between validation and the backends: their definition (C++ or Python), the backend
implementation serving a call, x flattened to rows, and the route a call takes.

Routes (the order route() tries them):
1. inside a torch.compile trace -> the registered op (with a fake kernel);
2. forward-mode AD / torch.func transforms -> the op's differentiable composition (_composite);
3. with the profiler on -> the registered op (named in traces; its backward op too);
4. the C++ extension loaded, CPU tensors, a backend other than triton requested -> the registered op
   through the extension's own binding (C++ autograd and kernels: no Python after the call);
5. an input requiring grad (grad mode on) -> the eager fast path (autograd.Function, no dispatcher);
6. else -> the forward called directly.
DTensors (tensor parallelism) take these routes with each rank's local tensors (_tensor_parallel).
Both backends implement every op with the same functions and arguments (fallback.py for torch,
triton/backend.py for Triton): the op layer never branches on which one it holds.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from .. import _extension, fallback
from .._backend import get_backend
from ._autograd import in_transform


def define_op(name: str, kernel: Callable, mutates_args: tuple[str, ...] = ()) -> Callable:
    """The registered op lora_kernels::<name>, served by `kernel` (the Python kernel: backend choice, then
    the backend's implementation). With the C++ extension loaded, the op is C++'s (schema, CPU kernel, CPU
    autograd): `kernel` serves every other device and the CPU calls C++ hands back (another backend
    requested); else `kernel` defines it, as a torch.library custom op with the same schema."""
    qualname = f"lora_kernels::{name}"
    if _extension.module is None:
        return torch.library.custom_op(qualname, kernel, mutates_args=mutates_args)
    torch.library.register_kernel(qualname, None, kernel)   # CompositeExplicitAutograd: all but CPU (C++'s)
    _extension.module.set_python_kernel(name, kernel)
    return getattr(torch.ops.lora_kernels, name).default


def cpp_entry(name: str, args: tuple) -> Callable | None:
    """The extension's binding of op `name` for a call on args (route 4; the first on CPU), or None. Not where
    Python would show the ops one by one: __torch_function__ (tensor subclasses, modes), dispatch modes."""
    module = _extension.eager_module()
    if (module is None or not args[0].is_cpu or get_backend() == "triton" or torch._C._has_torch_function(args)
            or torch._C._len_torch_dispatch_stack() > 0):
        return None
    return getattr(module, name)


def implementation(backend: str) -> ModuleType:
    """The module implementing every op on `backend` ("torch" or "triton", as resolve_backend names
    them): lora_linear_forward / _backward, dropout_keep_mask, multi_lora_linear_forward / _backward,
    multi_lora_add_, with the same arguments in both."""
    if backend == "triton":
        from ..triton import backend as triton_backend   # imports triton: only here

        return triton_backend
    return fallback


def rows(x: Tensor, k: int) -> Tensor:
    """x (..., K) as (M, K) rows with last stride 1: a view when strides allow, else a copy."""
    try:
        x2d = x if x.dim() == 2 else x.reshape(-1, k)
    except RuntimeError as error:   # a DTensor split unevenly on a leading dim cannot be flattened
        raise ValueError(f"x (shape {tuple(x.shape)}, placements {getattr(x, 'placements', None)}) cannot be "
                         f"flattened to (M, K) rows: {error}. Split x on its first dim evenly, on its last "
                         "dim, or not at all") from error
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def unflatten(y2d: Tensor, like: Tensor) -> Tensor:
    """y (M, N) back to like's leading dims: (..., N)."""
    return y2d if like.dim() == 2 else y2d.reshape(*like.shape[:-1], y2d.shape[-1])


def route(registered_op: Callable, fast_path: type, forward: Callable, composite: Callable[[], Tensor],
          args: tuple, grad_wanted: bool, name: str) -> Tensor:
    """y of one call of op `name` through the first route that applies (see the module docstring). The
    op's forward returns (y, saved intermediate); composite() and the extension's binding return y alone."""
    if torch.compiler.is_compiling():
        return registered_op(*args)[0]
    if in_transform():   # forward-mode AD, torch.func: tangents and wrappers need torch ops
        return composite()
    if torch.autograd._profiler_enabled():
        return registered_op(*args)[0]
    cpp_call = cpp_entry(name, args)
    if cpp_call is not None:
        return cpp_call(*args)
    if grad_wanted:
        return fast_path.apply(*args)[0]
    return forward(*args)[0]
