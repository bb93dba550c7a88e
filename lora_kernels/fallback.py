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


# ---- multi-adapter: rows gathered once, then two dense matmuls per active adapter ----------------
# x (M, K), lora_a (L, R, K), lora_b (L, N, R), scales (L,); the AdapterBatch's by-adapter view:
# sorted_rows (M,), adapter_starts (L + 1,), ranks (L,) | None, read on the host once per call.
# Never a per-row weight gather: the rows of all adapters are index_select-ed once into adapter
# order (M' rows: those with an adapter), each adapter's contiguous block goes through two matmuls
# with its rank-trimmed weights, written in place into one (M', N) buffer by out=, and one
# index_add_ puts the blocks back. Rows of no adapter are never touched. When one adapter has every
# row (a batch of one adapter), the stable sort left them in order: no gather, no scatter.

def _adapter_blocks(adapter_starts: torch.Tensor, ranks: torch.Tensor | None, scales: torch.Tensor,
                    max_rank: int) -> tuple[list[tuple[int, int, int, int, float]], int]:
    """([(adapter j, start, end, rank r_j, scale s_j)] over adapters with rows and rank > 0, M' rows
    with an adapter): the positions start:end of the adapter-ordered rows belong to j."""
    starts = adapter_starts.tolist()
    host_ranks = None if ranks is None else ranks.tolist()
    host_scales = scales.tolist()
    blocks = []
    for j in range(len(starts) - 1):
        start, end = starts[j], starts[j + 1]
        rank = max_rank if host_ranks is None else min(host_ranks[j], max_rank)
        if end > start and rank > 0:
            blocks.append((j, start, end, rank, host_scales[j]))
    return blocks, starts[-1]


def multi_lora_add_(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
    sorted_rows: torch.Tensor, adapter_starts: torch.Tensor, ranks: torch.Tensor | None,
    hidden: torch.Tensor | None = None,
) -> None:
    """out[rows of j] += scales[j] · (x A[j]ᵀ) B[j]ᵀ in place (out (M, N), any strides); when hidden
    (M, R), zero-filled, is given, its rows of adapter j get the unscaled T = x A[j]ᵀ."""
    m, max_rank = x.shape[0], lora_a.shape[1]
    blocks, num_rows = _adapter_blocks(adapter_starts, ranks, scales, max_rank)
    if not blocks:
        return
    if len(blocks) == 1 and num_rows == m:                # one adapter, every row, rows in order
        j, _, _, rank, scale = blocks[0]
        t = x @ lora_a[j, :rank].T                                                  # (M, r)
        out.addmm_(t, lora_b[j, :, :rank].T, alpha=scale)
        if hidden is not None:
            hidden[:, :rank] = t
        return
    rows = sorted_rows[:num_rows]
    x_rows = x.index_select(0, rows)                                                # (M', K)
    # rows of a rank-0 adapter stay zero
    lora_out = out.new_zeros((num_rows, out.shape[1])) if ranks is not None else out.new_empty(
        (num_rows, out.shape[1]))                                                   # (M', N)
    t_rows = x.new_zeros((num_rows, max_rank)) if hidden is not None else None      # (M', R)
    for j, start, end, rank, scale in blocks:
        t = x_rows[start:end] @ lora_a[j, :rank].T                                  # (m_j, r_j)
        block = lora_out[start:end]
        torch.addmm(block, t, lora_b[j, :, :rank].T, beta=0, alpha=scale, out=block)
        if t_rows is not None:
            t_rows[start:end, :rank] = t
    out.index_add_(0, rows, lora_out)
    if hidden is not None:
        hidden.index_copy_(0, rows.long(), t_rows.to(hidden.dtype))


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
    dB_j = s_j·dY_jᵀ·T_j.  dX = dY·W0 first; unused adapters (and padded ranks) get zero gradients.
    Rows are gathered once into adapter order (no gather when one adapter has every row)."""
    m, max_rank = grad_y.shape[0], lora_a.shape[1]
    grad_x = grad_y @ weight if need_x else None                                    # (M, K)
    grad_a = lora_a.new_zeros(lora_a.shape) if need_a else None                     # (L, R, K)
    grad_b = lora_b.new_zeros(lora_b.shape) if need_b else None                     # (L, N, R)
    blocks, num_rows = _adapter_blocks(adapter_starts, ranks, scales, max_rank)
    if not blocks:
        return grad_x, grad_a, grad_b
    in_order = len(blocks) == 1 and num_rows == m
    rows = sorted_rows[:num_rows]

    def gathered(t: torch.Tensor) -> torch.Tensor:                                  # (M', ...)
        return t if in_order else t.index_select(0, rows)

    grad_y_rows = gathered(grad_y)                                                  # (M', N)
    x_rows = gathered(x) if need_a else None                                        # (M', K)
    hidden_rows = gathered(lora_hidden).to(grad_y.dtype) if need_b else None        # (M', R)
    grad_x_lora = None
    if need_x:   # rows of a rank-0 adapter stay zero
        grad_x_lora = grad_x if in_order else (
            grad_y.new_zeros((num_rows, grad_x.shape[1])) if ranks is not None
            else grad_y.new_empty((num_rows, grad_x.shape[1])))                     # (M', K)
    for j, start, end, rank, scale in blocks:
        grad_y_j = grad_y_rows[start:end]                                           # (m_j, N)
        if need_x or need_a:
            grad_u = (grad_y_j @ lora_b[j, :, :rank]).mul_(scale)                  # (m_j, r_j)
            if need_x:
                block = grad_x_lora[start:end]
                torch.addmm(block, grad_u, lora_a[j, :rank], beta=1 if in_order else 0, out=block)
            if need_a:
                torch.mm(grad_u.T, x_rows[start:end], out=grad_a[j, :rank])
        if need_b:
            block = grad_b[j, :, :rank]
            torch.addmm(block, grad_y_j.T, hidden_rows[start:end, :rank], beta=0, alpha=scale, out=block)
    if need_x and not in_order:
        grad_x.index_add_(0, rows, grad_x_lora)
    return grad_x, grad_a, grad_b
