"""lora-kernels: fused LoRA linear layers, y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ, with one adapter or a
different adapter per row (multi_lora_linear).

Importing this package never imports triton and never touches a GPU. It loads the C++ extension
lora_kernels._C when it is built (extension_status() says whether it serves, and why not).
"""

from ._backend import get_backend, set_backend, use_backend
from ._extension import extension_status
from .adapter_io import AdapterWeights, LayerAdapter, load_adapter, save_adapter
from .merging import delta_weight, merge_cat, merge_linear, merge_svd
from .metadata import AdapterBatch, set_check_adapter_ids
from .nn import (
    LoRALinear,
    MultiLoRALinear,
    patch_peft,
    register_fused_peft,
    unpatch_peft,
    use_adapters,
    wrap_multi_lora,
)
from .ops.lora_linear import lora_linear
from .ops.multi_lora_linear import add_multi_lora_, multi_lora_linear
from .reference import lora_linear_reference, multi_lora_linear_reference

__all__ = [
    "AdapterBatch",
    "AdapterWeights",
    "LayerAdapter",
    "LoRALinear",
    "MultiLoRALinear",
    "add_multi_lora_",
    "delta_weight",
    "extension_status",
    "get_backend",
    "load_adapter",
    "lora_linear",
    "lora_linear_reference",
    "merge_cat",
    "merge_linear",
    "merge_svd",
    "multi_lora_linear",
    "multi_lora_linear_reference",
    "patch_peft",
    "register_fused_peft",
    "save_adapter",
    "set_backend",
    "set_check_adapter_ids",
    "unpatch_peft",
    "use_adapters",
    "use_backend",
    "wrap_multi_lora",
]
__version__ = "0.1.0"
