"""The tolerance helpers themselves (tests/tolerance.py): what they must reject and what they must accept.

The deep-model rule on a multi-layer stand-in (24 residual layers of norm -> linear + LoRA -> tanh, fp32
against float64): it rejects a LoRA scale off by 1 % or 10 % and an adapter dropped from one layer, and
accepts the fused op and a re-blocked summation order. The real-model checks are in test_real_models.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_kernels

from .tolerance import assert_close, assert_close_deep, deep_margins, reordered_linear

LAYERS, WIDTH, RANK = 24, 96, 8


@pytest.fixture(autouse=True)
def _torch_backend():
    lora_kernels.set_backend("torch")


def stand_in_weights():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(WIDTH, WIDTH, generator=g) / WIDTH**0.5, torch.randn(RANK, WIDTH, generator=g) / WIDTH**0.5,
             torch.randn(WIDTH, RANK, generator=g) / RANK**0.5, 0.5) for _ in range(LAYERS)]


def stand_in(x, weights, fused=False, scale_factor=1.0, dropped_layer=None):
    """x (M, WIDTH) -> (M, WIDTH) in x's dtype; each layer h + tanh(n W^T + s (n A^T) B^T), n = rms-normed h."""
    h = x
    for i, (w, a, b, scale) in enumerate(weights):
        w, a, b = (t.to(x.dtype) for t in (w, a, b))
        s = 0.0 if i == dropped_layer else scale * scale_factor
        n = h / h.square().mean(-1, keepdim=True).sqrt()
        if fused:
            y = lora_kernels.lora_linear(n, w, None, a, b, s)
        else:
            y = F.linear(n, w) + s * F.linear(F.linear(n, a), b)
        h = h + torch.tanh(y)
    return h


@pytest.fixture(scope="module")
def deep_case():
    weights = stand_in_weights()
    x = torch.randn(512, WIDTH, generator=torch.Generator().manual_seed(1))
    reference64 = stand_in(x.double(), weights)
    baselines = [stand_in(x, weights)]
    for block in (16, 40):
        with reordered_linear(block):
            baselines.append(stand_in(x, weights))
    return x, weights, reference64, baselines


def test_deep_rule_accepts_the_fused_op_and_other_summation_orders(deep_case):
    x, weights, reference64, baselines = deep_case
    assert_close_deep(stand_in(x, weights, fused=True), reference64, baselines, "fused")
    for block in (7, 32):
        with reordered_linear(block):
            assert_close_deep(stand_in(x, weights), reference64, baselines, f"K blocks of {block}")
    for i, left_out in enumerate(baselines):             # each baseline judged by the others
        assert_close_deep(left_out, reference64, baselines[:i] + baselines[i + 1:], f"baseline {i}")


@pytest.mark.parametrize("mutant", [{"scale_factor": 1.01}, {"scale_factor": 1.1}, {"scale_factor": 0.99},
                                    {"dropped_layer": 12}], ids=["scale+1%", "scale+10%", "scale-1%", "dropped"])
def test_deep_rule_rejects_a_wrong_scale_or_a_dropped_adapter(deep_case, mutant):
    x, weights, reference64, baselines = deep_case
    wrong = stand_in(x, weights, fused=True, **mutant)
    margins = deep_margins(wrong, reference64, baselines)
    assert all(observed > 10 * tol for observed, tol, _ in margins.values()), margins   # not marginal
    with pytest.raises(AssertionError, match="rms .* > .*p99.9 .* > .*max .* >"):
        assert_close_deep(wrong, reference64, baselines, "mutant")


def test_floor_scales_with_the_reference_magnitude():
    """bf16 values ~1e-3: the floor is 8 ulp of bf16 at max |ref| (~6e-5), not at 1.0 (0.06)."""
    reference64 = torch.full((64,), 1e-3, dtype=torch.float64)
    exact = reference64.to(torch.bfloat16)
    assert_close(exact, reference64, exact, "exact")
    off = exact + torch.tensor(2e-4, dtype=torch.bfloat16)          # 20 % off; plain torch rounds only
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close(off, reference64, exact, "20 % off")


def test_all_zero_reference_needs_exact_zeros():
    """Every summation order of exact zeros is zero: no floor, and a clear message (no division by 0)."""
    reference64 = torch.zeros(8, dtype=torch.float64)
    zeros = torch.zeros(8)
    assert_close(zeros, reference64, zeros, "zeros")
    with pytest.raises(AssertionError, match="all-zero reference"):
        assert_close(zeros + 1e-30, reference64, zeros, "not zero")
