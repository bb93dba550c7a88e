"""Deprecated: this module is lora_kernels.io since 0.2 (load_adapter is read_adapter, save_adapter is
write_adapter). Its names warn until 0.3, which removes the module."""

from ._deprecated import moved_attribute

_MOVED = {name: f"lora_kernels.io:{name}" for name in
          ("AdapterWeights", "LayerAdapter", "CONFIG_NAME", "WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME")}
_MOVED.update(load_adapter="lora_kernels.io:read_adapter", save_adapter="lora_kernels.io:write_adapter",
              lora_scaling="lora_kernels.reference:lora_scaling")
__all__ = list(_MOVED)   # a star import warns for each name too


def __getattr__(name: str):
    return moved_attribute(__name__, name, _MOVED)
