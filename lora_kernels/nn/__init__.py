"""Modules: LoRALinear (one trainable adapter) and MultiLoRALinear (many adapters, one per row)."""

from .lora_linear import LoRALinear
from .multi_lora_linear import MultiLoRALinear, use_adapters, wrap_multi_lora

__all__ = ["LoRALinear", "MultiLoRALinear", "use_adapters", "wrap_multi_lora"]
