"""Shared test helpers (importable as tests.helpers; conftest.py re-exports them)."""

import pytest
import torch

from lora_kernels import _backend, _extension
from lora_kernels._backend import triton_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def skip_unless_backend_serves(backend: str, dtype: torch.dtype) -> None:
    """Skip (with the backend's own reason) when `backend` cannot serve `dtype` on DEVICE."""
    if backend == "triton":
        reason = triton_unavailable_reason(DEVICE, dtype)
        if reason is not None:
            pytest.skip(f"triton backend on {DEVICE}: {reason}")



@pytest.fixture
def python_kernels_serve_cpu():
    """With the C++ extension loaded, its CPU kernels hand every call to the Python kernels (as while a
    use_backend("triton") block is open somewhere) and eager calls take the Python route, for a test that
    spies on the Python backend. Without the extension the Python kernels serve anyway."""
    with _backend._triton_blocks_lock:
        _backend._triton_blocks += 1
        _backend._tell_extension()
    try:
        with _extension.python_eager_calls():
            yield
    finally:
        with _backend._triton_blocks_lock:
            _backend._triton_blocks -= 1
            _backend._tell_extension()
