"""lora-kernels: fused LoRA linear layers, y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ.

Importing this package never imports triton and never touches a GPU.
"""

from ._backend import get_backend, set_backend
from .ops.lora_linear import lora_linear
from .reference import lora_linear_reference

__all__ = ["lora_linear", "lora_linear_reference", "set_backend", "get_backend"]
__version__ = "0.1.0"
