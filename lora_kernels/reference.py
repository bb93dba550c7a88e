"""Readable torch implementations: the specification and the test oracle.

Nothing here is tuned. Tests run these in float64 and compare every backend against them.
"""

from __future__ import annotations

import math

import torch


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (the same expressions as
    peft's LoraLayer.update_layer, so the floats are identical)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float = 1.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``y = x W0ᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ`` exactly as written, in x's dtype.

    x: (..., K)   weight: (N, K)   bias: (N,) | None   lora_a: (r, K)   lora_b: (N, r)
    dropout_mask: bool, broadcastable to x (True = keep); kept entries are scaled by 1 / (1 - dropout_p).
    """
    base = x @ weight.T
    if bias is not None:
        base = base + bias
    x_lora = x
    if dropout_mask is not None:
        x_lora = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    return base + scale * ((x_lora @ lora_a.T) @ lora_b.T)


def multi_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[i] = x[i] W0ᵀ + b + scales[j] · (x[i] A[j]ᵀ) B[j]ᵀ`` with ``j = adapter_ids[i]``, one row
    at a time, in x's dtype; ``j = -1`` leaves row i as the base layer's output.

    x: (..., K)   weight: (N, K)   bias: (N,) | None   lora_a: (L, r_max, K)   lora_b: (L, N, r_max)
    scales: (L,)   adapter_ids: (M,) over the rows of x flattened to (M, K)
    ranks: (L,) true ranks, or None for r_max: adapter j uses A[j, :ranks[j]] and B[j, :, :ranks[j]].
    """
    base = x @ weight.T
    if bias is not None:
        base = base + bias
    rows = x.reshape(-1, x.shape[-1])
    out = base.reshape(-1, weight.shape[0]).clone()
    for i, j in enumerate(adapter_ids.tolist()):
        if j < 0:
            continue
        r = lora_a.shape[1] if ranks is None else int(ranks[j])
        out[i] = out[i] + scales[j].to(x.dtype) * ((rows[i] @ lora_a[j, :r].T) @ lora_b[j, :, :r].T)
    return out.reshape(base.shape)
