"""The torch backend: lean implementations for CPU (and for CUDA when Triton is missing).

Same semantics as the Triton kernels: base GEMM with the bias fused (addmm), the rank-r product
added in place (addmm_), no (M, N) temporaries besides the output. Everything is 2-D here:
x (M, K), weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r).
"""

from __future__ import annotations

import torch


def hidden_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved rank intermediate T: fp32 for 16-bit and fp32 inputs, fp64 for fp64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dropout_keep_mask(m: int, k: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """(M, K) bool keep-mask derived from `seed` alone, so backward regenerates what forward used.
    Drawn by a private CPU generator: the global generator's state is untouched."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand((m, k), generator=generator) >= dropout_p).to(device)


def dropped(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """dropout(x) with the mask of `seed`; x itself when dropout is off."""
    if dropout_p == 0.0:
        return x
    keep = dropout_keep_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)
    return x * keep * (1.0 / (1.0 - dropout_p))


def lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) and lora_hidden T = dropout(x) Aᵀ (M, r) in hidden_dtype (no copy for fp32/fp64)."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T    # (M, N)
    hidden = dropped(x, dropout_p, seed) @ lora_a.T                             # (M, r)
    y.addmm_(hidden, lora_b.T, alpha=scale)
    return y, hidden.to(hidden_dtype(hidden.dtype))             # fp32 / fp64: no copy


def lora_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor, lora_hidden: torch.Tensor | None,
    scale: float, dropout_p: float, seed: int,
    need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX, dA, dB): dT = s·dY·B;  dX = dY·W0 + mask ⊙ (dT·A);  dA = dTᵀ·dropout(x);  dB = dYᵀ·(s·T).
    The scale multiplies the (M, r) factors, the smallest tensors in play."""
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        grad_t = (grad_y @ lora_b).mul_(scale)                                  # (M, r)
        if need_x:
            grad_x = grad_y @ weight                                            # (M, K)
            if dropout_p == 0.0:
                grad_x.addmm_(grad_t, lora_a)
            else:
                grad_x.add_(dropped(grad_t @ lora_a, dropout_p, seed))
        if need_a:
            grad_a = grad_t.T @ dropped(x, dropout_p, seed)                     # (r, K)
    if need_b:
        grad_b = grad_y.T @ (lora_hidden * scale).to(grad_y.dtype)              # (N, r)
    return grad_x, grad_a, grad_b
