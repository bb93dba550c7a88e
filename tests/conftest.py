"""Test set-up. TRITON_INTERPRET must be set before triton is first imported: without a GPU the
Triton kernels run interpreted on CPU tensors, so CPU CI exercises the real kernels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels._backend import triton_unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    lora_kernels.set_backend("auto")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Each backend in turn, forced with set_backend; skipped with the reason it cannot run here."""
    lora_kernels.set_backend(request.param)
    return request.param


def skip_unless_backend_serves(backend: str, dtype: torch.dtype) -> None:
    """Skip (with the backend's own reason) when `backend` cannot serve `dtype` on DEVICE."""
    if backend == "triton":
        reason = triton_unavailable_reason(DEVICE, dtype)
        if reason is not None:
            pytest.skip(f"triton backend on {DEVICE}: {reason}")
