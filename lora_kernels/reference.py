"""Readable torch implementations: the specification and the test oracle.

Nothing here is tuned. Tests run these in float64 and compare every backend against them.
"""

from __future__ import annotations

import torch


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
