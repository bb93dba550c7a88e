"""The torch backend: lean implementations for CPU (and for CUDA when Triton is missing).

Same semantics as the Triton kernels: base GEMM with the bias fused (addmm), the rank-r product
added in place (addmm_), no (M, N) temporaries besides the output. Everything is 2-D here:
x (M, K), weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from ._checks import hidden_dtype

if TYPE_CHECKING:   # the type only: metadata sits above the backends
    from .metadata import BatchTensors


def dropout_keep_mask(m: int, k: int, dropout_p: float, seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(M, K) bool keep-mask derived from `seed` (0-d int64 tensor) alone, so backward regenerates what
    forward used. Drawn by a private CPU generator: the global generator's state is untouched.
    On the meta device (shape inference; x's seed is meta too): a meta mask, nothing read."""
    if device.type == "meta":
        return torch.empty((m, k), dtype=torch.bool, device=device)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.rand((m, k), generator=generator) >= dropout_p).to(device)


def dropped(x: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """dropout(x) with the mask of `seed`; x itself when dropout is off."""
    if dropout_p == 0.0:
        return x
    return apply_keep_mask(x, dropout_keep_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device), dropout_p)


def apply_keep_mask(x: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """x (M, K) with the dropped entries zeroed and the kept ones scaled by 1 / (1 - dropout_p)."""
    return x * keep * (1.0 / (1.0 - dropout_p))


def add_scaled_product_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float,
                        beta: int = 1) -> None:
    """out = beta · out + scale · (left @ right), in place; beta 0 ignores out's old values (NaN too).
    The scale multiplies the finished product, as in the reference; at scale 0 BLAS would skip the
    product (alpha = 0), dropping the NaN that 0 · inf gives there: then the product is formed."""
    if scale != 0.0:
        out.addmm_(left, right, beta=beta, alpha=scale)
    elif beta == 0:
        torch.mm(left, right, out=out).mul_(0.0)
    else:
        out.add_(torch.mm(left, right).mul_(0.0))


def lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) and lora_hidden T = dropout(x) Aᵀ (M, r) in hidden_dtype (no copy for fp32/fp64)."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T    # (M, N)
    hidden = dropped(x, dropout_p, seed) @ lora_a.T                             # (M, r)
    add_scaled_product_(y, hidden, lora_b.T, scale)
    saved_dtype = hidden_dtype(hidden.dtype)
    return y, (hidden if hidden.dtype is saved_dtype else hidden.to(saved_dtype))     # fp32 / fp64: no copy


def lora_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor, lora_hidden: torch.Tensor | None,
    scale: float, dropout_p: float, seed: torch.Tensor | None,
    need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX, dA, dB): dT = s·dY·B;  dX = dY·W0 + mask ⊙ (dT·A);  dA = dTᵀ·dropout(x);  dB = dYᵀ·(s·T).
    The scale multiplies the (M, r) factors, the smallest tensors in play."""
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        grad_t = (grad_y @ lora_b).mul_(scale)                                  # (M, r)
        keep = None   # one mask for dX and dA: drawing it costs ~1.5 ms at 256 x 1024 on one CPU core
        if dropout_p != 0.0:
            k = x.shape[1] if x is not None else lora_a.shape[1]
            keep = dropout_keep_mask(grad_y.shape[0], k, dropout_p, seed, grad_y.device)   # (M, K)
        if need_x:
            grad_x = grad_y @ weight                                            # (M, K)
            if keep is None:
                grad_x.addmm_(grad_t, lora_a)
            else:
                grad_x.add_(apply_keep_mask(grad_t @ lora_a, keep, dropout_p))
        if need_a:
            grad_a = grad_t.T @ (x if keep is None else apply_keep_mask(x, keep, dropout_p))   # (r, K)
    if need_b:
        grad_b = grad_y.T @ (lora_hidden * scale).to(grad_y.dtype)              # (N, r)
    return grad_x, grad_a, grad_b


# ---- multi-adapter: rows gathered once, then two dense matmuls per active adapter ----------------
# x (M, K), lora_a (L, R, K), lora_b (L, N, R), scales (L,); of the AdapterBatch (batch: BatchTensors,
# the same argument the Triton backend takes) only the by-adapter view: sorted_rows (M,),
# adapter_starts (L + 1,), ranks (L,) | None, read on the host once per call.
# Never a per-row weight gather: the rows of all adapters are index_select-ed once into adapter
# order (M' rows: those with an adapter); each adapter's contiguous block goes through two matmuls
# with its rank-trimmed weights, written in place by out=; one index_add_ puts the blocks back.
# Rows of no adapter are never touched. When one adapter has every row, the stable sort left them
# in order: no gather and no scatter, the blocks are x and the output themselves. Views are made
# in bulk (split, unbind) when many adapters are active: at a few rows per adapter, per-adapter
# Python indexing cost more than the matmuls (measured ~45 % of the LoRA time at 64 rows over 64
# adapters, 576 wide). With few of many adapters active, one view each is cheaper than L of them.

# Bulk views cost ~0.4 µs per adapter of the stack, one view ~1 µs (torch 2.13, CPU): bulk pays
# when at least a third of the stack is active (one adapter of 64: 4 views instead of 4·64).
BULK_VIEWS_MIN_ACTIVE_FRACTION = 1 / 3


class _AdapterViews:
    """Per active adapter j: its row block of tensors split by `counts`, and its slice of a stack."""

    def __init__(self, counts: list[int], active: list[int]):
        self.counts, self.active = counts, active
        self.bulk = len(active) >= BULK_VIEWS_MIN_ACTIVE_FRACTION * len(counts)
        if not self.bulk:
            self.starts = list(itertools.accumulate(counts, initial=0))

    def rows(self, t: torch.Tensor) -> dict[int, torch.Tensor]:
        """{j: the rows of adapter j}, t holding each adapter's rows in turn ((sum(counts), ...))."""
        if self.bulk:
            blocks = t.split(self.counts)
            return {j: blocks[j] for j in self.active}
        return {j: t[self.starts[j]:self.starts[j + 1]] for j in self.active}

    def stack(self, t: torch.Tensor) -> dict[int, torch.Tensor]:
        """{j: t[j]} for a stack t (L, ...)."""
        if self.bulk:
            views = t.unbind(0)
            return {j: views[j] for j in self.active}
        return {j: t[j] for j in self.active}


def host_groups(adapter_starts: torch.Tensor, ranks: torch.Tensor | None, scales: torch.Tensor,
                 max_rank: int) -> tuple[list[int], list[int], list[float], list[int]]:
    """(rows per adapter, rank per adapter (clamped to [0, R], as the Triton kernels read it), scale per
    adapter, the adapters with rows and rank > 0), read on the host once."""
    starts = adapter_starts.tolist()
    if len(starts) != scales.shape[0] + 1 or (ranks is not None and ranks.shape[0] != scales.shape[0]):
        # only a direct call of a registered op can get here (AdapterBatch builds them alike)
        raise ValueError(f"adapter_starts ({len(starts)} entries), scales ({scales.shape[0]}) and ranks "
                         f"({'None' if ranks is None else ranks.shape[0]}) must describe the same L adapters: "
                         "L + 1 starts, L scales and ranks")
    counts = [end - start for start, end in zip(starts[:-1], starts[1:])]
    host_ranks = [max_rank] * len(counts) if ranks is None else [min(max(r, 0), max_rank) for r in ranks.tolist()]
    active = [j for j, (count, rank) in enumerate(zip(counts, host_ranks)) if count and rank]
    return counts, host_ranks, scales.tolist(), active


def _rows_in_adapter_order(sorted_rows: torch.Tensor, counts: list[int], active: list[int], m: int):
    """(rows (M',) | None, gather): rows None when one adapter has all M rows, already in order."""
    if len(active) == 1 and counts[active[0]] == m:
        return None, (lambda t: t)
    rows = sorted_rows[:sum(counts)]
    return rows, (lambda t: t.index_select(0, rows))


def multi_lora_add_(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
    batch: BatchTensors,
) -> None:
    """out[rows of j] += scales[j] · (x A[j]ᵀ) B[j]ᵀ in place (out (M, N), any strides)."""
    _add_lora_rows(out, x, lora_a, lora_b, scales, batch.sorted_rows, batch.adapter_starts, batch.ranks)


def _add_lora_rows(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
    sorted_rows: torch.Tensor, adapter_starts: torch.Tensor, ranks: torch.Tensor | None,
    hidden: torch.Tensor | None = None,
) -> None:
    """multi_lora_add_; when hidden (M, R), zero-filled, is given, its rows of adapter j also get the
    unscaled T = x A[j]ᵀ."""
    m, max_rank = x.shape[0], lora_a.shape[1]
    counts, host_ranks, host_scales, active = host_groups(adapter_starts, ranks, scales, max_rank)
    if not active:
        return
    rows, gather = _rows_in_adapter_order(sorted_rows, counts, active, m)
    if rows is None:   # the blocks are x and out themselves
        x_rows, lora_out, beta = x, out, 1
    else:              # rows of a rank-0 adapter must stay zero in the buffer
        x_rows, beta = gather(x), 0                                                 # (M', K)
        zero = any(count and not rank for count, rank in zip(counts, host_ranks))
        lora_out = (out.new_zeros if zero else out.new_empty)((rows.shape[0], out.shape[1]))   # (M', N)
    t_rows = x.new_zeros((x_rows.shape[0], max_rank)) if hidden is not None else None          # (M', R)
    views = _AdapterViews(counts, active)
    x_blocks, out_blocks = views.rows(x_rows), views.rows(lora_out)
    t_blocks = views.rows(t_rows) if t_rows is not None else None
    a_t, b_t = views.stack(lora_a.transpose(1, 2)), views.stack(lora_b.transpose(1, 2))  # A[j]ᵀ (K, R), B[j]ᵀ (R, N)
    for j in active:
        rank = host_ranks[j]
        a_j, b_j = (a_t[j], b_t[j]) if rank == max_rank else (a_t[j][:, :rank], b_t[j][:rank])
        t = torch.mm(x_blocks[j], a_j)                                              # (m_j, r_j)
        add_scaled_product_(out_blocks[j], t, b_j, host_scales[j], beta=beta)
        if t_blocks is not None:
            t_blocks[j][:, :rank] = t
    if rows is not None:
        out.index_add_(0, rows, lora_out)
    if hidden is not None:
        if rows is None:
            hidden.copy_(t_rows)
        else:
            hidden.index_copy_(0, rows.long(), t_rows.to(hidden.dtype))


def multi_lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor, batch: BatchTensors, need_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N), and when need_hidden the rank intermediate T (M, R) in hidden_dtype, unscaled,
    zero on rows of no adapter and past each adapter's rank (else an empty (M, 0))."""
    m, max_rank = x.shape[0], lora_a.shape[1]
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T       # (M, N)
    hidden = x.new_zeros((m, max_rank if need_hidden else 0), dtype=hidden_dtype(x.dtype))
    _add_lora_rows(y, x, lora_a, lora_b, scales, batch.sorted_rows, batch.adapter_starts, batch.ranks,
                   hidden if need_hidden else None)
    return y, hidden


def multi_lora_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, lora_hidden: torch.Tensor | None,
    scales: torch.Tensor, batch: BatchTensors, need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per adapter j over its rows:  dU_j = s_j·dY_j·B_j;  dX_j += dU_j·A_j;  dA_j = dU_jᵀ·X_j;
    dB_j = s_j·dY_jᵀ·T_j.  dX = dY·W0 first; unused adapters (and padded ranks) get zero gradients."""
    m, max_rank = grad_y.shape[0], lora_a.shape[1]
    grad_x = grad_y @ weight if need_x else None                                    # (M, K)
    grad_a = lora_a.new_zeros(lora_a.shape) if need_a else None                     # (L, R, K)
    grad_b = lora_b.new_zeros(lora_b.shape) if need_b else None                     # (L, N, R)
    counts, host_ranks, host_scales, active = host_groups(batch.adapter_starts, batch.ranks, scales, max_rank)
    if not active:
        return grad_x, grad_a, grad_b
    rows, gather = _rows_in_adapter_order(batch.sorted_rows, counts, active, m)
    views = _AdapterViews(counts, active)
    grad_y_blocks = views.rows(gather(grad_y))                                      # (m_j, N) each
    x_blocks = views.rows(gather(x)) if need_a else None                            # (m_j, K)
    hidden_blocks = views.rows(gather(lora_hidden).to(grad_y.dtype)) if need_b else None   # (m_j, R)
    if need_x:   # dX's LoRA term: into dX itself when in order, else a buffer (zero: rank-0 rows)
        grad_x_lora = grad_x if rows is None else grad_y.new_zeros((rows.shape[0], grad_x.shape[1]))
        grad_x_blocks = views.rows(grad_x_lora)
    a, b = views.stack(lora_a), views.stack(lora_b)                                 # A[j] (R, K), B[j] (N, R)
    for j in active:
        rank, scale = host_ranks[j], host_scales[j]
        a_j, b_j = (a[j], b[j]) if rank == max_rank else (a[j][:rank], b[j][:, :rank])
        if need_x or need_a:
            grad_u = torch.mm(grad_y_blocks[j], b_j).mul_(scale)                   # (m_j, r_j)
            if need_x:
                grad_x_blocks[j].addmm_(grad_u, a_j)
            if need_a:
                torch.mm(grad_u.T, x_blocks[j], out=grad_a[j, :rank])
        if need_b:
            block = grad_b[j, :, :rank]
            add_scaled_product_(block, grad_y_blocks[j].T, hidden_blocks[j][:, :rank], scale, beta=0)
    if need_x and rows is not None:
        grad_x.index_add_(0, rows, grad_x_lora)
    return grad_x, grad_a, grad_b
