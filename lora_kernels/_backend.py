"""Backend choice: which implementation serves a call, and why another could not."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import threading
from typing import Iterator

import torch

from . import _extension
from ._env import BACKENDS, backend_from_env, triton_interpreter_enabled

# Precedence, highest first: use_backend (this thread / asyncio task), set_backend (the process),
# LORA_KERNELS_BACKEND, "auto".
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("lora_kernels_backend", default=None)
_override: str | None = None
# use_backend("triton") blocks open in any thread or task: while there are some, or set_backend("triton")
# holds, the C++ CPU kernels hand calls to Python, which reads the choice (the extension cannot read a
# ContextVar); LORA_KERNELS_BACKEND the C++ side reads itself.
_triton_blocks = 0
_triton_blocks_lock = threading.Lock()


def _tell_extension() -> None:
    """Called holding _triton_blocks_lock (a stale answer written last would let C++ serve a triton block)."""
    if _extension.module is not None:
        _extension.module.set_python_backend_requested(_override == "triton" or _triton_blocks > 0)


def _check_name(call: str, name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{call}({name!r}): expected one of {BACKENDS}")
    if torch.compiler.is_compiling():
        # The registered ops read the backend when they run. Traced, this assignment would be a side
        # effect replayed after the whole graph has run, so the ops traced after it would not see it:
        # end the graph here instead, so the choice applies from here on as in eager mode
        # (under fullgraph=True dynamo raises, naming this line).
        torch._dynamo.graph_break()


def set_backend(name: str) -> None:
    """Force a backend for every later call in every thread of the process: "auto" (CUDA -> triton,
    CPU -> torch), "triton", or "torch". Overrides LORA_KERNELS_BACKEND; set_backend("auto") hands
    control back to it. Process-global: for one thread or one asyncio task, use `use_backend`."""
    global _override
    _check_name("set_backend", name)
    with _triton_blocks_lock:
        _override = None if name == "auto" else name
        _tell_extension()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block, for the current thread or asyncio task only
    (a contextvars.ContextVar): other threads and tasks keep their own choice. Overrides set_backend
    and LORA_KERNELS_BACKEND; blocks nest, and the previous choice comes back on exit. Asyncio tasks
    created inside the block inherit the choice; threads and executor workers started inside it do not.

    >>> import torch, lora_kernels
    >>> with lora_kernels.use_backend("torch"):
    ...     lora_kernels.get_backend()
    'torch'
    """
    global _triton_blocks
    _check_name("use_backend", name)
    token = _scoped.set(name)
    if name == "triton":
        with _triton_blocks_lock:
            _triton_blocks += 1
            _tell_extension()
    try:
        yield
    finally:
        try:
            _scoped.reset(token)   # raises if the block is left in another context (a generator closed there)
        finally:
            if name == "triton":
                with _triton_blocks_lock:
                    _triton_blocks -= 1
                    _tell_extension()


# The choice of this context's use_backend block, None outside any: one ContextVar read.
scoped_choice = _scoped.get


def get_backend() -> str:
    """The requested backend: use_backend's (this thread or task), else set_backend's, else
    LORA_KERNELS_BACKEND, else "auto"."""
    return _scoped.get() or _override or backend_from_env()


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


# the C++ autograd asks which backend serves a CPU call while _tell_extension says another may
if _extension.module is not None:
    _extension.module.set_python_kernel("resolve_backend", lambda x: resolve_backend(x.device, x.dtype))
