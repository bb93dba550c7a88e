"""lora_kernels.merging: merging adapters works on the factors and matches the full (N, K) maths.

Every check compares against a float64 oracle built from the *same* input values (the test tensors are
drawn in float64 and cast once, so the cast inputs are the ground truth, exactly representable in float64):

    ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ                          (merge_linear / merge_cat: exact)
    T_k(ΔW) = U_k Σ_k V_kᵀ from torch.linalg.svd  (merge_svd at rank k; deltas compared, since singular
                                                 vectors are not unique)

Tolerances (u = eps / 2, the unit roundoff of a dtype):

- exact merges: lora_b is a copy and each entry of lora_a is wᵢsᵢ·a rounded at most three times (the
  python product to the compute dtype, the multiply, the cast to the output dtype), so every entry of
  the merged delta is off by at most (u64 + 2 u_compute + u_out) · (|B| |wsA|)ᵢⱼ, plus the float64
  summation error of both sides, (2R + 4) u64 · the same.
- merge_svd: QR and SVD are backward stable, so the float32 (float64) result is the exact truncation of
  ΔW + E with ‖E‖_F ≤ c · u · ‖B_cat‖_F ‖A_cat‖_F. Truncation to rank k moves by at most
  ‖E‖ (1 + 2σ₁ / (σ_k − σ_{k+1})) (Wedin), or 2‖E‖ when σ_{k+1} = 0 (the result is then exact). c = 16:
  the worst seen over these shapes is ≈ 4, in the float64 case where the oracle's own error counts too.
- bf16 / fp16 outputs: the float32 result's entries are each rounded once more (relative u_out), so an
  entry of lora_b lora_a moves by at most (2 u_out + u_out²) (|lora_b| |lora_a|)ᵢⱼ on top of the above.
"""

from __future__ import annotations

import doctest
import re

import pytest
import torch

from lora_kernels import merging
from lora_kernels.merging import dense_delta, merge_cat, merge_linear, merge_svd

SVD_C = 16
U64 = torch.finfo(torch.float64).eps / 2


def _u(dtype: torch.dtype) -> float:
    """Unit roundoff of dtype (round to nearest)."""
    return torch.finfo(dtype).eps / 2


def _compute_u(dtype: torch.dtype) -> float:
    return U64 if dtype == torch.float64 else _u(torch.float32)


def _adapters(ranks, n, k, dtype=torch.float64, seed=0, scales=None):
    """[(lora_a (r, K), lora_b (N, r), scale)] drawn in float64 and cast once to dtype; B ~ 1/√r so each
    delta has entries of order 1 whatever r."""
    g = torch.Generator().manual_seed(seed)
    scales = scales or [2.0 / r for r in ranks]
    out = []
    for r, s in zip(ranks, scales):
        lora_a = torch.randn(r, k, generator=g, dtype=torch.float64)
        lora_b = torch.randn(n, r, generator=g, dtype=torch.float64) / r**0.5
        out.append((lora_a.to(dtype), lora_b.to(dtype), s))
    return out


def _stacked64(adapters, weights):
    """(A_cat (R, K), B_cat (N, R)) in float64 with wᵢsᵢ folded into A: the oracle's factors."""
    a_cat = torch.cat([w * s * a.double() for (a, _, s), w in zip(adapters, weights)], dim=0)
    b_cat = torch.cat([b.double() for _, b, _ in adapters], dim=1)
    return a_cat, b_cat


def _delta64(adapters, weights) -> torch.Tensor:
    """Σ wᵢ sᵢ Bᵢ Aᵢ (N, K) in float64, one adapter at a time."""
    return sum(w * s * (b.double() @ a.double()) for (a, b, s), w in zip(adapters, weights))


def _product64(lora_a, lora_b, scale=1.0) -> torch.Tensor:
    return scale * (lora_b.double() @ lora_a.double())


def _svd_tolerance(adapters, weights, sigma: torch.Tensor, k: int, dtype: torch.dtype) -> float:
    """Frobenius bound on ‖merge_svd delta − T_k(ΔW)‖ before any cast to a 16-bit dtype (module doc)."""
    a_cat, b_cat = _stacked64(adapters, weights)
    backward_error = SVD_C * _compute_u(dtype) * (b_cat.norm() * a_cat.norm()).item()
    s1 = sigma[0].item()
    s_k = sigma[k - 1].item() if k <= sigma.numel() else 0.0
    s_next = sigma[k].item() if k < sigma.numel() else 0.0
    if s_next <= 1e-12 * max(s1, 1e-300):
        return 2.0 * backward_error + 1e-300
    return backward_error * (1.0 + 2.0 * s1 / (s_k - s_next))


def _truncate(delta64: torch.Tensor, k: int):
    """(T_k(ΔW) (N, K), all singular values) from the full float64 SVD."""
    u, sigma, vh = torch.linalg.svd(delta64, full_matrices=False)
    return (u[:, :k] * sigma[:k]) @ vh[:k], sigma


# ---------------------------------------------------------------------------------------------
# docstrings
# ---------------------------------------------------------------------------------------------

def test_docstring_examples():
    result = doctest.testmod(merging, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed"
    finder = doctest.DocTestFinder()
    for name in merging.__all__:
        tests = finder.find(getattr(merging, name), name, module=merging)
        assert any(t.examples for t in tests), f"merging.{name} has no docstring example"


# ---------------------------------------------------------------------------------------------
# merge_linear / merge_cat: exact
# ---------------------------------------------------------------------------------------------

EXACT_CASES = [
    # (ranks, weights)
    ((1,), (1.0,)),
    ((4,), (-2.5,)),
    ((8,), (0.0,)),
    ((12,), (0.3,)),
    ((1, 8, 12), (0.7, -1.3, 0.0)),
    ((4, 4, 4), (1.0, 1.0, -1.0)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ranks, weights", EXACT_CASES)
def test_merge_linear_is_exact(ranks, weights, dtype):
    n, k = 24, 40
    adapters = _adapters(ranks, n, k, dtype, seed=sum(ranks))
    lora_a, lora_b, scale = merge_linear(adapters, list(weights))

    r_total = sum(ranks)
    assert (lora_a.shape, lora_b.shape, scale) == ((r_total, k), (n, r_total), 1.0)
    assert lora_a.dtype == lora_b.dtype == dtype
    assert torch.equal(lora_b, torch.cat([b for _, b, _ in adapters], dim=1)), "lora_b must be a plain copy"

    a_cat, b_cat = _stacked64(adapters, weights)
    magnitude = b_cat.abs() @ a_cat.abs()                                   # (N, K): Σⱼ |b||wsa|
    rel = U64 + 2 * _compute_u(dtype) + _u(dtype) + (2 * r_total + 4) * U64
    err = (_product64(lora_a, lora_b, scale) - _delta64(adapters, weights)).abs()
    assert (err <= rel * magnitude * 1.01 + 1e-300).all(), (
        f"max error {err.max():.3e}, max allowed {(rel * magnitude).max():.3e}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_merge_cat_is_merge_linear_with_unit_weights(dtype):
    adapters = _adapters((1, 4, 8), 12, 20, dtype, seed=3, scales=[0.5, 4.0, -1.0])
    cat_a, cat_b, cat_scale = merge_cat(adapters)
    lin_a, lin_b, lin_scale = merge_linear(adapters, [1.0, 1.0, 1.0])
    assert torch.equal(cat_a, lin_a) and torch.equal(cat_b, lin_b) and cat_scale == lin_scale == 1.0
    if dtype == torch.float64:   # A = cat(sᵢ Aᵢ) by rows, B = cat(Bᵢ) by columns
        assert torch.equal(cat_a, torch.cat([s * a for a, _, s in adapters]))
        assert torch.allclose(_product64(cat_a, cat_b), _delta64(adapters, [1.0] * 3), rtol=0, atol=1e-12)


def test_merge_linear_is_not_peft_linear():
    """PEFT's combination_type="linear" averages A and B separately (equal ranks): cross terms Bᵢ Aⱼ.
    merge_linear combines the deltas instead; the two disagree for any two distinct adapters."""
    adapters = _adapters((4, 4), 10, 14, seed=5)
    weights = [0.5, 0.5]
    sqrt_ws = [(w * s) ** 0.5 for (_, _, s), w in zip(adapters, weights)]
    peft_a = sum(c * a for c, (a, _, _) in zip(sqrt_ws, adapters))
    peft_b = sum(c * b for c, (_, b, _) in zip(sqrt_ws, adapters))
    lora_a, lora_b, scale = merge_linear(adapters, weights)
    expected = _delta64(adapters, weights)
    assert torch.allclose(_product64(lora_a, lora_b, scale), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(_product64(peft_a, peft_b), expected, rtol=0, atol=1e-3)


def test_inputs_untouched_and_outputs_detached():
    adapters = [(a.requires_grad_(), b.requires_grad_(), s) for a, b, s in _adapters((2, 3), 8, 6, seed=7)]
    before = [(a.detach().clone(), b.detach().clone()) for a, b, _ in adapters]
    for lora_a, lora_b, _ in (merge_linear(adapters, [1.0, -2.0]), merge_cat(adapters),
                              merge_svd(adapters, [1.0, -2.0], 3)):
        assert not lora_a.requires_grad and not lora_b.requires_grad
    assert not dense_delta(*adapters[0]).requires_grad
    for (a, b, _), (a0, b0) in zip(adapters, before):
        assert torch.equal(a, a0) and torch.equal(b, b0)


def test_non_contiguous_inputs():
    (a, b, s), = _adapters((5,), 9, 7, seed=11)
    a_t = a.T.contiguous().T          # same values, column-major
    b_t = b.T.contiguous().T
    assert not a_t.is_contiguous()
    lora_a, lora_b, _ = merge_svd([(a_t, b_t, s)], [1.0], 3)
    ref, _ = _truncate(_delta64([(a, b, s)], [1.0]), 3)
    assert torch.allclose(_product64(lora_a, lora_b), ref, rtol=0, atol=1e-10)


def test_dense_delta():
    (a, b, s), = _adapters((3,), 5, 4, dtype=torch.bfloat16, seed=2)
    out = dense_delta(a, b, s)
    assert out.shape == (5, 4) and out.dtype == torch.bfloat16
    assert torch.equal(out, _delta64([(a, b, s)], [1.0]).float().to(torch.bfloat16))   # fp32 maths, one rounding


# ---------------------------------------------------------------------------------------------
# merge_svd
# ---------------------------------------------------------------------------------------------

SVD_SHAPES = [
    # (ranks, weights, N, K)
    ((1, 4, 8), (0.7, -1.3, 0.0), 40, 24),    # R = 13 < N, K; the rank-8 adapter weighs 0: ΔW has rank 5
    ((4, 4, 4), (1.0, 0.5, -2.0), 6, 20),     # R = 12 > N = 6
    ((4, 4, 4), (1.0, 0.5, -2.0), 20, 6),     # R = 12 > K = 6
    ((8, 8), (1.0, 1.0), 5, 7),               # R = 16 > N, K
    ((12,), (1.5,), 16, 16),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ranks, weights, n, k", SVD_SHAPES)
def test_merge_svd_matches_truncated_full_svd(ranks, weights, n, k, dtype):
    adapters = _adapters(ranks, n, k, dtype, seed=n + k)
    delta64 = _delta64(adapters, weights)
    for rank in range(1, sum(ranks) + 1):
        lora_a, lora_b, scale = merge_svd(adapters, list(weights), rank)
        assert (lora_a.shape, lora_b.shape, scale) == ((rank, k), (n, rank), 1.0)
        assert lora_a.dtype == lora_b.dtype == dtype
        ref, sigma = _truncate(delta64, rank)
        err = (_product64(lora_a, lora_b) - ref).norm().item()
        tol = _svd_tolerance(adapters, weights, sigma, rank, dtype)
        assert err <= tol, f"rank {rank}: ‖error‖_F {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ranks, weights, n, k", SVD_SHAPES[:3])
def test_eckart_young_error(ranks, weights, n, k, dtype):
    """‖ΔW − merge_svd(k)‖_F = √(Σ_{i>k} σᵢ²): no rank-k adapter does better."""
    adapters = _adapters(ranks, n, k, dtype, seed=n * k)
    delta64 = _delta64(adapters, weights)
    sigma = torch.linalg.svdvals(delta64)
    previous = float("inf")
    for rank in range(1, sum(ranks) + 1):
        lora_a, lora_b, _ = merge_svd(adapters, list(weights), rank)
        err = (delta64 - _product64(lora_a, lora_b)).norm().item()
        best = sigma[rank:].pow(2).sum().sqrt().item()
        tol = _svd_tolerance(adapters, weights, sigma, rank, dtype)   # ‖·‖ is 1-Lipschitz
        assert abs(err - best) <= tol, f"rank {rank}: error {err:.6e}, Eckart–Young {best:.6e}"
        assert err <= previous + tol
        previous = err


def test_merge_svd_is_balanced_and_ordered():
    adapters = _adapters((4, 8), 30, 18, seed=4)
    sigma = torch.linalg.svdvals(_delta64(adapters, [1.0, -0.5]))
    lora_a, lora_b, _ = merge_svd(adapters, [1.0, -0.5], 6)
    # balanced: Bᵀ B = A Aᵀ = diag(σ₁..σ₆), both factors with column / row norms √σ
    assert torch.allclose(lora_b.T @ lora_b, torch.diag(sigma[:6]), rtol=0, atol=1e-10)
    assert torch.allclose(lora_a @ lora_a.T, torch.diag(sigma[:6]), rtol=0, atol=1e-10)
    # sign convention: the largest-magnitude entry of each lora_b column is positive
    rows = lora_b.abs().argmax(dim=0)
    assert (lora_b[rows, torch.arange(6)] > 0).all()


@pytest.mark.parametrize("n, k, ranks", [(6, 20, (4, 4, 4)), (20, 6, (4, 4, 4)), (30, 30, (2, 3))])
def test_merge_svd_rank_above_available_is_exact_and_padded(n, k, ranks):
    """rank > p = min(R, N, K): the exact ΔW, zero-padded to the requested rank."""
    adapters = _adapters(ranks, n, k, seed=1)
    weights = [1.0, -1.0, 0.5][:len(ranks)]
    p = min(sum(ranks), n, k)
    for rank in (p, p + 1, sum(ranks) + 3):
        lora_a, lora_b, _ = merge_svd(adapters, weights, rank)
        assert lora_a.shape == (rank, k) and lora_b.shape == (n, rank)
        assert torch.allclose(_product64(lora_a, lora_b), _delta64(adapters, weights), rtol=0, atol=1e-11)
        assert not lora_a[p:].any() and not lora_b[:, p:].any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_svd_rank_deficient(dtype):
    """The same adapter twice: ΔW has rank r = 4, components past it come out ≈ 0; weights that
    cancel give ≈ 0 everywhere, never NaN."""
    (a, b, s), = _adapters((4,), 16, 12, dtype, seed=9)
    duplicated = [(a, b, s), (a, b, s)]
    delta64 = _delta64(duplicated, [1.0, 0.5])
    for rank in range(1, 9):
        lora_a, lora_b, _ = merge_svd(duplicated, [1.0, 0.5], rank)
        ref, sigma = _truncate(delta64, rank)
        err = (_product64(lora_a, lora_b) - ref).norm().item()
        assert err <= _svd_tolerance(duplicated, [1.0, 0.5], sigma, rank, dtype)
    lora_a, lora_b, _ = merge_svd(duplicated, [1.0, -1.0], 4)
    assert torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()
    assert _product64(lora_a, lora_b).norm().item() <= _svd_tolerance(duplicated, [1.0, -1.0], torch.zeros(1), 4, dtype)
    lora_a, lora_b, _ = merge_svd(duplicated, [0.0, 0.0], 2)
    assert not lora_a.any() and not lora_b.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ranks, weights, n, k", [SVD_SHAPES[0], SVD_SHAPES[1]])
def test_merge_svd_half_precision(ranks, weights, n, k, dtype):
    """16-bit inputs: computed in float32, rounded once to dtype (module doc for the bound)."""
    adapters = _adapters(ranks, n, k, dtype, seed=n + 2 * k)
    delta64 = _delta64(adapters, weights)
    u = _u(dtype)
    for rank in range(1, sum(ranks) + 1):
        lora_a, lora_b, scale = merge_svd(adapters, list(weights), rank)
        assert lora_a.dtype == lora_b.dtype == dtype and scale == 1.0
        ref, sigma = _truncate(delta64, rank)
        rounding = (2 * u + u * u) * (lora_b.double().abs() @ lora_a.double().abs())   # (N, K)
        float32_part = _svd_tolerance(adapters, weights, sigma, rank, torch.float32)
        err = (_product64(lora_a, lora_b) - ref).abs()
        assert (err <= rounding + float32_part).all(), (
            f"rank {rank}: max error {err.max():.3e}, rounding bound there {rounding.max():.3e}, "
            f"float32 part {float32_part:.3e}")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def _shape(*dims) -> str:
    return re.escape(str(tuple(dims)))


MERGES = {
    "merge_linear": lambda adapters, weights=None, rank=2: merge_linear(adapters, weights or [1.0] * len(adapters)),
    "merge_cat": lambda adapters, weights=None, rank=2: merge_cat(adapters),
    "merge_svd": lambda adapters, weights=None, rank=2: merge_svd(adapters, weights or [1.0] * len(adapters), rank),
}


@pytest.fixture(params=sorted(MERGES))
def merge(request):
    return MERGES[request.param]


def _good(ranks=(2, 3)):
    return _adapters(ranks, 6, 8, torch.float32, seed=0)


def test_valid_inputs_do_not_raise(merge):
    merge(_good())


def test_empty_adapter_list(merge):
    with pytest.raises(ValueError, match="adapters is empty"):
        merge([])


def test_adapters_not_a_list(merge):
    with pytest.raises(TypeError, match="adapters must be a list of .*got Tensor"):
        merge(torch.zeros(3))


def test_single_triple_instead_of_list(merge):
    with pytest.raises(TypeError, match=r"adapters\[0\] must be a \(lora_a, lora_b, scale\) triple, got Tensor"):
        merge(_good()[0])


def test_adapter_of_two_items(merge):
    a, b, _ = _good()[1]
    with pytest.raises(TypeError, match=r"adapters\[1\] must be a \(lora_a, lora_b, scale\) triple, got 2 items"):
        merge([_good()[0], (a, b)])


def test_mismatched_k(merge):
    good = _good()
    bad = (torch.randn(3, 9), good[1][1], 1.0)
    with pytest.raises(ValueError, match=rf"adapters\[1\]\.lora_a \(shape {_shape(3, 9)}.*K=8 columns like "
                                         rf"adapters\[0\]\.lora_a \(shape {_shape(2, 8)}"):
        merge([good[0], bad])


def test_mismatched_n(merge):
    good = _good()
    bad = (good[1][0], torch.randn(7, 3), 1.0)
    with pytest.raises(ValueError, match=rf"adapters\[1\]\.lora_b \(shape {_shape(7, 3)}.*N=6 rows"):
        merge([good[0], bad])


def test_rank_mismatch_within_adapter(merge):
    good = _good()
    bad = (good[1][0], torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match=rf"adapters\[1\]\.lora_b \(shape {_shape(6, 2)}.*must have r=3 columns"):
        merge([good[0], bad])


def test_mismatched_dtype_between_adapters(merge):
    good = _good()
    bad = (good[1][0].double(), good[1][1].double(), 1.0)
    with pytest.raises(TypeError, match=r"adapters\[1\]\.lora_a \(.*dtype torch\.float64.*adapters\[0\] has "
                                        r"torch\.float32"):
        merge([good[0], bad])


def test_mismatched_dtype_within_adapter(merge):
    good = _good()
    bad = (good[1][0], good[1][1].half(), 1.0)
    with pytest.raises(TypeError, match=r"adapters\[1\]\.lora_b \(.*dtype torch\.float16.*lora_a has torch\.float32"):
        merge([good[0], bad])


def test_mismatched_device(merge):
    good = _good()
    bad = (good[1][0].to("meta"), good[1][1].to("meta"), 1.0)
    with pytest.raises(ValueError, match=r"adapters\[1\]\.lora_a \(.*device meta\) is on meta but adapters\[0\] "
                                         r"is on cpu"):
        merge([good[0], bad])


def test_integer_dtype(merge):
    with pytest.raises(TypeError, match=r"adapters\[0\]\.lora_a \(.*dtype torch\.int64.*must be floating point"):
        merge([(torch.ones(2, 8, dtype=torch.long), torch.ones(6, 2), 1.0)])


def test_not_a_tensor(merge):
    with pytest.raises(TypeError, match=r"adapters\[0\]\.lora_b must be a torch\.Tensor, got list"):
        merge([(torch.ones(2, 8), [[1.0, 2.0]] * 6, 1.0)])


def test_one_dimensional_lora_a(merge):
    with pytest.raises(ValueError, match=rf"adapters\[0\]\.lora_a \(shape {_shape(8)}.*must be 2-D \(r, K\)"):
        merge([(torch.ones(8), torch.ones(6, 1), 1.0)])


def test_zero_rank(merge):
    with pytest.raises(ValueError, match=r"adapters\[0\]\.lora_a \(shape \(0, 8\).*rank r >= 1"):
        merge([(torch.ones(0, 8), torch.ones(6, 0), 1.0)])


@pytest.mark.parametrize("scale, error, message", [
    ("2", TypeError, r"adapters\[1\] scale must be a python float.*got str"),
    (float("nan"), ValueError, r"adapters\[1\] scale must be finite, got nan"),
    (torch.ones(2), ValueError, r"adapters\[1\] scale \(shape \(2,\).*0-d tensor"),
])
def test_bad_scale(merge, scale, error, message):
    good = _good()
    with pytest.raises(error, match=message):
        merge([good[0], (good[1][0], good[1][1], scale)])


@pytest.mark.parametrize("fn", [merge_linear, lambda adapters, weights: merge_svd(adapters, weights, 2)])
def test_wrong_number_of_weights(fn):
    with pytest.raises(ValueError, match="weights has 1 entries but there are 2 adapters"):
        fn(_good(), [1.0])
    with pytest.raises(ValueError, match="weights has 3 entries but there are 2 adapters"):
        fn(_good(), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("fn", [merge_linear, lambda adapters, weights: merge_svd(adapters, weights, 2)])
def test_bad_weights(fn):
    with pytest.raises(TypeError, match=r"weights\[1\] must be a python float.*got NoneType"):
        fn(_good(), [1.0, None])
    with pytest.raises(ValueError, match=r"weights\[0\] must be finite, got inf"):
        fn(_good(), [float("inf"), 1.0])
    with pytest.raises(TypeError, match="weights must be a sequence of floats.*got float"):
        fn(_good(), 1.0)


def test_weights_as_tensor():
    adapters = _good()
    lora_a, _, _ = merge_linear(adapters, torch.tensor([2.0, -1.0]))
    assert torch.equal(lora_a, merge_linear(adapters, [2.0, -1.0])[0])


@pytest.mark.parametrize("rank, error, message", [
    (0, ValueError, "rank must be >= 1, got 0"),
    (-3, ValueError, "rank must be >= 1, got -3"),
    (2.0, TypeError, "rank must be a python int >= 1, got float"),
    (True, TypeError, "rank must be a python int >= 1, got bool"),
])
def test_bad_rank(rank, error, message):
    with pytest.raises(error, match=message):
        merge_svd(_good(), [1.0, 1.0], rank)


def test_dense_delta_bad_input():
    with pytest.raises(ValueError, match=rf"lora_b \(shape {_shape(6, 3)}.*must have r=2 columns"):
        dense_delta(torch.ones(2, 8), torch.ones(6, 3))
    with pytest.raises(TypeError, match="scale must be a python float"):
        dense_delta(torch.ones(2, 8), torch.ones(6, 2), "1")
