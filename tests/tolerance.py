"""The one tolerance table and comparison helpers: one rule per kind of comparison.

assert_close: one op against the float64 reference (flash-attention's rule). The error may be at
most twice the error of plain torch doing the same maths in the same dtype, plus a floor of a few
units in the last place of that dtype at the reference's magnitude, max |reference|. The floor covers
cases where plain torch happens to be exact (tiny K, r = 1) and a different but equally valid
summation order is not: one rounding of the output costs 0.5 ulp, fp32-accumulated reorderings a few
more, so 8 ulp. An all-zero reference gets no floor: every summation order of exact zeros is exactly
zero, so the result must then be as exact as plain torch's.

assert_close_deep: a deep model's output against the float64 reference (see its docstring). Through
many fp32 layers two summation orders diverge chaotically, so one baseline's max error says little
about another valid order's: the rule compares error statistics against several baselines.

SAME_MATHS: two implementations of the same float maths compared with each other, without a float64
reference, in a shallow computation (one op, or a toy model of two or three layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOOR_ULPS = 8
EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

# rtol = atol for two implementations of the same maths in a shallow computation (K <= ~100,
# |values| <= ~10): two summation orders differ by about sqrt(K) ulp of the partial sums.
#   float32  1e-5: ~80 ulp at 1.0 (measured differences ~1e-6); a scale off by 1e-4 still fails.
#   float16  2e-3: 2 ulp at 1.0: each side rounds its output once (0.5 ulp) after fp32 accumulation.
#   bfloat16 3e-2: 4 ulp at 1.0: one side may round an intermediate (the rank-r hidden) to bf16.
#   float64  1e-12: ~4500 ulp at 1.0, far below any fp32 effect: float64 must stay float64 throughout.
SAME_MATHS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}


def assert_same_maths(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Two implementations of the same float maths (patched vs PEFT, triton vs torch, merged vs
    unmerged) in a shallow computation: rtol = atol = SAME_MATHS[dtype]; dtype: the lowest precision
    either side computes in (default: expected's)."""
    tol = SAME_MATHS[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=msg)


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
    magnitude = reference64.abs().max().item()                     # 0 for an all-zero reference: no floor
    tol = 2.0 * baseline_err + FLOOR_ULPS * EPS[actual.dtype] * magnitude
    max_err = err.max().item()
    if max_err > tol:
        mismatches = int((err > tol).sum())
        relative = f"{max_err / magnitude:.3e}" if magnitude > 0 else "inf (all-zero reference)"
        raise AssertionError(
            f"{name} ({actual.dtype}): max abs error {max_err:.3e} > tolerance {tol:.3e} "
            f"(plain torch error {baseline_err:.3e}, |ref| max {magnitude:.3e}); "
            f"relative error {relative}; {mismatches}/{err.numel()} elements off")


# Deep models (assert_close_deep). Measured on SmolLM2-135M fp32 logits (30 layers, 1.2 M elements,
# AMD EPYC + MKL): over legitimately different summation orders (MKL's, K re-blocked by 48 and by 100,
# the patched model's, and 2 ulp of noise per layer as a stand-in for another BLAS's roundings) the
# RMS error against float64 spans 3.3e-5 .. 2.1e-4, p99.9 1.7e-4 .. 1.4e-3, max 2.5e-4 .. 2.0e-3: a
# spread of ~6x, the same for all three statistics, because the error is one chaotic amplitude times
# a pattern. Against the largest of three baselines the worst valid run sits at 3.6x (RMS), 3.9x
# (p99.9), 3.8x (max). So:
DEEP_RMS_FACTOR = 8.0      # 2x headroom over the worst measured 3.6x; a 1 % scale error is >= 270x the tolerance
DEEP_P999_FACTOR = 8.0     # the same spread as the RMS (one amplitude), so the same factor
DEEP_MAX_FACTOR = 16.0     # one element can sit in a tail the baselines happen to miss: twice as loose


def _error_stats(x: torch.Tensor, reference64: torch.Tensor) -> dict[str, float]:
    err = (x.double() - reference64).abs().flatten()
    p999 = torch.kthvalue(err, max(1, int(0.999 * err.numel()))).values.item()
    return {"rms": err.square().mean().sqrt().item(), "p99.9": p999, "max": err.max().item()}


def deep_margins(actual: torch.Tensor, reference64: torch.Tensor,
                 baselines: list[torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """assert_close_deep's arithmetic: per statistic (observed, tolerance, largest baseline);
    observed / tolerance is the headroom (< 1 passes)."""
    # A floor only against degenerate (exact) baselines: 1 ulp at the output's RMS. Not assert_close's
    # 8 ulp at max |ref|: on SmolLM2 that is 3e-5, half the baselines' RMS error, and would hide it.
    floor = EPS[actual.dtype] * reference64.square().mean().sqrt().item()
    ours = _error_stats(actual, reference64)
    theirs = [_error_stats(b, reference64) for b in baselines]
    factors = {"rms": DEEP_RMS_FACTOR, "p99.9": DEEP_P999_FACTOR, "max": DEEP_MAX_FACTOR}
    result = {}
    for stat, factor in factors.items():
        baseline = max(t[stat] for t in theirs)
        result[stat] = (ours[stat], factor * baseline + floor, baseline)
    return result


def assert_close_deep(actual: torch.Tensor, reference64: torch.Tensor, baselines: list[torch.Tensor],
                      name: str) -> None:
    """A deep model's output (actual, the tested dtype) against the same model in float64, judged by
    error statistics: RMS and p99.9 at most DEEP_RMS_FACTOR / DEEP_P999_FACTOR times, the max at most
    DEEP_MAX_FACTOR times, the largest of the baselines' (plain torch / PEFT in the tested dtype,
    ideally also under reordered_linear), each plus a floor of 1 ulp at the output's RMS.

    Why not a max-error ratio: through 30 fp32 layers a change of summation order is amplified
    chaotically; the max of 1.2 M errors of one run against the max of another is a coin flip
    (2.5x on an Intel Xeon, 3.2x on the AMD EPYC above). Why several baselines: their spread
    measures this model's amplification on this machine and BLAS, so the bound moves with the CPU,
    not a constant.

    Why it cannot pass a wrong scale or a dropped adapter: the baselines' errors are rounding, ~1e-5
    of the output's RMS; a LoRA scale off by 1 % moves the output by 1 % of the adapters'
    contribution, a dropped adapter by all of it: on SmolLM2 270x to 2 200x the RMS tolerance for a
    1 % scale error (27x for 0.1 %), ~20 000x for a dropped adapter, 900x for one dropped from one of
    210 layers; checked by tests/test_tolerance.py and by test_real_models.py's mutation checks."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert baselines and all(b.dtype == actual.dtype for b in baselines), f"{name}: baselines must be {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    failed = [f"{stat} {observed:.3e} > {tol:.3e} (largest baseline {baseline:.3e})"
              for stat, (observed, tol, baseline) in deep_margins(actual, reference64, baselines).items()
              if observed > tol]
    if failed:
        raise AssertionError(f"{name} ({actual.dtype}, {actual.numel()} elements): " + "; ".join(failed))


class reordered_linear(torch.overrides.TorchFunctionMode):
    """Inside it, every F.linear (nn.Linear, PEFT's and transformers' layers) sums over K in blocks
    of `block`, last block first: the summation order of a BLAS with another blocking. A baseline run
    under it is as valid as the plain one; the spread of both measures the model's amplification."""

    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight = args[0], args[1]                                 # (..., K), (N, K)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        out = None
        for start in reversed(range(0, x.shape[-1], self.block)):
            part = F.linear(x[..., start:start + self.block], weight[:, start:start + self.block])
            out = part if out is None else out + part
        return out if bias is None else out + bias


def runs_in_three_orders(forward) -> list:
    """forward() as torch runs it, and with every F.linear's K re-blocked by 48 and by 100: the
    baselines for assert_close_deep (blocks of 48 and 100 match no BLAS kernel's, and K = 576 or 1536
    on SmolLM2 splits into 12 or 6 partial sums)."""
    runs = [forward()]
    for block in (48, 100):
        with reordered_linear(block):
            runs.append(forward())
    return runs
