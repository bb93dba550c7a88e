"""Modules: LoRALinear (one trainable adapter), MultiLoRALinear (many adapters, one per row), and
the PEFT integration (patch_peft / unpatch_peft)."""

from .lora_linear import LoRALinear
from .multi_lora_linear import MultiLoRALinear, use_adapters, wrap_multi_lora
from .peft import patch_peft, register_fused_peft, unpatch_peft

__all__ = ["LoRALinear", "MultiLoRALinear", "patch_peft", "register_fused_peft", "unpatch_peft", "use_adapters", "wrap_multi_lora"]
