"""Merge several LoRA adapters of one layer into one adapter, working on the factors only.

An adapter is a triple ``(lora_a, lora_b, scale)`` in PEFT / ``nn.Linear`` layout, never transposed:
``lora_a`` (r, K), ``lora_b`` (N, r), ``scale`` a python float (PEFT's ``scaling``, lora_alpha / r).
Its delta is ``ΔW = scale · B A``, shape (N, K), the update to the (N, K) weight of ``nn.Linear(K, N)``.

Every merge here combines *deltas*, ``ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ``, and returns one adapter
``(lora_a, lora_b, 1.0)`` in the inputs' dtype:

- ``merge_linear(adapters, weights)``: exact, rank R = Σ rᵢ (concatenation with wᵢ sᵢ folded into A).
- ``merge_cat(adapters)``: ``merge_linear`` with every weight 1.0.
- ``merge_svd(adapters, weights, rank)``: the best rank-``rank`` approximation of the same ΔW.

"linear" and "cat" differ only in the weights. PEFT's ``add_weighted_adapter(combination_type="linear")``
is a different operation: for equal ranks it averages A and B *separately*,
``(Σ √(wᵢsᵢ) Bᵢ)(Σ ±√(wᵢsᵢ) Aᵢ)``, whose product has cross terms ``Bᵢ Aⱼ`` (i ≠ j) and is not
``Σ wᵢ sᵢ Bᵢ Aᵢ``. Nothing here does that.

None of the merges forms an (N, K) matrix: the SVD merge costs O((N + K) R² + R³). The arithmetic runs
in float32 (float64 for float64 inputs), under ``torch.no_grad()``; results never require grad.
``dense_delta`` forms ΔW and is meant for tests and small layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import FLOAT_DTYPES, check_same_dtype_and_device, describe
from ._deprecated import moved_attribute

__all__ = ["dense_delta", "merge_cat", "merge_linear", "merge_svd"]

Adapter = tuple[torch.Tensor, torch.Tensor, float]   # (lora_a (r, K), lora_b (N, r), scale)
Merged = tuple[torch.Tensor, torch.Tensor, float]    # (lora_a (r_out, K), lora_b (N, r_out), 1.0)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _as_float(name: str, value) -> float:
    """A finite python int/float, or a 0-d tensor that does not require grad, as a python float."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} ({describe(value)}) must be a python float or a 0-d tensor")
        if value.requires_grad:
            raise ValueError(f"{name} ({describe(value)}) must not require grad: merging is not differentiable "
                             "in its weights here")
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a python float (or a 0-d tensor), got {type(value).__name__}")
    value = float(value)
    if not abs(value) < float("inf"):   # False for inf and nan
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_factors(name: str, lora_a, lora_b) -> None:
    """lora_a (r, K), lora_b (N, r): 2-D floating tensors with r >= 1, same dtype and device."""
    for part, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}{part} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}{part} ({describe(t)}) must be floating point, one of {FLOAT_DTYPES}")
        if t.dim() != 2:
            layout = "(r, K)" if part == "lora_a" else "(N, r)"
            raise ValueError(f"{name}{part} ({describe(t)}) must be 2-D {layout}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"{name}lora_a ({describe(lora_a)}) must have rank r >= 1 rows")
    if lora_b.shape[1] != r:
        raise ValueError(f"{name}lora_b ({describe(lora_b)}) must have r={r} columns, the rows of "
                         f"{name}lora_a ({describe(lora_a)})")
    check_same_dtype_and_device(f"{name}lora_a", {f"{name}lora_a": lora_a, f"{name}lora_b": lora_b})


def _check_matches_first(i: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         a0: torch.Tensor, b0: torch.Tensor) -> None:
    """Adapter i has the K, N, dtype and device of adapter 0 (its rank may differ)."""
    if lora_a.shape[1] != a0.shape[1]:
        raise ValueError(f"adapters[{i}].lora_a ({describe(lora_a)}) must have K={a0.shape[1]} columns like "
                         f"adapters[0].lora_a ({describe(a0)}): all adapters must belong to one layer")
    if lora_b.shape[0] != b0.shape[0]:
        raise ValueError(f"adapters[{i}].lora_b ({describe(lora_b)}) must have N={b0.shape[0]} rows like "
                         f"adapters[0].lora_b ({describe(b0)}): all adapters must belong to one layer")
    check_same_dtype_and_device("adapters[0]", {"adapters[0]": a0, f"adapters[{i}].lora_a": lora_a}, what="adapters")


def _check_adapters(adapters) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """A non-empty sequence of (lora_a (r_i, K), lora_b (N, r_i), scale) sharing N, K, dtype, device."""
    if isinstance(adapters, torch.Tensor) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a list of (lora_a, lora_b, scale) triples, got {type(adapters).__name__}")
    if len(adapters) == 0:
        raise ValueError("adapters is empty: need at least one (lora_a, lora_b, scale) triple to merge")
    checked = []
    for i, adapter in enumerate(adapters):
        if isinstance(adapter, torch.Tensor) or not isinstance(adapter, Sequence) or len(adapter) != 3:
            got = type(adapter).__name__ if not isinstance(adapter, Sequence) else f"{len(adapter)} items"
            raise TypeError(f"adapters[{i}] must be a (lora_a, lora_b, scale) triple, got {got}")
        lora_a, lora_b, scale = adapter
        _check_factors(f"adapters[{i}].", lora_a, lora_b)
        if i > 0:
            _check_matches_first(i, lora_a, lora_b, checked[0][0], checked[0][1])
        checked.append((lora_a, lora_b, _as_float(f"adapters[{i}] scale", scale)))
    return checked


def _check_weights(weights, count: int) -> list[float]:
    """One finite float per adapter."""
    if isinstance(weights, torch.Tensor) and weights.dim() == 1:
        weights = list(weights.unbind())
    if not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of floats, one per adapter, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"weights has {len(weights)} entries but there are {count} adapters: need one weight "
                         "per adapter")
    return [_as_float(f"weights[{i}]", w) for i, w in enumerate(weights)]


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be a python int >= 1, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return rank


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 / bf16 / fp16 compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stack(adapters: list[tuple[torch.Tensor, torch.Tensor, float]], coefficients: list[float]):
    """(A_cat (R, K), B_cat (N, R)) in the compute dtype with B_cat A_cat = Σ cᵢ sᵢ Bᵢ Aᵢ, R = Σ rᵢ.

    The product cᵢ sᵢ is folded into the rows of Aᵢ; B_cat is the Bᵢ side by side, unscaled.
    """
    dtype = _compute_dtype(adapters[0][0].dtype)
    a_cat = torch.cat([a.to(dtype) * (c * s) for (a, _, s), c in zip(adapters, coefficients)], dim=0)  # (R, K)
    b_cat = torch.cat([b.to(dtype) for _, b, _ in adapters], dim=1)                                    # (N, R)
    return a_cat, b_cat


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u[:, j], vh[j]) so the largest-magnitude entry of u[:, j] is positive.

    u: (N, k)   vh: (k, K). The product u diag(σ) vh is unchanged; the sign choice of the SVD
    (which differs between devices and drivers) no longer shows in the result.
    """
    rows = u.abs().argmax(dim=0)                                     # (k,)
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)    # (k,)
    return u * signs, vh * signs[:, None]


def _truncated_svd_of_product(b_cat: torch.Tensor, a_cat: torch.Tensor, rank: int):
    """The top min(rank, N, K, R) singular triplets of B_cat A_cat without forming it.

    b_cat: (N, R)   a_cat: (R, K)   ->   u (N, p), sigma (p,), vh (p, K), p = min(rank, N, K, R).
    B_cat = Q_B R_B and A_catᵀ = Q_A R_A (reduced QR), so B_cat A_cat = Q_B (R_B R_Aᵀ) Q_Aᵀ, and the
    SVD of the small core R_B R_Aᵀ (min(N, R), min(K, R)) gives that of the product.
    """
    q_b, r_b = torch.linalg.qr(b_cat, mode="reduced")      # (N, m_b), (m_b, R), m_b = min(N, R)
    q_a, r_a = torch.linalg.qr(a_cat.T, mode="reduced")    # (K, m_a), (m_a, R), m_a = min(K, R)
    core = r_b @ r_a.T                                     # (m_b, m_a)
    u_core, sigma, vh_core = torch.linalg.svd(core, full_matrices=False)
    p = min(rank, sigma.shape[0])
    u = q_b @ u_core[:, :p]                                # (N, p)
    vh = vh_core[:p] @ q_a.T                               # (p, K)
    return u, sigma[:p], vh


def _merge_exact(adapters: list[tuple[torch.Tensor, torch.Tensor, float]], coefficients: list[float]) -> Merged:
    """(A_cat, B_cat, 1.0) of _stack, in the inputs' dtype."""
    dtype = adapters[0][0].dtype
    with torch.no_grad():
        a_cat, b_cat = _stack(adapters, coefficients)        # (R, K), (N, R)
    return a_cat.to(dtype), b_cat.to(dtype), 1.0


# ---------------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------------

def dense_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``ΔW = scale · B A``, shape (N, K), in lora_a's dtype (computed in float32, or float64).

    lora_a: (r, K)   lora_b: (N, r)   scale: python float (or 0-d tensor).
    Forms the full (N, K) matrix: for tests and small layers only; the merges never call it.

    >>> import torch
    >>> from lora_kernels.merging import dense_delta
    >>> lora_a = torch.tensor([[1.0, 2.0, 3.0]])          # (r=1, K=3)
    >>> lora_b = torch.tensor([[1.0], [-1.0]])            # (N=2, r=1)
    >>> dense_delta(lora_a, lora_b, 0.5)
    tensor([[ 0.5000,  1.0000,  1.5000],
            [-0.5000, -1.0000, -1.5000]])
    """
    _check_factors("", lora_a, lora_b)
    scale = _as_float("scale", scale)
    dtype = _compute_dtype(lora_a.dtype)
    with torch.no_grad():
        delta = (lora_b.to(dtype) @ lora_a.to(dtype)) * scale     # (N, K)
    return delta.to(lora_a.dtype)


def merge_linear(adapters: Sequence[Adapter], weights: Sequence[float]) -> Merged:
    """Exact weighted sum of the adapters' deltas as one adapter of rank R = Σ rᵢ.

    adapters: [(lora_a (rᵢ, K), lora_b (N, rᵢ), scale sᵢ), ...]   weights: [wᵢ, ...] (floats or a 1-D tensor),
    one per adapter.
    Returns ``(lora_a (R, K), lora_b (N, R), 1.0)`` in the inputs' dtype with

        1.0 · lora_b lora_a = Σ wᵢ sᵢ Bᵢ Aᵢ

    by concatenation: lora_a stacks the rows wᵢ sᵢ Aᵢ, lora_b puts the Bᵢ side by side, unchanged.
    The scale is folded into lora_a (as PEFT's "cat" merge does), so the result's scale is always 1.0
    and lora_b is an exact copy of the inputs. Weights may be negative or zero; an adapter with weight 0
    still takes its rᵢ (zero) rows, so the rank is always Σ rᵢ.

    This is the linear combination of the *deltas*. It is not PEFT's ``combination_type="linear"``, which
    for equal ranks combines A and B separately and so adds cross terms Bᵢ Aⱼ. ``merge_svd`` compresses
    the same delta to a chosen rank.

    >>> import torch
    >>> from lora_kernels.merging import dense_delta, merge_linear
    >>> g = torch.Generator().manual_seed(0)
    >>> randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    >>> a1, b1 = randn(4, 16), randn(32, 4)                  # rank 4, K=16, N=32
    >>> a2, b2 = randn(8, 16), randn(32, 8)                  # rank 8
    >>> lora_a, lora_b, scale = merge_linear([(a1, b1, 2.0), (a2, b2, 0.5)], [0.7, -0.3])
    >>> tuple(lora_a.shape), tuple(lora_b.shape), scale
    ((12, 16), (32, 12), 1.0)
    >>> expected = 0.7 * dense_delta(a1, b1, 2.0) - 0.3 * dense_delta(a2, b2, 0.5)
    >>> torch.allclose(dense_delta(lora_a, lora_b, scale), expected)
    True
    """
    checked = _check_adapters(adapters)
    return _merge_exact(checked, _check_weights(weights, len(checked)))


def merge_cat(adapters: Sequence[Adapter]) -> Merged:
    """Exact sum of the adapters' deltas as one adapter of rank R = Σ rᵢ: ``merge_linear`` with weights 1.

    adapters: [(lora_a (rᵢ, K), lora_b (N, rᵢ), scale sᵢ), ...]
    Returns ``(lora_a (R, K), lora_b (N, R), 1.0)``, in the inputs' dtype, with
    lora_a = cat(sᵢ Aᵢ) by rows and lora_b = cat(Bᵢ) by columns, so 1.0 · lora_b lora_a = Σ sᵢ Bᵢ Aᵢ.
    Each scale is folded into its rows of lora_a; lora_b is an exact copy of the inputs.

    >>> import torch
    >>> from lora_kernels.merging import dense_delta, merge_cat
    >>> g = torch.Generator().manual_seed(0)
    >>> randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    >>> a1, b1 = randn(2, 5), randn(3, 2)                    # rank 2, K=5, N=3
    >>> a2, b2 = randn(1, 5), randn(3, 1)                    # rank 1
    >>> lora_a, lora_b, scale = merge_cat([(a1, b1, 4.0), (a2, b2, 1.0)])
    >>> tuple(lora_a.shape), tuple(lora_b.shape), scale
    ((3, 5), (3, 3), 1.0)
    >>> torch.equal(lora_a[:2], 4.0 * a1), torch.equal(lora_b[:, 2:], b2)
    (True, True)
    >>> torch.allclose(dense_delta(lora_a, lora_b), dense_delta(a1, b1, 4.0) + dense_delta(a2, b2))
    True
    """
    checked = _check_adapters(adapters)
    return _merge_exact(checked, [1.0] * len(checked))


def merge_svd(adapters: Sequence[Adapter], weights: Sequence[float], rank: int) -> Merged:
    """Best rank-``rank`` approximation (Frobenius and spectral norm) of ``Σ wᵢ sᵢ Bᵢ Aᵢ`` as one adapter.

    adapters: [(lora_a (rᵢ, K), lora_b (N, rᵢ), scale sᵢ), ...]   weights: [wᵢ, ...]   rank: int >= 1.
    Returns ``(lora_a (rank, K), lora_b (N, rank), 1.0)`` in the inputs' dtype with
    lora_b lora_a = U_k Σ_k V_kᵀ, the SVD of ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ truncated to its top k singular values
    (Eckart–Young). Computed from the factors, never forming (N, K): stack B_cat (N, R) and A_cat (R, K)
    as ``merge_linear`` does (R = Σ rᵢ), take the reduced QR of B_cat and of A_catᵀ, the SVD of the
    small core R_B R_Aᵀ, truncate, and map back through the Q factors. Works for R > N and R > K.

    - Balanced: lora_b = U_k √Σ_k and lora_a = √Σ_k V_kᵀ, so column j of lora_b and row j of lora_a
      both have norm √σⱼ, like a trained LoRA; the scale is 1.0. Components come in decreasing σ,
      and each pair's sign makes the largest-magnitude entry of the lora_b column positive.
    - rank larger than the rank ΔW can have (p = min(R, N, K)): the result is exact (ΔW itself) and
      is zero-padded to ``rank`` components, so the shapes are always (rank, K) and (N, rank).
      ``merge_linear`` gives the exact delta without padding.
    - A rank-deficient ΔW (e.g. the same adapter twice) is fine: components past its numerical rank
      have σ ≈ 0 and so come out ≈ 0.

    >>> import torch
    >>> from lora_kernels.merging import dense_delta, merge_svd
    >>> g = torch.Generator().manual_seed(0)
    >>> adapters = [(torch.randn(8, 64, generator=g, dtype=torch.float64),
    ...              torch.randn(48, 8, generator=g, dtype=torch.float64), 0.5) for _ in range(2)]
    >>> lora_a, lora_b, scale = merge_svd(adapters, [1.0, 1.0], rank=4)
    >>> tuple(lora_a.shape), tuple(lora_b.shape), scale
    ((4, 64), (48, 4), 1.0)
    >>> full = dense_delta(*adapters[0]) + dense_delta(*adapters[1])   # (48, 64), for the check only
    >>> u, s, vh = torch.linalg.svd(full)
    >>> torch.allclose(dense_delta(lora_a, lora_b), u[:, :4] @ torch.diag(s[:4]) @ vh[:4])
    True
    >>> torch.allclose(lora_b.norm(dim=0) ** 2, s[:4]) and torch.allclose(lora_a.norm(dim=1) ** 2, s[:4])
    True
    """
    checked = _check_adapters(adapters)
    coefficients = _check_weights(weights, len(checked))
    rank = _check_rank(rank)
    dtype = checked[0][0].dtype
    with torch.no_grad():
        a_cat, b_cat = _stack(checked, coefficients)                  # (R, K), (N, R)
        u, sigma, vh = _truncated_svd_of_product(b_cat, a_cat, rank)  # (N, p), (p,), (p, K)
        u, vh = _fix_signs(u, vh)
        root = sigma.clamp_min(0).sqrt()                               # (p,)
        lora_b = b_cat.new_zeros((b_cat.shape[0], rank))               # (N, rank)
        lora_a = a_cat.new_zeros((rank, a_cat.shape[1]))               # (rank, K)
        p = sigma.shape[0]
        lora_b[:, :p] = u * root
        lora_a[:p] = root[:, None] * vh
    return lora_a.to(dtype), lora_b.to(dtype), 1.0


def __getattr__(name: str):
    return moved_attribute(__name__, name, {"delta_weight": "lora_kernels.merging:dense_delta"})
