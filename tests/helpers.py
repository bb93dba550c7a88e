"""Shared test helpers (importable as tests.helpers; conftest.py re-exports them)."""

import pytest
import torch

from lora_kernels._backend import triton_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def skip_unless_backend_serves(backend: str, dtype: torch.dtype) -> None:
    """Skip (with the backend's own reason) when `backend` cannot serve `dtype` on DEVICE."""
    if backend == "triton":
        reason = triton_unavailable_reason(DEVICE, dtype)
        if reason is not None:
            pytest.skip(f"triton backend on {DEVICE}: {reason}")
