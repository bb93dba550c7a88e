"""The C++ extension lora_kernels._C (csrc/), loaded when lora_kernels is imported.

Loaded, it defines the ops' schemas and runs their CPU kernels and CPU autograd in C++; lora_kernels.ops
adds the fake kernels, the other devices' kernels (the Triton launchers on CUDA) and their autograd to
the same ops. Not built, disabled (LORA_KERNELS_EXTENSION=0) or failing to load (a torch it was not built
against, say), the ops are defined in Python (torch.library.custom_op), as they were before csrc/ existed.
extension_status() says which serves and why.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from types import ModuleType
from typing import Iterator

import torch

from ._env import extension_enabled_from_env


def _load() -> tuple[ModuleType | None, str]:
    if not extension_enabled_from_env():
        return None, "not loaded: LORA_KERNELS_EXTENSION=0"
    try:
        module = importlib.import_module("lora_kernels._C")
    except ModuleNotFoundError:
        return None, ("not built (pip install --no-build-isolation -e . builds it when torch and a C++ compiler "
                      "are present; LORA_KERNELS_BUILD_EXT=1 makes a failed build an error)")
    except (ImportError, OSError) as error:   # built against another torch: undefined symbols, say
        return None, f"failed to load ({error}); rebuild it against torch {torch.__version__}"
    built_for = module.torch_version
    if built_for != torch.__version__.split("+")[0]:   # loaded, but a C++ ABI mismatch may crash it: say so
        warnings.warn(f"lora_kernels._C was built with torch {built_for} but torch {torch.__version__} runs: "
                      "rebuild it (pip install --no-build-isolation -e .)", RuntimeWarning, stacklevel=2)
    return module, f"loaded from {module.__file__} (built with torch {built_for})"


module, _detail = _load()
# Eager calls on CPU enter the C++ ops through `module` (python_eager_calls() turns that off, to compare).
_eager_calls_in_cpp = True


def extension_status() -> str:
    """Which ops serve: "C++ extension loaded from <path> (built with torch X)", else "pure Python: <why>".

    >>> import lora_kernels
    >>> lora_kernels.extension_status().startswith(("C++ extension", "pure Python"))
    True
    """
    return f"C++ extension {_detail}" if module is not None else f"pure Python: C++ extension {_detail}"


def eager_module() -> ModuleType | None:
    """The extension, when eager calls enter the C++ ops through it; else None."""
    return module if _eager_calls_in_cpp else None


@contextlib.contextmanager
def python_eager_calls() -> Iterator[None]:
    """Eager calls take the Python route (autograd.Function, Python kernels) inside the block, even with
    the extension loaded: the benchmarks' "ours (Python)" column. Process-global; not thread-safe."""
    global _eager_calls_in_cpp
    previous, _eager_calls_in_cpp = _eager_calls_in_cpp, False
    try:
        yield
    finally:
        _eager_calls_in_cpp = previous
