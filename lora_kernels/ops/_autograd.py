"""Autograd plumbing shared by the ops: the eager fast path, when to leave the kernels for the
differentiable compositions (second derivatives, forward-mode AD), the frozen layer's gradients."""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import forward_ad


def eager_fast_path(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function running an op's forward, context and backward without the dispatcher's
    round trips (about 16 µs a call forward, 50 µs with autograd, measured on a CPU: it matters at
    decode sizes). torch.compile and the profiler take the registered op instead.
    forward(ctx, ...) rather than a separate setup_context: with the latter, apply() binds the
    arguments through inspect.signature on every call (about 30 µs). backward runs as given (no
    once_differentiable): a backward recorded with create_graph=True computes differentiable
    gradients itself (see records_second_derivative)."""

    def run_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager_fast_path = True
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(run_forward),
        "backward": staticmethod(backward),
        "__doc__": eager_fast_path.__doc__,
        "__module__": forward.__module__,
    })


def records_second_derivative(*tensors: torch.Tensor | None) -> bool:
    """Whether a backward reading `tensors` must be differentiable itself: it runs with grad mode on
    (create_graph=True; an ordinary backward runs with it off) and something it reads requires grad.
    The kernels' gradients would then be constants to autograd: silently wrong second derivatives."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_x_saved_for_second_derivative(op: str, grad_b_formula: str, x, need_x: bool, need_b: bool) -> None:
    """A create_graph=True backward differentiates lora_b's gradient in x: it needs x, which is not
    saved when lora_a is frozen (dA does not read it; saving it would cost LoRA-FA training its memory)."""
    if need_b and need_x and x is None:
        raise RuntimeError(
            f"{op}: a backward with create_graph=True needs x to differentiate lora_b's gradient "
            f"({grad_b_formula}) in x, but x requires grad and was not saved: lora_a is frozen, so dA does "
            "not need it, and saving x would cost LoRA-FA-style training its memory. For second derivatives "
            "with a frozen lora_a, detach x or freeze lora_b for that call.")


def in_transform() -> bool:
    """Whether inputs may carry forward-mode tangents or torch.func wrappers (jvp, vmap, grad, ...)
    that the kernels would drop: inside a forward-AD dual level, or under a torch.func transform.
    Two cheap reads: the public functions check it on every call."""
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def carries_tangent(t: torch.Tensor) -> bool:
    """Whether t is a forward-AD dual tensor or a torch.func-wrapped tensor."""
    return (torch._C._functorch.is_functorch_wrapped_tensor(t)
            or (forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None))


def backward_impl(ctx, direct: Callable, registered: Callable) -> Callable:
    """The backward op to call: the registered one whenever something may trace or profile
    (torch.compile, opcheck's aot_dispatch, the profiler); the direct call on the eager fast path."""
    fast = getattr(ctx, "eager_fast_path", False) and not torch.autograd._profiler_enabled()
    return direct if fast else registered


def op_backward(ctx, grad_y: torch.Tensor, x: torch.Tensor | None, reads: tuple, differentiable: Callable,
                direct: Callable, registered: Callable, kernel_args: tuple) -> tuple:
    """(dX, dW0, db, dA, dB) of an op's backward, None where not asked for (ctx.need: x, weight, bias,
    lora_a, lora_b). A backward recorded for a second derivative (records_second_derivative over
    grad_y and `reads`) takes differentiable() (torch ops); any other runs the backward op on
    kernel_args, directly or registered (backward_impl). The frozen layer's gradients are plain GEMMs.
    grad_y (M, N) with last stride 1."""
    need_x, need_w, need_bias, need_a, need_b = ctx.need
    grad_x = grad_a = grad_b = None
    if records_second_derivative(grad_y, *reads):
        grad_x, grad_a, grad_b = differentiable()
    elif need_x or need_a or need_b:
        grad_x, grad_a, grad_b = backward_impl(ctx, direct, registered)(*kernel_args)
    grad_w, grad_bias = frozen_layer_grads(grad_y, x, need_w, need_bias)
    return grad_x if need_x else None, grad_w, grad_bias, grad_a if need_a else None, grad_b if need_b else None


def frozen_layer_grads(grad_y: torch.Tensor, x: torch.Tensor | None, need_w: bool, need_bias: bool):
    """(dW0 (N, K) | None, db (N,) | None) for the rare caller who trains the frozen layer too: plain GEMMs."""
    grad_w = grad_y.T @ x if need_w else None
    grad_bias = grad_y.sum(dim=0) if need_bias else None
    return grad_w, grad_bias
