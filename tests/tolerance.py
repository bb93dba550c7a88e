"""The one tolerance table and comparison helper.

Rule (flash-attention's): a backend's error against the float64 reference may be at most twice
the error of plain torch doing the same maths in the same dtype, plus a floor of a few units in
the last place of that dtype at the reference's magnitude. The floor covers cases where plain
torch happens to be exact (tiny K, r = 1) and a different but equally valid summation order is not:
one rounding of the output costs 0.5 ulp, fp32-accumulated reorderings a few more, so 8 ulp.
"""

from __future__ import annotations

import torch

FLOOR_ULPS = 8
EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def assert_close(actual: torch.Tensor, reference64: torch.Tensor, baseline: torch.Tensor, name: str) -> None:
    """actual, baseline: the tested dtype; reference64: float64 of the same shape.
    Fails with max abs error, relative error and mismatch count of both."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert actual.dtype == baseline.dtype, f"{name}: dtype {actual.dtype} != {baseline.dtype}"
    if reference64.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - reference64).abs()
    baseline_err = (baseline.double() - reference64).abs().max().item()
    magnitude = max(reference64.abs().max().item(), 1.0)
    tol = 2.0 * baseline_err + FLOOR_ULPS * EPS[actual.dtype] * magnitude
    max_err = err.max().item()
    if max_err > tol:
        mismatches = int((err > tol).sum())
        raise AssertionError(
            f"{name} ({actual.dtype}): max abs error {max_err:.3e} > tolerance {tol:.3e} "
            f"(plain torch error {baseline_err:.3e}, |ref| max {magnitude:.3e}); "
            f"relative error {max_err / magnitude:.3e}; {mismatches}/{err.numel()} elements off")
