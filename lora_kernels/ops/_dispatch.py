"""What both ops share between validation and the backends: the backend implementation serving a call,
x flattened to rows, and the route a call takes.

Routes (the order route() tries them):
1. inside a torch.compile trace -> the registered op (torch.library custom op with a fake kernel);
2. forward-mode AD / torch.func transforms -> the op's differentiable composition (_composite);
3. with the profiler on -> the registered op (named in traces; its backward op too);
4. an input requiring grad (grad mode on) -> the eager fast path (autograd.Function, no dispatcher);
5. else -> the forward called directly.
DTensors (tensor parallelism) take these routes with each rank's local tensors (_tensor_parallel).
Both backends implement every op with the same functions and arguments (fallback.py for torch,
triton/backend.py for Triton): the op layer never branches on which one it holds.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from .. import fallback
from ._autograd import in_transform


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
          args: tuple, grad_wanted: bool) -> Tensor:
    """y of one call through the first route that applies (see the module docstring). The op's forward
    returns (y, saved intermediate); composite() returns y alone."""
    if torch.compiler.is_compiling():
        return registered_op(*args)[0]
    if in_transform():   # forward-mode AD, torch.func: tangents and wrappers need torch ops
        return composite()
    if torch.autograd._profiler_enabled():
        return registered_op(*args)[0]
    if grad_wanted:
        return fast_path.apply(*args)[0]
    return forward(*args)[0]
