"""The fp32 precision of the Triton dots follows what cuBLAS does for an fp32 matmul under torch's
settings, through both of torch's APIs, and reading it never raises.

cuBLAS (aten/src/ATen/cuda/CUDABlas.cpp) uses tf32 when float32Precision(CUDA, MATMUL) is "tf32":
torch.backends.cuda.matmul.fp32_precision, which falls back to torch.backends.fp32_precision when
"none", and which allow_tf32 and set_float32_matmul_precision also set ("high", "medium": tf32).
allow_tf32's own getter raises once fp32_precision alone made the two APIs disagree. These flags are
plain settings: a CPU build sets and reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from lora_kernels.triton import lora_linear as launch  # noqa: E402

NEW_API = hasattr(torch.backends, "fp32_precision")
needs_new_api = pytest.mark.skipif(not NEW_API, reason="this torch has no fp32_precision API (torch.backends.fp32_precision)")


def _snapshot() -> tuple:
    new = ((torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
           if NEW_API else ())
    return (torch.get_float32_matmul_precision(), *new)


@pytest.fixture(autouse=True)
def _restore_flags():
    saved = _snapshot()     # read in the clean state every test starts from
    yield
    torch.set_float32_matmul_precision(saved[0])
    if NEW_API:
        torch.backends.fp32_precision = saved[1]
        torch.backends.cuda.matmul.fp32_precision = saved[2]
    assert _snapshot() == saved


def _allow_tf32(value):
    def apply():
        torch.backends.cuda.matmul.allow_tf32 = value
    return apply


def _legacy(precision):
    return lambda: torch.set_float32_matmul_precision(precision)


def _matmul(precision):
    def apply():
        torch.backends.cuda.matmul.fp32_precision = precision
    return apply


def _generic(precision):
    def apply():
        torch.backends.fp32_precision = precision
    return apply


# (settings applied in order, what cuBLAS does for fp32, needs the new API)
CASES = {
    "defaults": ([], "ieee", False),
    "allow_tf32": ([_allow_tf32(True)], "tf32", False),
    "allow_tf32_off": ([_allow_tf32(True), _allow_tf32(False)], "ieee", False),
    "highest": ([_legacy("high"), _legacy("highest")], "ieee", False),
    "high": ([_legacy("high")], "tf32", False),
    "medium": ([_legacy("medium")], "tf32", False),
    "matmul_tf32": ([_matmul("tf32")], "tf32", True),          # mixed: allow_tf32's getter raises here
    "matmul_ieee": ([_allow_tf32(True), _matmul("ieee")], "ieee", True),   # mixed too
    "highest_then_matmul_tf32": ([_legacy("highest"), _matmul("tf32")], "tf32", True),
    "matmul_tf32_then_allow_off": ([_matmul("tf32"), _allow_tf32(False)], "ieee", True),
    "generic_tf32": ([_generic("tf32")], "tf32", True),         # matmul "none": the generic setting
    "generic_ieee": ([_allow_tf32(True), _generic("ieee"), _matmul("none")], "ieee", True),
    "generic_tf32_matmul_ieee": ([_generic("tf32"), _matmul("ieee")], "ieee", True),
    "generic_ieee_matmul_tf32": ([_generic("ieee"), _matmul("tf32")], "tf32", True),
    "generic_tf32_then_highest": ([_generic("tf32"), _legacy("highest")], "ieee", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_dots_follow_cublas(case):
    steps, expected, new_api = CASES[case]
    if new_api and not NEW_API:
        pytest.skip("this torch has no fp32_precision API")
    for step in steps:
        step()
    assert launch.dot_precision(torch.float32) == expected
    assert launch.lora_precision(torch.float32) == expected
    for dtype in (torch.float16, torch.bfloat16):   # 16-bit inputs: their own tensor cores, whatever the flags
        assert launch.dot_precision(dtype) == launch.lora_precision(dtype) == "tf32"


@needs_new_api
def test_mixed_api_state_is_the_one_that_raised():
    """The state of "matmul_tf32": torch's legacy getter raises there (what dot_precision once read)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.backends.cuda.matmul.allow_tf32   # noqa: B018
    assert launch.dot_precision(torch.float32) == "tf32"


@needs_new_api
def test_bench_stamp_reads_the_setting_in_a_mixed_state(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import harness

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert harness.environment_stamp("cuda")["allow_tf32"] is True
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert harness.environment_stamp("cuda")["allow_tf32"] is False
