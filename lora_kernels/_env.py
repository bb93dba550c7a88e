"""The one reader of ``LORA_KERNELS_*`` environment variables.

Read at call time (not import time), so a test or a script may set them after ``import lora_kernels``.
"""

import os

BACKENDS = ("auto", "triton", "torch")


def backend_from_env() -> str:
    """``LORA_KERNELS_BACKEND``: ``auto`` (default) | ``triton`` | ``torch``."""
    value = os.environ.get("LORA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"LORA_KERNELS_BACKEND={value!r}: expected one of {BACKENDS}")
    return value


def triton_interpreter_enabled() -> bool:
    """``TRITON_INTERPRET=1`` runs Triton kernels on CPU tensors (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
