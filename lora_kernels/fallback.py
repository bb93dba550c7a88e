"""The torch backend: lean implementations for CPU (and for CUDA when Triton is missing).

Same semantics as the Triton kernels: base GEMM with the bias fused (addmm), the rank-r product
added in place (addmm_), no (M, N) temporaries besides the output. Everything is 2-D here:
x (M, K), weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r).
"""

from __future__ import annotations

import torch


def hidden_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved rank intermediate T: fp32 for 16-bit and fp32 inputs, fp64 for fp64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dropout_keep_mask(m: int, k: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """(M, K) bool keep-mask derived from `seed` alone, so backward regenerates what forward used.
    Drawn by a private CPU generator: the global generator's state is untouched."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand((m, k), generator=generator) >= dropout_p).to(device)


def dropped(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """dropout(x) with the mask of `seed`; x itself when dropout is off."""
    if dropout_p == 0.0:
        return x
    keep = dropout_keep_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)
    return x * keep * (1.0 / (1.0 - dropout_p))


def lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) and lora_hidden T = dropout(x) Aᵀ (M, r) in hidden_dtype (no copy for fp32/fp64)."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T    # (M, N)
    hidden = dropped(x, dropout_p, seed) @ lora_a.T                             # (M, r)
    y.addmm_(hidden, lora_b.T, alpha=scale)
    return y, hidden.to(hidden_dtype(hidden.dtype))             # fp32 / fp64: no copy


def lora_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor, lora_hidden: torch.Tensor | None,
    scale: float, dropout_p: float, seed: int,
    need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX, dA, dB): dT = s·dY·B;  dX = dY·W0 + mask ⊙ (dT·A);  dA = dTᵀ·dropout(x);  dB = dYᵀ·(s·T).
    The scale multiplies the (M, r) factors, the smallest tensors in play."""
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        grad_t = (grad_y @ lora_b).mul_(scale)                                  # (M, r)
        if need_x:
            grad_x = grad_y @ weight                                            # (M, K)
            if dropout_p == 0.0:
                grad_x.addmm_(grad_t, lora_a)
            else:
                grad_x.add_(dropped(grad_t @ lora_a, dropout_p, seed))
        if need_a:
            grad_a = grad_t.T @ dropped(x, dropout_p, seed)                     # (r, K)
    if need_b:
        grad_b = grad_y.T @ (lora_hidden * scale).to(grad_y.dtype)              # (N, r)
    return grad_x, grad_a, grad_b


# ---- multi-adapter: one pass over the active adapters, rows gathered once per adapter ----------
# x (M, K), lora_a (L, R, K), lora_b (L, N, R), scales (L,); the AdapterBatch's by-adapter view:
# sorted_rows (M,), adapter_starts (L + 1,), ranks (L,) | None (read on the host once per call).
# Never a per-row weight gather: each adapter's rows are index_select-ed, go through two dense
# matmuls with that adapter's (rank-trimmed) weights, and are index_add-ed back. Rows of no
# adapter are never touched.

def _adapter_groups(sorted_rows, adapter_starts, ranks, max_rank: int):
    """(adapter j, its rows (m_j,) int64, its rank r_j) for every adapter with rows and rank > 0."""
    starts = adapter_starts.tolist()
    host_ranks = None if ranks is None else ranks.tolist()
    sorted_rows = sorted_rows.long()
    for j in range(len(starts) - 1):
        start, end = starts[j], starts[j + 1]
        rank = max_rank if host_ranks is None else min(host_ranks[j], max_rank)
        if end > start and rank > 0:
            yield j, sorted_rows[start:end], rank


def multi_lora_add_(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
    sorted_rows: torch.Tensor, adapter_starts: torch.Tensor, ranks: torch.Tensor | None,
    hidden: torch.Tensor | None = None,
) -> None:
    """out[rows of j] += scales[j] · (x A[j]ᵀ) B[j]ᵀ in place (out (M, N), any strides); when hidden
    (M, R) is given, its rows of adapter j get the unscaled T = x A[j]ᵀ."""
    scales = scales.tolist()
    for j, rows, rank in _adapter_groups(sorted_rows, adapter_starts, ranks, lora_a.shape[1]):
        t = x.index_select(0, rows) @ lora_a[j, :rank].T                          # (m_j, r_j)
        out.index_add_(0, rows, (t * scales[j]) @ lora_b[j, :, :rank].T)         # (m_j, N)
        if hidden is not None:
            hidden[rows, :rank] = t.to(hidden.dtype)


def multi_lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
    sorted_rows: torch.Tensor, adapter_starts: torch.Tensor, ranks: torch.Tensor | None, need_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N), and when need_hidden the rank intermediate T (M, R) in hidden_dtype, unscaled,
    zero on rows of no adapter and past each adapter's rank (else an empty (M, 0))."""
    m, max_rank = x.shape[0], lora_a.shape[1]
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T       # (M, N)
    hidden = x.new_zeros((m, max_rank if need_hidden else 0), dtype=hidden_dtype(x.dtype))
    multi_lora_add_(y, x, lora_a, lora_b, scales, sorted_rows, adapter_starts, ranks,
                    hidden if need_hidden else None)
    return y, hidden


def multi_lora_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, lora_hidden: torch.Tensor | None,
    scales: torch.Tensor, sorted_rows: torch.Tensor, adapter_starts: torch.Tensor, ranks: torch.Tensor | None,
    need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per adapter j over its rows:  dU_j = s_j·dY_j·B_j;  dX_j += dU_j·A_j;  dA_j = dU_jᵀ·X_j;
    dB_j = s_j·dY_jᵀ·T_j.  dX = dY·W0 first; unused adapters (and padded ranks) get zero gradients."""
    max_rank = lora_a.shape[1]
    scales = scales.tolist()
    grad_x = grad_y @ weight if need_x else None                                    # (M, K)
    grad_a = lora_a.new_zeros(lora_a.shape) if need_a else None                     # (L, R, K)
    grad_b = lora_b.new_zeros(lora_b.shape) if need_b else None                     # (L, N, R)
    for j, rows, rank in _adapter_groups(sorted_rows, adapter_starts, ranks, max_rank):
        grad_y_j = grad_y.index_select(0, rows)                                      # (m_j, N)
        if need_x or need_a:
            grad_u = (grad_y_j @ lora_b[j, :, :rank]).mul_(scales[j])               # (m_j, r_j)
            if need_x:
                grad_x.index_add_(0, rows, grad_u @ lora_a[j, :rank])
            if need_a:
                grad_a[j, :rank] = grad_u.T @ x.index_select(0, rows)
        if need_b:
            hidden = lora_hidden.index_select(0, rows)[:, :rank] * scales[j]
            grad_b[j, :, :rank] = grad_y_j.T @ hidden.to(grad_y.dtype)
    return grad_x, grad_a, grad_b
