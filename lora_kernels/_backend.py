"""Backend choice: which implementation serves a call, and why another could not."""

from __future__ import annotations

import functools
import importlib.util

import torch

from ._env import BACKENDS, backend_from_env, triton_interpreter_enabled

_override: str | None = None


def set_backend(name: str) -> None:
    """Force a backend for every later call: "auto" (CUDA -> triton, CPU -> torch), "triton",
    or "torch". Overrides LORA_KERNELS_BACKEND; set_backend("auto") hands control back to it."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"set_backend({name!r}): expected one of {BACKENDS}")
    _override = None if name == "auto" else name


def get_backend() -> str:
    """The requested backend: set_backend's choice, else LORA_KERNELS_BACKEND, else "auto"."""
    return _override or backend_from_env()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton backend can serve tensors of this device and dtype, else why not."""
    if not _triton_installed():
        return "triton is not installed (pip install 'lora-kernels[triton]')"
    if dtype == torch.float64:
        return "float64 has no Triton kernels (the torch backend serves it: gradcheck, references)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not triton_interpreter_enabled():
            return "CPU tensors run Triton kernels only under the interpreter (TRITON_INTERPRET=1)"
        if dtype == torch.bfloat16:
            return "bfloat16 arithmetic is wrong under the Triton interpreter; use a GPU, or fp16/fp32"
        return None
    return f"no Triton kernels for device type {device.type!r}"


def resolve_backend(device: torch.device, dtype: torch.dtype) -> str:
    """ "triton" or "torch" for one call; raises NotImplementedError when "triton" was forced
    and cannot serve these tensors."""
    requested = get_backend()
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return "torch"
    reason = triton_unavailable_reason(device, dtype)
    if requested == "triton":
        if reason is not None:
            raise NotImplementedError(f"backend 'triton' cannot serve {dtype} tensors on {device}: {reason}")
        return "triton"
    return "triton" if device.type == "cuda" and reason is None else "torch"
