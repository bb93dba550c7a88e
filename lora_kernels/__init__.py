"""lora-kernels: fused LoRA linear layers, y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ, with one adapter or a
different adapter per row (multi_lora_linear).

The top level holds the ops, the modules, AdapterBatch, backend control and PEFT patching. Beside it:
lora_kernels.io (PEFT adapter files), lora_kernels.merging (merging adapters' factors),
lora_kernels.reference (the float64 oracle), lora_kernels.metadata (AdapterBatch and its id check),
lora_kernels.tuning (plan tables), lora_kernels.nn.tensor_parallel (tensor-parallel plans).

Importing this package never imports triton and never touches a GPU. It loads the C++ extension
lora_kernels._C when it is built (extension_status() says whether it serves, and why not).
"""

import importlib

from . import io, merging, reference  # noqa: F401  (namespaces: lora_kernels.io.read_adapter, ...)
from ._backend import get_backend, set_backend, use_backend
from ._deprecated import moved_attribute
from ._extension import extension_status
from .metadata import AdapterBatch
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

__all__ = [
    # ops
    "lora_linear",
    "multi_lora_linear",
    "add_multi_lora_",
    "AdapterBatch",
    # modules
    "LoRALinear",
    "MultiLoRALinear",
    "use_adapters",
    "wrap_multi_lora",
    # backend control
    "get_backend",
    "set_backend",
    "use_backend",
    "extension_status",
    # PEFT patching
    "patch_peft",
    "unpatch_peft",
    "register_fused_peft",
]
__version__ = "0.2.0"

# The top-level names of 0.1 that moved (README, "Public API"): they warn until 0.3.
_MOVED = {
    "AdapterWeights": "lora_kernels.io:AdapterWeights",
    "LayerAdapter": "lora_kernels.io:LayerAdapter",
    "load_adapter": "lora_kernels.io:read_adapter",
    "save_adapter": "lora_kernels.io:write_adapter",
    "delta_weight": "lora_kernels.merging:dense_delta",
    "merge_cat": "lora_kernels.merging:merge_cat",
    "merge_linear": "lora_kernels.merging:merge_linear",
    "merge_svd": "lora_kernels.merging:merge_svd",
    "set_check_adapter_ids": "lora_kernels.metadata:set_check_adapter_ids",
    "lora_linear_reference": "lora_kernels.reference:lora_linear_reference",
    "multi_lora_linear_reference": "lora_kernels.reference:multi_lora_linear_reference",
}


def __getattr__(name: str):
    if name == "adapter_io":   # the 0.1 module (now lora_kernels.io): its names warn when used
        return importlib.import_module("lora_kernels.adapter_io")
    return moved_attribute(__name__, name, _MOVED)
