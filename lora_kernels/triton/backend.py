"""The Triton backend: every op's implementation, with the same names and arguments as the torch
backend (lora_kernels.fallback), so the op layer calls either without knowing which it holds."""

from .lora_linear import dropout_keep_mask, lora_linear_backward, lora_linear_forward
from .multi_lora_linear import multi_lora_add_, multi_lora_linear_backward, multi_lora_linear_forward

__all__ = [
    "dropout_keep_mask",
    "lora_linear_backward",
    "lora_linear_forward",
    "multi_lora_add_",
    "multi_lora_linear_backward",
    "multi_lora_linear_forward",
]
